"""MLP neurons: where they live in each architecture, and what they score on a text set.

A neuron is one channel of the intermediate MLP activation ``X`` that feeds the down
projection (``down_proj`` in Llama / Qwen2 / Gemma 3, ``c_proj`` in GPT-2). Its statistics are
streamed over the real tokens of a set (padding and BOS left out, see
:func:`mmie.core.activations.real_token_mask`):

- ``act_norm``: ``||X_j||_2`` over all real tokens, read by a forward pre-hook on down_proj.
- ``wanda``: the Wanda score of neuron ``j`` as the input column of down_proj,
  ``score_j = sum_i |W_ij| * ||X_j||_2`` (``W`` is ``[d_model, d_ff]``, out x in): the sum of
  Wanda's per-weight scores ``|W_ij| * ||X_j||`` over the column that neuron ``j`` writes through.
- ``<proj>.rows`` for each input projection (``gate_proj``, ``up_proj``; GPT-2 ``c_fc``): the
  Wanda score of the weight row that computes neuron ``j``, ``sum_k |V_jk| * ||h_k||_2``, with
  ``h`` the MLP input (``V`` is ``[d_ff, d_model]``, ``h`` read by a pre-hook on the MLP).
- ``act_prob``: ``P(act_j > 0)``, where ``act`` is the MLP nonlinearity's output
  (``act_fn(gate_proj h)`` in gated MLPs). The down_proj input itself is not used for this: it
  is multiplied by ``up_proj h``, whose sign is symmetric, so every neuron would sit near 0.5.
  This is the quantity LAPE (Tang et al. 2024) measures.

``||X||`` grows with the square root of the token count, so scores are only comparable between
runs over the same texts, tokenizer and ``max_length`` (``compare`` checks this).

:func:`lape_entropy` and :func:`lape_masks` turn per-language ``act_prob`` into LAPE
language-specific neurons (the rule is described in :mod:`mmie.neurons.stage`).

Weights are the *effective* weights the forward pass uses: on a PEFT LoRA layer that is
``W + scaling * B @ A`` for each active, unmerged adapter (a zero-initialised LoRA therefore
scores exactly like the plain model). GPT-2's ``Conv1D`` stores ``[in, out]``; it is transposed
to ``[out, in]`` first so the formulas above hold for every layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmie.core.activations import iter_batches
from mmie.core.errors import MetricError
from mmie.core.hooks import HookSpec, hooked
from mmie.core.models import LoadedModel
from mmie.core.progress import SILENT, Progress
from mmie.edits.neurons import MlpModules, block_mlps, effective_weight


def wanda_columns(weight: Tensor, sumsq: Tensor) -> Tensor:
    """Per input column ``j``: ``sum_i |W_ij| * sqrt(sumsq_j)`` for ``W`` ``[out, in]``."""
    return weight.abs().sum(0) * sumsq.sqrt()


def wanda_rows(weight: Tensor, sumsq: Tensor) -> Tensor:
    """Per output row ``j``: ``sum_k |W_jk| * sqrt(sumsq_k)`` for ``W`` ``[out, in]``."""
    return (weight.abs() * sumsq.sqrt()).sum(1)


@dataclass
class NeuronStats:
    """Sums over the real tokens of one text set, per layer."""

    sumsq: dict[int, Tensor] = field(default_factory=dict)      # [d_ff] sum of X_j^2
    active: dict[int, Tensor] = field(default_factory=dict)     # [d_ff] tokens with act_j > 0
    in_sumsq: dict[int, Tensor] = field(default_factory=dict)   # [d_model] sum of h_k^2
    n_tokens: int = 0

    def add(self, store: dict, mask: Tensor) -> None:
        for (what, layer), value in store.items():
            picked = value[mask.to(value.device)]
            step = ((picked > 0).sum(0) if what == "act" else picked.float().square().sum(0)).cpu()
            bucket = {"x": self.sumsq, "act": self.active, "h": self.in_sumsq}[what]
            bucket[layer] = bucket[layer] + step if layer in bucket else step.double()
        self.n_tokens += int(mask.sum())


def _recorder(store: dict, key: tuple[str, int], pre: bool):
    def hook(module, args, kwargs, *output):
        del module
        if not pre:
            store[key] = output[0].detach()
        else:
            store[key] = (args[0] if args else next(iter(kwargs.values()))).detach()

    return hook


def _hook_specs(mlps: dict[int, MlpModules], store: dict) -> list[HookSpec]:
    specs = []
    for i, mods in mlps.items():
        specs += [HookSpec(mods.down, _recorder(store, ("x", i), True), pre=True, with_kwargs=True),
                  HookSpec(mods.act, _recorder(store, ("act", i), False), with_kwargs=True),
                  HookSpec(mods.mlp, _recorder(store, ("h", i), True), pre=True, with_kwargs=True)]
    return specs


def collect(lm: LoadedModel, texts: Sequence[str], layers: Sequence[int], *,
            max_length: int = 128, batch_size: int = 8, progress: Progress = SILENT,
            desc: str = "neurons") -> NeuronStats:
    """Stream :class:`NeuronStats` over ``texts``; the pass stops after the deepest layer."""
    mlps, store, stats = block_mlps(lm, layers), {}, NeuronStats()
    with hooked(_hook_specs(mlps, store)):
        for batch in iter_batches(lm, texts, [max(layers)], max_length=max_length,
                                  batch_size=batch_size, progress=progress, desc=desc):
            stats.add(store, batch.mask)
            store.clear()
    if stats.n_tokens == 0:
        raise MetricError(f"{desc}: no real tokens to score neurons on")
    return stats


def score_tensors(lm: LoadedModel, stats: NeuronStats, layers: Sequence[int]) -> dict[str, Tensor]:
    """The per-neuron tensors of one set, keyed ``layer{i}.<quantity>`` (module docstring)."""
    out = {}
    for i, mods in block_mlps(lm, layers).items():
        sumsq = stats.sumsq[i].float()
        out[f"layer{i}.act_norm"] = sumsq.sqrt()
        out[f"layer{i}.wanda"] = wanda_columns(effective_weight(mods.down).cpu(), sumsq)
        out[f"layer{i}.act_prob"] = (stats.active[i].double() / stats.n_tokens).float()
        for name, module in mods.rows.items():
            weight = effective_weight(module).cpu()
            out[f"layer{i}.{name}.rows"] = wanda_rows(weight, stats.in_sumsq[i].float())
    return out


def lape_entropy(prob: Tensor) -> Tensor:
    """Entropy over languages (dim 0) of normalised activation probabilities; inf if never on."""
    total = prob.sum(0)
    q = prob / total.clamp_min(1e-30)
    terms = torch.where(q > 0, -q * q.clamp_min(1e-30).log(), torch.zeros_like(q))
    return torch.where(total > 0, terms.sum(0), torch.full_like(total, math.inf))


def lape_masks(prob: Tensor, quantile: float, threshold: float) -> Tensor:
    """``[languages, neurons]`` bool: language-specific neurons active in each language."""
    active = prob > threshold
    entropy = torch.where(active.any(0), lape_entropy(prob), torch.full_like(prob[0], math.inf))
    k = max(1, round(quantile * entropy.numel()))
    picked = torch.sort(entropy, stable=True).indices[:k]
    specific = torch.zeros_like(active[0])
    specific[picked[torch.isfinite(entropy[picked])]] = True
    return active & specific

