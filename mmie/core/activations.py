"""Hidden states of many layers in one pass: decoder only, stopped after the deepest layer.

No logits are computed (for a 262k-token vocabulary they would cost more than the decoder).
Texts are run sorted by length to cut padding; results come back in the input order, so
line-aligned forget/retain files stay paired. The BOS position is left out of every statistic:
its activations are outliers (an attention sink) that would dominate means and SAEs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mmie.core import profile
from mmie.core.hooks import capture_blocks, run_until_stop
from mmie.core.models import LoadedModel, get_decoder, input_device
from mmie.core.progress import SILENT, Progress


@dataclass
class Batch:
    """One forward pass: which texts, their tokens, the real-token mask, per-layer states."""

    indices: list[int]
    input_ids: torch.Tensor        # [B, T] on CPU
    mask: torch.Tensor             # [B, T] bool on CPU: real tokens, BOS excluded
    states: dict[int, torch.Tensor]  # layer -> [B, T, d] float32 on CPU


def tokenize(lm: LoadedModel, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    return lm.tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)


def real_token_mask(lm: LoadedModel, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = enc["attention_mask"].bool()
    bos = lm.tokenizer.bos_token_id
    if bos is not None:
        mask &= enc["input_ids"] != bos
    return mask


def _length_order(lm: LoadedModel, texts: Sequence[str], max_length: int) -> list[int]:
    lengths = [len(ids) for ids in lm.tokenizer(list(texts), truncation=True,
                                               max_length=max_length)["input_ids"]]
    return sorted(range(len(texts)), key=lambda i: lengths[i])


@torch.inference_mode()
def iter_batches(lm: LoadedModel, texts: Sequence[str], layers: Sequence[int], *,
                 max_length: int = 128, batch_size: int = 8, sort: bool = True,
                 progress: Progress = SILENT, desc: str = "activations") -> Iterator[Batch]:
    """Yield one :class:`Batch` per forward pass over the decoder body."""
    order = _length_order(lm, texts, max_length) if sort else list(range(len(texts)))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    body, device = get_decoder(lm.model), input_device(lm.model)
    for idx in progress.track(chunks, total=len(chunks), desc=desc):
        enc = tokenize(lm, [texts[i] for i in idx], max_length)
        with capture_blocks(lm.blocks, layers, stop_after_last=True) as store:
            run_until_stop(lambda enc=enc: body(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device), use_cache=False))
        states = {layer: store[layer].float().cpu() for layer in layers}
        yield Batch(idx, enc["input_ids"], real_token_mask(lm, enc), states)


@dataclass
class Harvest:
    """Per-text mean-pooled states and a bounded random sample of token states, per layer."""

    layers: list[int]
    pooled: dict[int, torch.Tensor]       # layer -> [n_texts, d]
    tokens: dict[int, torch.Tensor]       # layer -> [m, d], m <= token_sample
    token_text: torch.Tensor              # [m] index of the text each sampled token came from
    n_tokens: torch.Tensor                # [n_texts] real tokens per text


class _TokenReservoir:
    """Uniform sample of at most ``capacity`` tokens from a stream (priority sampling)."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.gen = torch.Generator().manual_seed(seed)
        self.keys = torch.empty(0)
        self.text = torch.empty(0, dtype=torch.long)
        self.rows: dict[int, torch.Tensor] = {}

    def add(self, batch: Batch) -> None:
        b, t = torch.nonzero(batch.mask, as_tuple=True)
        keys = torch.cat([self.keys, torch.rand(len(b), generator=self.gen)])
        keep = torch.topk(keys, min(self.capacity, len(keys))).indices
        text = torch.cat([self.text, torch.tensor(batch.indices)[b]])
        for layer, states in batch.states.items():
            old = self.rows.get(layer, states.new_empty(0, states.shape[-1]))
            self.rows[layer] = torch.cat([old, states[b, t]])[keep]
        self.keys, self.text = keys[keep], text[keep]


@profile.phase("harvest")
def harvest(lm: LoadedModel, texts: Sequence[str], layers: Sequence[int], *,
            max_length: int = 128, batch_size: int = 8, token_sample: int = 2048, seed: int = 0,
            progress: Progress = SILENT, desc: str = "activations") -> Harvest:
    """Mean-pool every listed layer over real tokens, and keep a token sample (see module doc)."""
    layers = sorted(set(int(x) for x in layers))
    pooled = {layer: torch.zeros(len(texts), lm.identity.d_model) for layer in layers}
    n_tokens = torch.zeros(len(texts), dtype=torch.long)
    reservoir = _TokenReservoir(token_sample, seed)
    for batch in iter_batches(lm, texts, layers, max_length=max_length, batch_size=batch_size,
                              progress=progress, desc=desc):
        weights = batch.mask.float()
        counts = weights.sum(1).clamp_min(1)
        for layer, states in batch.states.items():
            pooled[layer][batch.indices] = (states * weights[..., None]).sum(1) / counts[:, None]
        n_tokens[batch.indices] = batch.mask.sum(1)
        if token_sample:
            reservoir.add(batch)
    tokens = {layer: reservoir.rows.get(layer, torch.empty(0, lm.identity.d_model))
              for layer in layers}
    return Harvest(layers, pooled, tokens, reservoir.text, n_tokens)
