"""What an unlearning step reads: token batches, forward passes, the schedule, and the reference
targets computed once before training (see :mod:`mmie.unlearn.train` for the cost model).

Texts are left-padded with explicit position ids, so a text's hidden states do not depend on
what it was batched with (the precomputed reference stays valid in any batch). The schedule is
fixed up front from the seed: forget examples in shuffled epochs (or easiest-first with
``curriculum``), retain examples drawn set by set with probability equal to the set's weight,
each set in shuffled epochs of its own. Under a launcher every process builds the same
schedule and takes its share of each step's rows (:meth:`Schedule.local`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmie.core import kl_stats, losses
from mmie.core.activations import real_token_mask
from mmie.core.distributed import World, shard
from mmie.core.hooks import capture_blocks, run_until_stop
from mmie.core.models import LoadedModel, get_decoder, input_device, unwrap
from mmie.edits.adapters import Adapter

# --- batches ----------------------------------------------------------------------------------

@dataclass
class Batch:
    ids: Tensor        # [B, T] left-padded token ids
    attention: Tensor  # [B, T] 1 for real tokens
    positions: Tensor  # [B, T] position ids that ignore the left padding
    labels: Tensor     # [B, T] next-token ids (losses.shift_labels)
    label_mask: Tensor  # [B, T] positions that predict a real token
    real: Tensor       # [B, T] real tokens other than BOS (activation statistics)


def encode(lm: LoadedModel, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text; texts that give fewer than 2 tokens have nothing to predict."""
    ids = lm.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return [list(row) for row in ids]


def collate(lm: LoadedModel, rows: Sequence[Sequence[int]],
            starts: Sequence[int] | None = None) -> Batch:
    """Left-padded batch; with ``starts``, row ``j`` scores only its tokens from index
    ``starts[j]`` on (a continuation after its prompt), so the prompt never gets a loss."""
    width = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    labels, label_mask = losses.shift_labels(ids, attention)
    if starts is not None:  # position t predicts token t + 1: the first scored one is start - 1
        first = torch.tensor([width - len(r) + s - 1 for r, s in zip(rows, starts, strict=True)])
        label_mask &= torch.arange(width)[None, :] >= first[:, None]
    real = real_token_mask(lm, {"input_ids": ids, "attention_mask": attention})
    return Batch(ids, attention, positions, labels, label_mask, real)


@dataclass
class Pass:
    """What one forward pass produced: final hidden states, one block's output, gate values."""

    hidden: Tensor | None
    acts: Tensor | None
    gates: dict[int, Tensor]


def forward(lm: LoadedModel, batch: Batch, *, hidden: bool, layer: int | None,
            stop: int | None = None) -> Pass:
    """Run the decoder body; without ``hidden`` stop after block ``max(layer, stop)``."""
    device = input_device(lm.model)
    kwargs = dict(input_ids=batch.ids.to(device), attention_mask=batch.attention.to(device),
                  position_ids=batch.positions.to(device), use_cache=False)
    body = get_decoder(lm.model)
    if hidden and layer is None:
        return Pass(body(**kwargs).last_hidden_state, None, {})
    if hidden:
        with capture_blocks(lm.blocks, [layer]) as store:
            out = body(**kwargs).last_hidden_state
        return Pass(out, store[layer], {})
    last = max(x for x in (layer, stop) if x is not None)
    read = sorted({last} | ({layer} if layer is not None else set()))
    with capture_blocks(lm.blocks, read, stop_after_last=True) as store:
        run_until_stop(lambda: body(**kwargs))
    return Pass(None, store.get(layer), {})


# --- reference targets, computed once --------------------------------------------------------

@dataclass
class References:
    forget_logp: dict[int, float] = field(default_factory=dict)     # summed log p, per text
    forget_tokens: dict[int, int] = field(default_factory=dict)      # predicted tokens, per text
    retain_topk: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    # exact KL's reference summary (m_r, m_fast, offset) per text (mmie.core.kl_stats)
    retain_klstats: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    retain_acts: dict[int, Tensor] = field(default_factory=dict)     # [real tokens, d] per text
    alternative_logp: dict[int, float] = field(default_factory=dict)  # log p(alt | prompt)
    cache: dict = field(default_factory=dict)  # where they came from (mmie.unlearn.refcache)


def _chunks(items: Sequence[int], lengths: Sequence[int], size: int) -> list[list[int]]:
    order = sorted(items, key=lambda i: lengths[i])  # similar lengths together: little padding
    return [order[i:i + size] for i in range(0, len(order), size)]


def forget_references(lm: LoadedModel, adapter: Adapter, rows: list[list[int]],
                      which: Sequence[int], refs: References, batch_size: int,
                      chunk_size: int, starts: Sequence[int] | None = None) -> None:
    """The frozen model's summed log-likelihood of each listed forget row (from ``starts``)."""
    sequence_references(lm, adapter, rows, starts, which, refs.forget_logp, refs.forget_tokens,
                        batch_size=batch_size, chunk_size=chunk_size)


