"""Greedy decoding without ``model.generate``: the same tokens, fewer copies of the logits.

For Gemma 3's 262,144-id vocabulary a decode step's logits are a ``[batch, 262144]`` tensor, and
``model.generate`` makes several fresh copies of it per step (the head's output, its fp32 copy,
the repetition penalty's padded copy and its scatter). On CPU each fresh tensor of that size is
new memory from the operating system, paid in page faults, so on the default model at batch 64
those copies cost as much as the model's matmuls (``bench/bench_decode.py``). This loop
computes the same greedy choice in two buffers reused across steps and batches:

1. the decoder body on the new token (KV cache as ``generate`` keeps it, positions counted
   over real tokens, so a left-padded row sees what it would see alone);
2. the head into a reused buffer (:class:`mmie.core.head_precision.LogitBuffer`): the plain
   fp32 product, or under ``head_precision("bf16")`` the bf16 product with each row's top
   logits exact, as the shadowed head computes them for ``generate``; then Gemma's soft-cap;
3. the repetition penalty in place, on the ids the text holds so far (padding included, as in
   transformers' ``RepetitionPenaltyLogitsProcessor``);
4. the argmax (first index of the largest logit); a finished row is fed padding (as
   ``generate`` does) and its tokens are cut at its first stop token later.

Every step runs the whole batch: the language gate's latch (:mod:`mmie.edits.langgate`) keeps
one state per row and must see the same batch at every step. Sampling, a static KV cache and
heads that are not plain linear layers of the head's vocabulary keep ``model.generate``
(:func:`usable`).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from mmie.core.errors import ModelError
from mmie.core.head_precision import LogitBuffer, plain_linear
from mmie.core.models import LoadedModel, get_decoder, lm_head, unwrap


def usable(lm: LoadedModel) -> bool:
    """Whether this loop can decode for ``lm``: a plain bias-free fp32 linear head (any other
    head's forward may compute more than its product, and a bf16 head's logits are rounded
    before an fp32 soft-cap would see them) and a decoder body it can call alone."""
    if not plain_linear(lm_head(lm.model)):
        return False
    try:
        get_decoder(lm.model)
    except ModelError:
        return False
    return True


def _penalize(logits: Tensor, ids: Tensor, penalty: float) -> None:
    """transformers' repetition penalty, in place: every id in ``ids`` (per row) has its logit
    divided by ``penalty`` when positive, multiplied when negative."""
    if penalty == 1.0:
        return
    seen = logits.gather(1, ids)
    logits.scatter_(1, ids, torch.where(seen < 0, seen * penalty, seen / penalty))


def _positions(mask: Tensor) -> Tensor:
    """Position ids of a left-padded batch: real tokens count from 0 (padding gets 1, as
    ``generate`` gives it; it is masked either way)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _cache_name(body: torch.nn.Module) -> str:
    """The KV cache's name in the body's forward and output: transformers 5 renamed
    ``past_key_values`` to ``cache`` within the versions we support."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else \
        "past_key_values"


def _full(logits_of: LogitBuffer, h: Tensor, text: Tensor, penalty: float) -> Tensor:
    """The pick from the whole logits row: penalty in place, then the first index of the
    largest value."""
    logits = logits_of(h)
    _penalize(logits, text.to(logits.device), penalty)
    # max, not argmax: the same first index of the largest value, in half the time on CPU
    return logits.max(-1).indices


def _choose_recorded(logits_of: LogitBuffer, h: Tensor, text: Tensor,
                     penalty: float) -> tuple[Tensor, Tensor]:
    logits = logits_of(h)
    lse, raw = logits.logsumexp(-1), logits.clone()
    _penalize(logits, text.to(logits.device), penalty)
    chosen = logits.max(-1).indices
    return chosen, (raw.gather(1, chosen[:, None])[:, 0] - lse).cpu()


def _choose(logits_of: LogitBuffer, h: Tensor, text: Tensor, penalty: float,
            running: Tensor | None = None) -> Tensor:
    """:func:`_full`'s pick, from each row's exact top candidates alone where that is certain.

    Under a bf16 head :func:`_full`'s row holds the exact logits of its top ids and bf16
    values elsewhere, all at most the candidates' smallest bf16 value ``bound``; the penalty
    only lowers a logit. The candidates here are the same ids: ``topk`` over the bf16 product
    and over its exact fp32 upcast picks the same ids, ties at ``bound`` included (one
    algorithm over the same values; ``tests/test_decode.py`` checks it). So when the best
    penalized candidate beats ``bound`` it is the row's pick, the same token, without writing
    and scanning the fp32 row. Rows where it does not (every candidate penalized below
    ``bound``) are picked by :func:`_full`, on those rows alone; a finished row (``running``
    False) is fed padding whatever it picks, so its pick is left as it is.
    """
    top = logits_of.top(h)
    if top is None:
        return _full(logits_of, h, text, penalty)
    ids, exact, bound = top
    if penalty != 1.0:
        seen = (ids[:, :, None] == text.to(ids.device)[:, None, :]).any(-1)
        exact = torch.where(seen, torch.where(exact < 0, exact * penalty, exact / penalty),
                            exact)
    best = exact.max(-1).values
    # first index of the largest value, among the candidates
    past = torch.iinfo(ids.dtype).max
    chosen = torch.where(exact == best[:, None], ids, past).amin(-1)
    unsure = best <= bound
    if running is not None:
        unsure &= running.to(unsure.device)
    if unsure.any():
        rows = unsure.nonzero()[:, 0]
        chosen[rows] = _full(logits_of, h[rows], text[rows.to(text.device)], penalty)
    return chosen


@torch.inference_mode()
def greedy(lm: LoadedModel, ids: Tensor, mask: Tensor, *, max_new_tokens: int,
           stops: list[int], pad_id: int, penalty: float = 1.0,
           record: bool = False) -> tuple[Tensor, Tensor | None]:
    """Greedy continuation of a left-padded batch (``ids``, ``mask`` on the input device).

    Returns ``(new [B, steps], logprobs [B, steps] or None)``: the tokens chosen at every step
    (padding after a row's stop token) and, with ``record``, each chosen token's log p under
    the raw logits (before the penalty), as :class:`mmie.core.logprob_recorder.ChosenLogprobs`
    records it. Stops after ``max_new_tokens`` or when every row has emitted a stop token.
    """
    softcap = getattr(unwrap(lm.model).config.get_text_config(), "final_logit_softcapping", None)
    body, logits_of = get_decoder(lm.model), LogitBuffer(lm_head(lm.model), softcap)
    cache = _cache_name(body)
    device = ids.device
    stop_ids = torch.tensor(stops, device=device)
    running = torch.ones(ids.shape[0], dtype=torch.bool, device=device)
    text, steps, logps = ids, [], []
    out = body(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True)
    for _ in range(max_new_tokens):
        h = out.last_hidden_state[:, -1].to(logits_of.head.weight.device)
        if record:
            chosen, logp = _choose_recorded(logits_of, h, text, penalty)
            logps.append(logp)
        else:
            chosen = _choose(logits_of, h, text, penalty, running)
        chosen = torch.where(running, chosen.to(device), pad_id)
        steps.append(chosen)
        running &= ~torch.isin(chosen, stop_ids)
        if not running.any() or len(steps) == max_new_tokens:
            break
        text = torch.cat([text, chosen[:, None]], 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        out = body(input_ids=chosen[:, None], attention_mask=mask,
                   position_ids=_positions(mask)[:, -1:], use_cache=True,
                   **{cache: getattr(out, cache)})
    new = torch.stack(steps, 1)
    return new, (torch.stack(logps, 1) if record else None)

