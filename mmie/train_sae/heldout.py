"""The held-out model passes of `train-sae`'s analysis, shared among launched processes.

Each batch of held-out texts runs through the full model (log-probs from the final hidden state,
chunked, :mod:`mmie.core.losses`) three ways per layer: clean, with the layer's output replaced by
its SAE reconstruction (:func:`mmie.core.hooks.edit_blocks`), and with it ablated; the block outputs
are kept for the latent statistics. Only real non-BOS positions are replaced and only predictions
made at those positions count. With ``grad_attribution`` a gradient pass per forget batch gives
each latent ``a_j * (W_dec[j] . d log p / d h)`` summed over tokens.

Every batch of texts is one piece. :func:`measure` lets each process run every ``world``-th
piece, collects the pieces on rank 0 and merges them in batch order, summing losses in the
order one process would: the merged result is exactly the single-process one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmie.core.activations import real_token_mask, tokenize
from mmie.core.data import batched
from mmie.core.distributed import shard
from mmie.core.hooks import capture_blocks, edit_blocks
from mmie.core.losses import head_params, shift_labels, token_logprobs
from mmie.core.models import LoadedModel, get_decoder, lm_head, materialized, unwrap
from mmie.core.progress import Progress
from mmie.sae.modules import SparseAutoencoder
from mmie.train_sae.parallel import gather_to_main

# How the CE-recovered baseline replaces a layer's output ``h`` given the training mean.
ABLATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "zero": lambda h, mean: torch.zeros_like(h),
    "mean": lambda h, mean: mean.to(h).expand_as(h),
}


@dataclass(frozen=True)
class FeatureSettings:
    """What the held-out analysis measures; fields mirror :class:`TrainSaeConfig`'s."""

    max_length: int = 128
    batch_size: int = 8
    ablation: str = "zero"
    top_n: int = 20
    n_contexts: int = 5
    window: int = 8
    grad_attribution: bool = False
    # held-out sets a forget latent must be rare on: the retain set, plus each protected
    # language's set when there are any (selection by monolinguality, see features.py)
    against: tuple[str, ...] = ("retain",)


@dataclass
class HeldOut:
    """One held-out set: per-layer token activations, where each token sits, summed losses."""

    acts: dict[int, Tensor]
    where: Tensor                      # [m, 2]: text index, position in that text's ids
    ids: list[list[int]]               # each text's real token ids (BOS included)
    nll: dict[str, float] = field(default_factory=dict)
    n_loss: int = 0

    @classmethod
    def empty(cls, d: int, layers) -> HeldOut:
        return cls({i: torch.empty(0, d) for i in layers}, torch.empty(0, 2, dtype=torch.long), [])


# --------------------------------------------------------------------------- forward passes
def _nll(lm: LoadedModel, enc: dict[str, Tensor], loss_mask: Tensor) -> Tensor:
    """Summed next-token NLL over ``loss_mask`` (differentiable when grad is on)."""
    device = lm.device
    ids = enc["input_ids"].to(device)
    out = get_decoder(lm.model)(input_ids=ids, attention_mask=enc["attention_mask"].to(device),
                                use_cache=False)
    labels, _ = shift_labels(ids)
    with materialized(lm_head(lm.model)):  # an offloaded head's weight is meta outside it
        logp = token_logprobs(out.last_hidden_state, labels=labels,
                              mask=loss_mask.to(out.last_hidden_state.device),
                              **head_params(unwrap(lm.model)))
    return -logp.sum()