@torch.no_grad()
def sequence_references(lm: LoadedModel, adapter: Adapter, rows: list[list[int]],
                        starts: Sequence[int] | None, which: Sequence[int],
                        logp: dict[int, float], tokens: dict[int, int] | None, *,
                        batch_size: int, chunk_size: int) -> None:
    """Fill ``logp[i]`` (and ``tokens[i]``) for each listed row not filled yet."""
    head = losses.head_params(unwrap(lm.model))
    todo = [i for i in sorted(set(which)) if i not in logp]
    for chunk in _chunks(todo, [len(r) for r in rows], batch_size):
        batch = collate(lm, [rows[i] for i in chunk],
                        None if starts is None else [starts[i] for i in chunk])
        with adapter.reference():
            out = forward(lm, batch, hidden=True, layer=None)
        mask = batch.label_mask.to(out.hidden.device)
        total, count = losses.sequence_logprobs(out.hidden, labels=batch.labels.to(mask.device),
                                                mask=mask, chunk_size=chunk_size, **head)
        for j, i in enumerate(chunk):
            logp[i] = float(total[j])
            if tokens is not None:
                tokens[i] = int(count[j])


@torch.no_grad()
def retain_references(lm: LoadedModel, adapter: Adapter, rows: list[list[int]],
                      which: Sequence[int], refs: References, *, top_k: int | None,
                      layer: int | None, batch_size: int, chunk_size: int,
                      kl_summary: bool = False) -> None:
    """Top-k targets (``top_k``), the exact KL's summary (``kl_summary``) and/or block-``layer``
    activations for each listed example that lacks them."""
    head = losses.head_params(unwrap(lm.model))
    todo = [i for i in sorted(set(which))  # rows not filled yet (e.g. from the cache)
            if (top_k is not None and i not in refs.retain_topk)
            or (kl_summary and i not in refs.retain_klstats)
            or (layer is not None and i not in refs.retain_acts)]
    for chunk in _chunks(todo, [len(r) for r in rows], batch_size):
        batch = collate(lm, [rows[i] for i in chunk])
        with adapter.reference():
            out = forward(lm, batch, hidden=top_k is not None or kl_summary, layer=layer)
        mask = None if out.hidden is None else batch.label_mask.to(out.hidden.device)
        if top_k is not None:
            got = losses.ref_topk(out.hidden, k=top_k, mask=mask, chunk_size=chunk_size, **head)
            _per_row(refs.retain_topk, chunk, got, mask)
        if kl_summary:
            _per_row(refs.retain_klstats, chunk,
                     kl_stats.ref_kl_stats(out.hidden, mask=mask, chunk_size=chunk_size, **head),
                     mask)
        if layer is not None:
            for j, i in enumerate(chunk):
                refs.retain_acts[i] = out.acts[j][batch.real[j].to(out.acts.device)].float().cpu()


def _per_row(table: dict, chunk: list[int], got: tuple[Tensor, ...], mask: Tensor) -> None:
    for j, i in enumerate(chunk):
        table[i] = tuple(t[j][mask[j]].cpu() for t in got)


def gather_targets(table: dict[int, tuple[Tensor, ...]], rows: Sequence[int], batch: Batch,
                   device) -> tuple:
    """Per-token targets precomputed for ``rows`` (``table``: e.g. ``refs.retain_topk``) laid
    out on the batch's label positions."""
    parts = [table[i] for i in rows]
    mask = batch.label_mask
    out = []
    for j in range(len(parts[0])):
        pieces = torch.cat([p[j] for p in parts])
        full = pieces.new_zeros((*mask.shape, *pieces.shape[1:]))
        full[mask] = pieces
        out.append(full.to(device))
    return tuple(out)


# --- schedule ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    forget: list[list[int]]  # per step: forget example indices
    retain: list[list[int]]  # per step: retain example indices (into the concatenated sets)

    def local(self, here: World) -> Schedule:
        """This process's share of every step's batch (all of it for a single process)."""
        return Schedule([shard(rows, here) for rows in self.forget],
                        [shard(rows, here) for rows in self.retain])


def _epochs(n: int, count: int, gen: torch.Generator, order: Sequence[int] | None) -> list[int]:
    out: list[int] = []
    while len(out) < count:
        out += list(order) if order is not None else torch.randperm(n, generator=gen).tolist()
    return out[:count]


def build_schedule(n_forget: int, set_sizes: Sequence[int], weights: Sequence[float],
                   steps: int, batch_size: int, seed: int,
                   forget_order: Sequence[int] | None = None) -> Schedule:
    gen = torch.Generator().manual_seed(seed)
    total = steps * batch_size
    forget = _epochs(n_forget, total, gen, forget_order)
    sets = torch.multinomial(torch.tensor(weights, dtype=torch.float64), total, replacement=True,
                             generator=gen).tolist()
    offsets = [sum(set_sizes[:s]) for s in range(len(set_sizes))]
    streams = [iter(_epochs(n, sets.count(s), gen, None)) for s, n in enumerate(set_sizes)]
    retain = [offsets[s] + next(streams[s]) for s in sets]
    cut = lambda xs: [xs[i:i + batch_size] for i in range(0, total, batch_size)]  # noqa: E731
    return Schedule(cut(forget), cut(retain))


def curriculum_order(refs: References, n_forget: int) -> list[int]:
    """Easiest first: lowest total reference NLL, i.e. short and likely texts lead."""
    return sorted(range(n_forget), key=lambda i: (-refs.forget_logp[i], i))
