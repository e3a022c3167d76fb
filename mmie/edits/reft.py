"""ReFT-style low-rank interventions on one layer's hidden state, as plain ``nn.Module`` s.

Each module maps a hidden state ``h [..., d]`` to an edited one of the same shape and dtype;
attaching it to a decoder block (hooks) is someone else's job. Kinds (``intervention_kinds()``):

- ``lowrank``: ``h + B(A(h))`` with ``A: d -> r``, ``B: r -> d`` (with bias); B starts at zero,
  so a new edit is the identity.
- ``loreft``: LoReFT, ``h + R^T (W h + b - R h)`` with ``R [r, d]`` kept orthonormal-rowed by
  ``torch.nn.utils.parametrizations.orthogonal``; W starts equal to R and b at zero, so a new
  edit is the identity too.

An optional gate (``gates()``: ``grun``) scales the edit per token:
``h + sigma(h) * edit(h)``, with ``sigma`` from a small MLP and :func:`gate_loss` teaching it to
fire on forget tokens only. Dropout, when set, acts on the rank-r code during training.

State-dict keys (stable, independent of torch's parametrization internals; ``d`` = d_model,
``r`` = rank, ``g`` = gate_hidden):

- ``lowrank``: ``down.weight [r, d]`` (A), ``up.weight [d, r]`` (B), ``up.bias [d]``
- ``loreft``: ``rotation [r, d]`` (R itself), ``proj.weight [r, d]`` (W), ``proj.bias [r]`` (b)
- gated: the edit's keys prefixed ``edit.``, plus ``gate.hidden.weight [g, d]``,
  ``gate.hidden.bias [g]``, ``gate.out.weight [1, g]``, ``gate.out.bias [1]``

:func:`intervention_shapes` returns exactly these, so a loader can check a file before building.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from mmie.core.registry import Registry

# how far R R^T may stray from I in a loaded file before we call it corrupt, not rounding
_ORTHONORMAL_TOL = 1e-4
_INTERVENTIONS: Registry[type[Intervention]] = Registry("intervention", tag="kind")
_GATES: Registry[type[nn.Module]] = Registry("ReFT gate", tag="kind")


@dataclass(frozen=True)
class ReftConfig:
    kind: str = "lowrank"  # a registered intervention: "lowrank" or "loreft"
    rank: int = 4  # r: width of the edited subspace, 1 <= r <= d_model
    gate: str | None = None  # None: edit every token; "grun": learned per-token gate
    gate_hidden: int = 16  # hidden width of the gate MLP (used only with a gate)
    dropout: float = 0.0  # dropout probability on the rank-r code, in [0, 1)

    def __post_init__(self):
        _check_choice("kind", self.kind, _INTERVENTIONS)
        if self.gate is not None:
            _check_choice("gate", self.gate, _GATES)
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.gate_hidden < 1:
            raise ValueError(f"gate_hidden must be >= 1, got {self.gate_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _check_choice(field: str, value: str, registry: Registry) -> None:
    if value not in registry:
        raise ValueError(f"{field} must be one of {', '.join(sorted(registry))}; got {value!r}")


def _check_width(config: ReftConfig, d_model: int) -> None:
    if not 1 <= config.rank <= d_model:
        raise ValueError(f"rank {config.rank} must be between 1 and d_model ({d_model})")


register_intervention = _INTERVENTIONS.decorator
register_gate = _GATES.decorator


def intervention_kinds() -> list[str]:
    return sorted(_INTERVENTIONS)


def gates() -> list[str]:
    return sorted(_GATES)


class Intervention(nn.Module):
    """Base class: ``forward(h) = h + delta(h)``, computed in the module's dtype."""

    kind: ClassVar[str]

    def delta(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    @classmethod
    def build(cls, config: ReftConfig, d_model: int) -> Intervention:
        raise NotImplementedError

    @staticmethod
    def shapes(config: ReftConfig, d_model: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, h: Tensor) -> Tensor:
        # the model may run in bf16 while the edit trains in fp32: edit in ours, return theirs
        return h + self.delta(h.to(self._dtype())).to(h.dtype)


@register_intervention("lowrank")
class LowRankEdit(Intervention):
    """``h + B(A(h))``; zero-initialised B makes a fresh edit the identity."""

    def __init__(self, d_model: int, rank: int, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=False)  # A
        self.up = nn.Linear(rank, d_model)  # B
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def delta(self, h: Tensor) -> Tensor:
        return self.up(self.dropout(self.down(h)))

    @classmethod
    def build(cls, config: ReftConfig, d_model: int) -> LowRankEdit:
        return cls(d_model, config.rank, config.dropout)

    @staticmethod
    def shapes(config: ReftConfig, d_model: int) -> dict[str, tuple[int, ...]]:
        r = config.rank
        return {"down.weight": (r, d_model), "up.weight": (d_model, r), "up.bias": (d_model,)}


# torch's own state for R: the free tensor and the base of the trivialization
_ROTATION_STATE = "rotate.parametrizations."


@register_intervention("loreft")
class LoReFT(Intervention):
    """``h + R^T (W h + b - R h)``: replaces h's coordinates in the row space of R (orthonormal
    rows) by the learned ``W h + b``, leaving the orthogonal complement untouched."""

    def __init__(self, d_model: int, rank: int, dropout: float = 0.0):
        super().__init__()
        # Cayley map around a stored base: any value of the free tensor gives orthonormal rows.
        # (torch's Householder map reads +-1 signs off the free tensor's diagonal with .int(),
        # so AdamW's weight decay zeroes R after one step.)
        self.rotate = orthogonal(nn.Linear(d_model, rank, bias=False), orthogonal_map="cayley")
        self.proj = nn.Linear(d_model, rank)  # W, b
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            self.proj.weight.copy_(self.rotate.weight)
            self.proj.bias.zero_()
        self.register_state_dict_post_hook(_export_rotation)
        self.register_load_state_dict_pre_hook(_import_rotation)

    @property
    def rotation(self) -> Tensor:
        """R, ``[rank, d_model]`` with orthonormal rows."""
        return self.rotate.weight

    def delta(self, h: Tensor) -> Tensor:
        rotation = self.rotation
        code = self.proj(h) - h @ rotation.T
        return self.dropout(code) @ rotation

    @classmethod
    def build(cls, config: ReftConfig, d_model: int) -> LoReFT:
        return cls(d_model, config.rank, config.dropout)

    @staticmethod
    def shapes(config: ReftConfig, d_model: int) -> dict[str, tuple[int, ...]]:
        r = config.rank
        return {"rotation": (r, d_model), "proj.weight": (r, d_model), "proj.bias": (r,)}


def _export_rotation(module: LoReFT, state: dict, prefix: str, local_metadata: dict) -> None:
    """Save R itself under ``rotation`` instead of torch's parametrization tensors."""
    del local_metadata
    for key in [k for k in state if k.startswith(prefix + _ROTATION_STATE)]:
        del state[key]
    state[prefix + "rotation"] = module.rotation.detach().contiguous()  # safetensors needs it


def _import_rotation(module: LoReFT, state: dict, prefix: str, *args) -> None:
    """Turn a saved ``rotation`` back into the parametrization's own tensors before loading."""
    error_msgs = args[-1]
    rotation = state.pop(prefix + "rotation", None)
    if rotation is None:
        return  # the loader reports the missing key
    problem = _rotation_problem(rotation, tuple(module.rotation.shape))
    if problem:
        error_msgs.append(f"{prefix}rotation: {problem}")
        return
    parametrized = module.rotate.parametrizations.weight
    rotation = rotation.to(parametrized.original.device, parametrized.original.dtype)
    with torch.no_grad():
        # assignment sets the free tensor so the Cayley factor is exactly I, and the base to an
        # orthogonal completion of R computed by QR; writing R itself into the base's first
        # columns makes the loaded R bit-identical to the saved one
        module.rotate.weight = rotation
        parametrized[0].base[:, : rotation.shape[0]] = rotation.T
    state.update(module.rotate.state_dict(prefix=prefix + "rotate."))


def _rotation_problem(rotation: Tensor, expected: tuple[int, ...]) -> str | None:
    if tuple(rotation.shape) != expected:
        return f"expected shape {expected}, found {tuple(rotation.shape)}"
    gram = rotation.double() @ rotation.double().T
    drift = (gram - torch.eye(len(gram), dtype=gram.dtype)).abs().max().item()
    if drift > _ORTHONORMAL_TOL:
        return f"rows are not orthonormal (max |R R^T - I| = {drift:.2g})"
    return None


@register_gate("grun")
class GrunGate(nn.Module):
    """Per-token gate ``sigma(h) = sigmoid(MLP(h))`` in [0, 1], d -> hidden -> 1."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.hidden = nn.Linear(d_model, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, h: Tensor) -> Tensor:
        """``sigma`` with shape ``h.shape[:-1]``."""
        return torch.sigmoid(self.out(F.relu(self.hidden(h))))[..., 0]

    @classmethod
    def build(cls, config: ReftConfig, d_model: int) -> GrunGate:
        return cls(d_model, config.gate_hidden)

    @staticmethod
    def shapes(config: ReftConfig, d_model: int) -> dict[str, tuple[int, ...]]:
        g = config.gate_hidden
        return {
            "hidden.weight": (g, d_model),
            "hidden.bias": (g,),
            "out.weight": (1, g),
            "out.bias": (1,),
        }


class GatedIntervention(nn.Module):
    """``h + sigma(h) * edit.delta(h)``: the edit applies only where the gate fires."""

    def __init__(self, edit: Intervention, gate: nn.Module):
        super().__init__()
        self.edit = edit
        self.gate = gate

    def forward_with_gate(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(edited h, sigma)``: the hook that applies the edit can keep sigma for
        :func:`gate_loss` without a second pass."""
        x = h.to(self.edit._dtype())
        sigma = self.gate(x)
        return h + (sigma[..., None] * self.edit.delta(x)).to(h.dtype), sigma

    def forward(self, h: Tensor) -> Tensor:
        return self.forward_with_gate(h)[0]


def gate_loss(sigma_forget: Tensor, sigma_retain: Tensor) -> Tensor:
    """Binary cross-entropy pushing the gate to 1 on forget tokens and to 0 on retain tokens.

    Each side is averaged over its own tokens before the two are added, so the balance does not
    depend on how many tokens of each kind a batch holds.
    """
    on, off = gate_terms(sigma_forget, sigma_retain)
    return on + off


def gate_terms(sigma_forget: Tensor, sigma_retain: Tensor) -> tuple[Tensor, Tensor]:
    """The two halves of :func:`gate_loss`: mean BCE on forget tokens, mean BCE on retain ones
    (apart, so data-parallel training can weight each by its own token count)."""
    if sigma_forget.numel() == 0 or sigma_retain.numel() == 0:
        raise ValueError("gate_loss needs at least one forget and one retain token")
    on = F.binary_cross_entropy(sigma_forget, torch.ones_like(sigma_forget))
    off = F.binary_cross_entropy(sigma_retain, torch.zeros_like(sigma_retain))
    return on, off


def build_intervention(config: ReftConfig, d_model: int) -> nn.Module:
    """The module ``config`` describes for a hidden state of width ``d_model``."""
    _check_width(config, d_model)
    edit = _INTERVENTIONS[config.kind].build(config, d_model)
    if config.gate is None:
        return edit
    return GatedIntervention(edit, _GATES[config.gate].build(config, d_model))


def intervention_shapes(config: ReftConfig, d_model: int) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of ``build_intervention(config, d_model)``, without building it."""
    _check_width(config, d_model)
    shapes = _INTERVENTIONS[config.kind].shapes(config, d_model)
    if config.gate is None:
        return shapes
    gate_shapes = _GATES[config.gate].shapes(config, d_model)
    return {
        **{f"edit.{k}": v for k, v in shapes.items()},
        **{f"gate.{k}": v for k, v in gate_shapes.items()},
    }
