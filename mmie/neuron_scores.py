"""MLP neurons: where they live in each architecture, and what they score on a text set.

A neuron is one channel of the intermediate MLP activation ``X`` that feeds the down
projection (``down_proj`` in Llama / Qwen2 / Gemma 3, ``c_proj`` in GPT-2). Its statistics are
streamed over the real tokens of a set (padding and BOS left out, see
:func:`mmie.activations.real_token_mask`):

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
language-specific neurons (the rule is described in :mod:`mmie.neurons`).

Weights are the *effective* weights the forward pass uses: on a PEFT LoRA layer that is
``W + scaling * B @ A`` for each active, unmerged adapter (a zero-initialised LoRA therefore
scores exactly like the plain model). GPT-2's ``Conv1D`` stores ``[in, out]``; it is transposed
to ``[out, in]`` first so the formulas above hold for every layout.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mmie.activations import iter_batches
from mmie.artifacts import Artifact, ModelIdentity, check_model, load
from mmie.errors import ArtifactError, MetricError, ModelError
from mmie.hooks import HookSpec, hooked
from mmie.models import LoadedModel
from mmie.progress import SILENT, Progress


@dataclass(frozen=True)
class MlpLayout:
    """Child names inside a decoder block for one MLP family.

    mlp: the MLP module. down: the projection whose input columns are the neurons.
    rows: projections whose output rows compute the neurons. act: the nonlinearity module.
    """

    name: str
    mlp: str
    down: str
    rows: tuple[str, ...]
    act: str


LAYOUTS: dict[str, MlpLayout] = {}


def register_layout(layout: MlpLayout) -> MlpLayout:
    if layout.name in LAYOUTS:
        raise ValueError(f"MLP layout '{layout.name}' is already registered")
    LAYOUTS[layout.name] = layout
    return layout


register_layout(MlpLayout("gated", "mlp", "down_proj", ("gate_proj", "up_proj"), "act_fn"))
register_layout(MlpLayout("gpt2", "mlp", "c_proj", ("c_fc",), "act"))


@dataclass
class MlpModules:
    """One block's resolved MLP pieces."""

    mlp: nn.Module
    down: nn.Module
    rows: dict[str, nn.Module]
    act: nn.Module


def _child(module: nn.Module, name: str) -> nn.Module | None:
    found = getattr(module, name, None)
    return found if isinstance(found, nn.Module) else None


def _fits(block: nn.Module, layout: MlpLayout) -> bool:
    mlp = _child(block, layout.mlp)
    return mlp is not None and all(_child(mlp, n) is not None
                                   for n in (layout.down, layout.act, *layout.rows))


def resolve_layout(block: nn.Module) -> MlpLayout:
    """The registered layout this block follows, or an error listing its submodules."""
    for layout in LAYOUTS.values():
        if _fits(block, layout):
            return layout
    names = [name for name, m in block.named_modules() if name and hasattr(m, "weight")]
    raise ModelError(f"cannot find the MLP of {type(block).__name__}: no known layout "
                     f"({', '.join(f'{x.mlp}.{x.down}' for x in LAYOUTS.values())}); modules "
                     f"with weights: {', '.join(names) or 'none'}")


def mlp_modules(block: nn.Module, layout: MlpLayout) -> MlpModules:
    mlp = _child(block, layout.mlp)
    return MlpModules(mlp, _child(mlp, layout.down),
                      {n: _child(mlp, n) for n in layout.rows}, _child(mlp, layout.act))


def block_mlps(lm: LoadedModel, layers: Sequence[int]) -> dict[int, MlpModules]:
    layout = resolve_layout(lm.blocks[layers[0]])
    return {i: mlp_modules(lm.blocks[i], layout) for i in layers}


def is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(getattr(module, "base_layer", module), Conv1D)


def _lora_delta(module: nn.Module) -> Tensor | int:
    """What PEFT adds to the base weight in the forward pass (base layout)."""
    merged = list(getattr(module, "merged_adapters", []))
    if module.disable_adapters:
        # merged deltas are already in the base weight; a disabled forward takes them out
        return -sum(module.get_delta_weight(n).float() for n in merged) if merged else 0
    names = [n for n in module.active_adapters if n in module.lora_A and n not in merged]
    return sum(module.get_delta_weight(n).float() for n in names) if names else 0


