"""Neuron-level edits: where MLP neurons live in each architecture, neuron mask artifacts, and
scaling the selected neurons at inference (0 = ablated).

`mmie neurons` (which selects the neurons) and any stage that applies a mask at run time import
this module, so the "how a mask changes a model" code lives in one place.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mmie.core.artifacts import Artifact, ModelIdentity, check_model, content_hash, load
from mmie.core.errors import ArtifactError, ModelError
from mmie.core.hooks import HookSpec, hooked
from mmie.core.models import LoadedModel
from mmie.core.registry import Registry


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


LAYOUTS: Registry[MlpLayout] = Registry("MLP layout")


def register_layout(layout: MlpLayout) -> MlpLayout:
    return LAYOUTS.add(layout.name, layout)


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


# --- scaling at inference -------------------------------------------------------------------------

def _scaler(mask: Tensor, scale: float):
    def hook(module, args):
        del module
        x = args[0]
        factor = torch.where(mask.to(x.device), scale, 1.0).to(x.dtype)
        return (x * factor, *args[1:])

    return hook


@contextmanager
def ablated(lm: LoadedModel, neurons: Path | str | Artifact,
            scale: float | None = None) -> Iterator[dict[int, Tensor]]:
    """Inside, the selected neurons' activations are multiplied by ``scale`` (0 = ablated).

    ``neurons`` is a mask artifact, or an ablation artifact whose recorded scale is used when
    ``scale`` is None. Yields the masks; the hooks are removed on exit, also on error.
    """
    artifact, masks = load_mask(neurons, lm.identity)
    scale = artifact.config.get("scale") if scale is None else scale
    if scale is None:
        raise ValueError(f"{artifact.path} records no scale; pass one")
    mlps = mask_mlps(lm, masks, str(artifact.path))
    specs = [HookSpec(mlps[i].down, _scaler(m, float(scale)), pre=True)
             for i, m in masks.items() if m.any()]
    with hooked(specs):
        yield masks


# --- as an evaluation arm ---------------------------------------------------------------------
# A mask artifact records no scale: as an arm it ablates (0) unless a scale is given; an
# ablation artifact uses the scale it was saved with.

def arm_scale(artifact: Artifact, scale: float | None) -> float:
    """The scale an arm applies: the given one, else the artifact's, else 0 (ablation)."""
    if scale is not None:
        return float(scale)
    recorded = artifact.config.get("scale")
    return 0.0 if recorded is None else float(recorded)


def arm_name(artifact: Artifact, scale: float | None) -> str:
    """``neurons[-exclusive][-refined]-x<scale>``, e.g. ``neurons-exclusive-x0`` for ablated
    exclusive neurons: the scale is part of the arm, since 0.5 and 0 are different edits;
    ``-refined``: kept by their measured effect (`neurons refine`)."""
    exclusive = "-exclusive" if artifact.config.get("exclusive") else ""
    refined = "-refined" if artifact.config.get("refined") else ""
    return f"neurons{exclusive}{refined}-x{arm_scale(artifact, scale):g}"


@contextmanager
def neurons_attached(lm: LoadedModel, path: Path | str,
                     scale: float | None = None) -> Iterator[dict]:
    """:func:`ablated` as an arm of `evaluate`; yields what was applied (path, hash, scale)."""
    artifact = load_role(path, ("mask", "ablation"), lm.identity)
    factor = arm_scale(artifact, scale)
    with ablated(lm, artifact, factor) as masks:
        yield {"path": str(path), "sha256": content_hash(path), "kind": "neurons",
               "role": artifact.config.get("role"), "scale": factor,
               "selected": sum(int(m.sum()) for m in masks.values()),
               "arm": arm_name(artifact, scale)}