def _masks(lm: LoadedModel, enc: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Real non-BOS positions, and those of them whose next token is real (loss positions)."""
    mask = real_token_mask(lm, enc)
    _, predicts = shift_labels(enc["input_ids"], enc["attention_mask"])
    return mask, predicts & mask


def _replace(mask: Tensor, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def edit(h: Tensor) -> Tensor:
        out = h.clone()
        where = mask.to(h.device)
        out[where] = fn(h[where]).to(h.device, h.dtype)
        return out

    return edit


def _reconstruct(sae: SparseAutoencoder) -> Callable[[Tensor], Tensor]:
    return lambda x: sae.decode_sparse(*sae.encode(x.to(sae.W_enc.device).float()))


def _ablate(name: str, mean: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda h: ABLATIONS[name](h, mean)


def _held_batch(lm, saes, means, texts, s: FeatureSettings, held: HeldOut, first: int) -> None:
    enc = tokenize(lm, texts, s.max_length)
    mask, loss_mask = _masks(lm, enc)
    with capture_blocks(lm.blocks, sorted(saes)) as store:
        variants = {"clean": _nll(lm, enc, loss_mask)}
    for i in saes:
        held.acts[i] = torch.cat([held.acts[i], store[i][mask.to(store[i].device)].float().cpu()])
    for i, sae in saes.items():
        with edit_blocks(lm.blocks, {i: _replace(mask, _reconstruct(sae))}):
            variants[f"sae:{i}"] = _nll(lm, enc, loss_mask)
        with edit_blocks(lm.blocks, {i: _replace(mask, _ablate(s.ablation, means[i]))}):
            variants[f"ablated:{i}"] = _nll(lm, enc, loss_mask)
    for name, value in variants.items():
        held.nll[name] = held.nll.get(name, 0.0) + float(value)
    held.n_loss += int(loss_mask.sum())
    _record_positions(enc, mask, held, first)


def _record_positions(enc: dict[str, Tensor], mask: Tensor, held: HeldOut, first: int) -> None:
    attn = enc["attention_mask"].bool()
    start = attn.int().argmax(1)  # left padding: the first real position of each row
    held.ids += [row[keep].tolist() for row, keep in zip(enc["input_ids"], attn, strict=True)]
    rows, cols = torch.nonzero(mask, as_tuple=True)  # row-major, as boolean indexing
    where = torch.stack([rows + first, cols - start[rows]], dim=1)
    held.where = torch.cat([held.where, where])


def merge(start: HeldOut, pieces: list[HeldOut]) -> HeldOut:
    """``start`` (empty) extended by ``pieces`` in batch order (losses summed in that order)."""
    pieces = [start, *pieces]
    held = HeldOut({i: torch.cat([p.acts[i] for p in pieces]) for i in start.acts},
                   torch.cat([p.where for p in pieces]), [row for p in pieces for row in p.ids])
    for piece in pieces:
        for name, value in piece.nll.items():
            held.nll[name] = held.nll.get(name, 0.0) + value
        held.n_loss += piece.n_loss
    return held


def _piece(lm: LoadedModel, saes: dict[int, SparseAutoencoder], means: dict[int, Tensor],
           texts: list[str], s: FeatureSettings, first: int) -> HeldOut:
    held = HeldOut.empty(lm.identity.d_model, saes)
    _held_batch(lm, saes, means, texts, s, held, first)
    return held


def _pieces(lm, saes, means, texts: list[str], s: FeatureSettings, progress: Progress,
            desc: str, own: Callable[[list], list]) -> list[tuple[int, HeldOut]]:
    """``(batch index, piece)`` for the batches ``own`` picks out of all of them."""
    chunks = own(list(enumerate(batched(texts, s.batch_size))))
    return [(n, _piece(lm, saes, means, list(chunk), s, n * s.batch_size))
            for n, chunk in progress.track(chunks, total=len(chunks), desc=desc)]


@torch.no_grad()
def heldout_pass(lm: LoadedModel, saes: dict[int, SparseAutoencoder],
                 means: dict[int, Tensor], texts: list[str], s: FeatureSettings,
                 progress: Progress, desc: str) -> HeldOut:
    """Every batch of ``texts`` in this process, merged."""
    pieces = _pieces(lm, saes, means, texts, s, progress, desc, list)
    return merge(HeldOut.empty(lm.identity.d_model, saes), [p for _, p in pieces])


# --------------------------------------------------------------------------- attribution
def _grad_leaf(store: dict[int, Tensor], layer: int) -> Callable[[Tensor], Tensor]:
    def edit(h: Tensor) -> Tensor:
        # The first edited block starts the graph (the model's weights are frozen); later ones
        # already depend on it and only need to keep their gradient.
        if h.requires_grad:
            h.retain_grad()
        else:
            h = h.detach().requires_grad_(True)
        store[layer] = h
        return h

    return edit


def _attr_piece(lm: LoadedModel, saes: dict[int, SparseAutoencoder], texts: list[str],
                s: FeatureSettings) -> tuple[dict[int, Tensor], int]:
    """Summed ``a_j * (W_dec[j] . d log p / d h)`` per latent over one batch, and its tokens."""
    enc = tokenize(lm, texts, s.max_length)
    mask, loss_mask = _masks(lm, enc)
    store: dict[int, Tensor] = {}
    with torch.enable_grad(), edit_blocks(lm.blocks, {i: _grad_leaf(store, i) for i in saes}):
        (-_nll(lm, enc, loss_mask)).backward()
    totals = {}
    for i, sae in saes.items():
        where = mask.to(store[i].device)
        grad, x = store[i].grad[where].float(), store[i].detach()[where].float()
        vals, idx = sae.encode(x.to(sae.W_enc.device))
        proj = (sae.W_dec[idx] * grad.to(sae.W_dec.device)[:, None, :]).sum(-1)
        totals[i] = torch.zeros(sae.cfg.n_latents).index_add_(
            0, idx.reshape(-1).cpu(), (vals * proj).reshape(-1).cpu())
    return totals, int(mask.sum())


def _attr_mean(pieces: list[tuple[dict[int, Tensor], int]]) -> dict[int, Tensor]:
    n_tokens = max(sum(n for _, n in pieces), 1)
    return {i: sum(t[i] for t, _ in pieces) / n_tokens for i in pieces[0][0]} if pieces else {}


def attribution(lm: LoadedModel, saes: dict[int, SparseAutoencoder], texts: list[str],
                s: FeatureSettings) -> dict[int, Tensor]:
    """Mean over forget tokens of ``a_j * (W_dec[j] . d log p(forget) / d h)`` per latent."""
    return _attr_mean([_attr_piece(lm, saes, list(c), s) for c in batched(texts, s.batch_size)])


# --------------------------------------------------------------------------- shared entry
def measure(lm: LoadedModel, saes: dict[int, SparseAutoencoder], means: dict[int, Tensor],
            heldout: dict[str, list[str]], s: FeatureSettings, progress: Progress
            ) -> tuple[dict[str, HeldOut], dict[int, Tensor]] | None:
    """Held-out sets and attribution (when asked), batches shared among processes.

    Rank 0 gets the merged result, identical to one process's; the others get None.
    """
    mine = {name: _pieces(lm, saes, means, texts, s, progress, f"held-out {name}", shard)
            for name, texts in heldout.items()}
    attr = []
    if s.grad_attribution:
        chunks = shard(list(enumerate(batched(heldout["forget"], s.batch_size))))
        attr = [(n, _attr_piece(lm, saes, list(c), s)) for n, c in chunks]
    parts = gather_to_main((mine, attr))
    if parts is None:
        return None
    empty = HeldOut.empty(lm.identity.d_model, saes)
    held = {name: merge(empty, [p for _, p in sorted((x for m, _ in parts for x in m[name]),
                                                     key=lambda x: x[0])])
            for name in heldout}
    ordered = sorted((x for _, a in parts for x in a), key=lambda x: x[0])
    return held, _attr_mean([p for _, p in ordered])