def effective_weight(module: nn.Module) -> Tensor:
    """``[out, in]`` float32 weight the forward pass applies (LoRA deltas included)."""
    base = getattr(module, "base_layer", module)
    weight = base.weight.detach().float()
    if hasattr(module, "lora_A"):
        weight = weight + _lora_delta(module)
    return weight.T if is_conv1d(module) else weight


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


_KEY = re.compile(r"^layer(\d+)\.(.+)$")


def split_key(key: str) -> tuple[int, str] | None:
    """``layer{i}.<rest>`` -> ``(i, rest)``; None for other keys."""
    found = _KEY.match(key)
    return (int(found.group(1)), found.group(2)) if found else None


def per_layer(tensors: dict[str, Tensor], quantity: str, where: str = "") -> dict[int, Tensor]:
    """``{layer: tensor}`` for one quantity of a score tensor file."""
    keys = {k: parts for k in tensors if (parts := split_key(k))}
    found = {layer: tensors[k] for k, (layer, rest) in keys.items() if rest == quantity}
    if not found:
        known = sorted({rest for _, rest in keys.values()})
        raise ArtifactError(f"{where}: no '{quantity}' scores (has: {', '.join(known) or 'none'})")
    return dict(sorted(found.items()))



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


# --- neurons artifacts ------------------------------------------------------------------------
# Every `neurons` artifact records config['role']: scores (from `score`), mask (`select`),
# finetune (full fine-tune weights), compare, ablation (a mask plus a scale).
ROLES = ("scores", "mask", "finetune", "compare", "ablation")
MASK_STEM, MASK_KEY = "mask", "selected"


def load_role(path: Path | str | Artifact, roles: Sequence[str],
              model: ModelIdentity | None = None) -> Artifact:
    """A verified ``neurons`` artifact whose role is one of ``roles``."""
    artifact = path if isinstance(path, Artifact) else load(path, kind="neurons", model=model)
    if isinstance(path, Artifact) and model is not None:
        check_model(artifact.path, artifact.model, model)
    role = artifact.config.get("role")
    if role not in roles:
        raise ArtifactError(f"{artifact.path}: neurons artifact of role {role!r}, expected "
                            f"{' or '.join(roles)}")
    return artifact


def load_mask(path: Path | str | Artifact,
              model: ModelIdentity | None = None) -> tuple[Artifact, dict[int, Tensor]]:
    """``{layer: bool[d_ff]}`` of a mask (or ablation) artifact."""
    artifact = load_role(path, ("mask", "ablation"), model)
    masks = per_layer(artifact.tensors(MASK_STEM), MASK_KEY, str(artifact.path))
    return artifact, {i: m.bool() for i, m in masks.items()}


def mask_tensors(masks: dict[int, Tensor]) -> dict[str, dict[str, Tensor]]:
    return {MASK_STEM: {f"layer{i}.{MASK_KEY}": m.bool() for i, m in sorted(masks.items())}}


def mask_mlps(lm: LoadedModel, masks: dict[int, Tensor], where: str) -> dict[int, MlpModules]:
    """The MLPs a mask covers, refusing layers or widths this model does not have."""
    if bad := [i for i in masks if not 0 <= i < lm.n_layers]:
        raise ArtifactError(f"{where}: mask layers {bad} out of range for {lm.identity.name} "
                            f"({lm.n_layers} blocks)")
    mlps = block_mlps(lm, sorted(masks))
    for i, mask in masks.items():
        width = effective_weight(mlps[i].down).shape[1]
        if mask.shape != (width,):
            raise ArtifactError(f"{where}: layer {i} mask has shape {list(mask.shape)}, the "
                                f"model's MLP has {width} neurons")
    return mlps


def mask_counts(masks: dict[int, Tensor]) -> dict:
    total = sum(len(m) for m in masks.values())
    selected = sum(int(m.sum()) for m in masks.values())
    return {"per_layer": {i: int(m.sum()) for i, m in masks.items()}, "selected": selected,
            "neurons": total, "share": selected / total if total else 0.0}
