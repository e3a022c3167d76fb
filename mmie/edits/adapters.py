"""Trainable edits of a loaded model, and their artifacts: LoRA (through PEFT) and ReFT (hooks).

An :class:`Adapter` never replaces ``lm.model``. PEFT injects LoRA layers into the model's own
modules, so ``lm.model``'s forward and ``generate`` see them; ReFT interventions act only inside
:meth:`Adapter.edits`, through block-output hooks (:func:`mmie.core.hooks.edit_blocks`). Either way
the frozen base model is still there to serve as the reference, with no second copy in memory:
:meth:`Adapter.reference` runs LoRA models under PEFT's ``disable_adapter()`` and ReFT models
without the hooks. :meth:`Adapter.remove` takes injected LoRA layers out again (PEFT ``unload``
without merging), so ``lm.model`` is the plain model it was before.

Artifact layout (kind ``adapter``): LoRA writes PEFT's own ``adapter_config.json`` and
``adapter_model.safetensors`` (``save_pretrained``); ReFT writes a tensor file ``reft`` whose
keys are ``layer{i}.<state-dict key of the intervention>`` (see :mod:`mmie.edits.reft`). The
manifest config holds the :class:`AdapterSpec` under ``adapter``. :func:`load_adapter` compares
every tensor name and shape with what the spec and the model imply *before* building anything and
names each missing, unexpected or misshapen key.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmie.core.artifacts import Artifact, load, safetensors_header
from mmie.core.errors import ArtifactError, ModelError
from mmie.core.hooks import edit_blocks
from mmie.core.models import LoadedModel, unwrap
from mmie.core.registry import Registry
from mmie.edits.reft import GatedIntervention, ReftConfig, build_intervention, intervention_shapes

# Attention and MLP projections of Llama / Qwen2 / Gemma / Mistral blocks.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterSpec:
    """What to attach, independent of training.

    method: a name in :data:`METHODS` (``lora``, ``reft``, ``glora``: LoRA behind a language
        gate, :mod:`mmie.edits.glora`, or ``nrows``: deltas on selected MLP neurons only,
        :mod:`mmie.edits.nrows`).
    layers: decoder-block indices that get an edit (LoRA: the blocks whose projections are
        adapted; ReFT: the blocks whose output hidden state is edited).
    rank: LoRA rank, or the width of the ReFT subspace.
    alpha: LoRA scaling numerator (the update is scaled by alpha / rank); unused by ReFT.
    target_modules: LoRA: names of the linear layers to adapt inside each block.
    reft_kind: ReFT intervention (``lowrank`` or ``loreft``, see :mod:`mmie.edits.reft`).
    gate: None, or ``grun``: a learned per-token gate in front of the ReFT edit.
    gate_hidden: hidden width of the gate MLP.
    gate_probe: ``glora``: the ``langgate`` artifact the new edit copies its gate from (read only
        when the edit is created; a saved edit carries its own copy).
    neurons: ``nrows``: the ``neurons`` mask artifact whose selected neurons the edit may
        change (read only when the edit is created; a saved edit records the neuron ids).
    """

    method: str
    layers: tuple[int, ...]
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    reft_kind: str = "lowrank"
    gate: str | None = None
    gate_hidden: int = 16
    gate_probe: str | None = None
    neurons: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(sorted({int(i) for i in self.layers})))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.method not in METHODS:
            raise ValueError(f"method '{self.method}' not in {', '.join(sorted(METHODS))}")
        if not self.layers or min(self.layers) < 0:
            raise ValueError(f"layers must be non-empty block indices >= 0, got {self.layers}")
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"rank must be >= 1 and alpha > 0, got {self.rank}, {self.alpha}")
        if self.method in ("lora", "glora") and (self.gate or not self.target_modules):
            raise ValueError("LoRA needs target modules and takes no gate (the gate is ReFT's)")
        if self.gate_probe and self.method != "glora":
            raise ValueError("a language gate (gate_probe) is read by --method glora only")
        if self.neurons and self.method != "nrows":
            raise ValueError("a neurons mask (neurons) is read by --method nrows only")
        if self.method == "reft":
            self.reft_config()  # validates kind, gate and gate_hidden

    def reft_config(self) -> ReftConfig:
        return ReftConfig(kind=self.reft_kind, rank=self.rank, gate=self.gate,
                          gate_hidden=self.gate_hidden)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AdapterSpec:
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ArtifactError(f"adapter spec has unknown fields: {', '.join(unknown)}")
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"invalid adapter spec in the manifest: {exc}") from exc


@dataclass
class Payload:
    """What :func:`mmie.core.artifacts.save` needs to store an adapter."""

    tensors: dict[str, dict[str, Tensor]]
    writer: Callable[[Path], None] | None = None


class Adapter:
    """Base class; subclasses register in :data:`METHODS`."""

    method: ClassVar[str]
    default_lr: ClassVar[float]

    def __init__(self, lm: LoadedModel, spec: AdapterSpec) -> None:
        self.lm, self.spec = lm, spec
        self.source: Artifact | None = None  # the artifact it was loaded from, if any

    @classmethod
    def create(cls, lm: LoadedModel, spec: AdapterSpec) -> Adapter:
        """A fresh, trainable edit (initialised from the global torch RNG: seed before)."""
        raise NotImplementedError

    @classmethod
    def from_artifact(cls, lm: LoadedModel, artifact: Artifact, spec: AdapterSpec) -> Adapter:
        raise NotImplementedError

    def trainable(self) -> dict[str, nn.Parameter]:
        """Trainable parameters under stable names, in a fixed order (checkpoints, optimizer)."""
        raise NotImplementedError

    @contextmanager
    def edits(self) -> Iterator[dict[int, Tensor]]:
        """Forward passes inside see the edited model; yields {layer: gate values} if gated."""
        yield {}

    def reference(self):
        """Forward passes inside see the frozen base model."""
        return nullcontext()

    def payload(self) -> Payload:
        raise NotImplementedError

    def unchanged(self, sequences: Sequence[Sequence[int]]) -> list[bool]:
        """Per token sequence: True when the edit provably leaves every output of the model on
        it as the base model has it (whatever its trained weights). Validation scores such a
        sequence once instead of every time. Default: never."""
        return [False] * len(sequences)

    def remove(self) -> None:
        """Take the edit out of ``lm.model`` (idempotent)."""

    def load_trainable(self, tensors: dict[str, Tensor]) -> None:
        """Copy checkpointed tensors into :meth:`trainable`, refusing any name or shape drift."""
        params = self.trainable()
        check_names_shapes("checkpoint", {k: tuple(v.shape) for k, v in tensors.items()},
                           {k: tuple(p.shape) for k, p in params.items()})
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(tensors[name])

    def load_frozen(self, tensors: dict[str, Tensor]) -> None:
        """:meth:`load_trainable`, then freeze: how a saved edit is applied."""
        self.load_trainable(tensors)
        for param in self.trainable().values():
            param.requires_grad_(False)


METHODS: Registry[type[Adapter]] = Registry("adapter method", tag="method")
register_method = METHODS.decorator


def check_names_shapes(where: str, found: dict[str, tuple], expected: dict[str, tuple]) -> None:
    """Refuse a tensor set whose names or shapes differ from ``expected``, naming each one."""
    problems = []
    if missing := sorted(set(expected) - set(found)):
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected := sorted(set(found) - set(expected)):
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    problems += [f"{k}: expected shape {list(expected[k])}, found {list(found[k])}"
                 for k in sorted(set(found) & set(expected))
                 if tuple(found[k]) != tuple(expected[k])]
    if problems:
        raise ArtifactError(f"{where}: " + "; ".join(problems))


def check_layers(lm: LoadedModel, layers) -> None:
    if bad := [i for i in layers if not 0 <= i < lm.n_layers]:
        raise ValueError(f"layers {bad} out of range: {lm.identity.name} has {lm.n_layers} "
                         f"blocks (0..{lm.n_layers - 1})")


def _block_prefix(lm: LoadedModel) -> str:
    """Dotted name of the block list inside the plain model (e.g. ``model.layers``)."""
    base = unwrap(lm.model)
    names = {id(module): name for name, module in base.named_modules()}
    return names[id(lm.blocks)]


def block_linears(lm: LoadedModel, spec: AdapterSpec) -> dict[tuple[int, str], nn.Linear]:
    """``(block, dotted name inside it)`` -> linear layer for every target of the chosen blocks
    (LoRA through PEFT here, gated LoRA through hooks in :mod:`mmie.edits.glora`)."""
    found, hits = {}, set()
    for i in spec.layers:
        for sub, module in lm.blocks[i].named_modules():
            leaf = sub.rsplit(".", 1)[-1]
            if leaf in spec.target_modules and isinstance(module, nn.Linear):
                found[(i, sub)] = module
                hits.add(leaf)
    if missing := [t for t in spec.target_modules if t not in hits]:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in lm.blocks[spec.layers[0]].named_modules()
                        if isinstance(m, nn.Linear)})
        raise ModelError(f"no linear layer named {', '.join(missing)} in the chosen blocks of "
                         f"{lm.identity.name}; its block linears: {', '.join(names)}")
    return found


def _lora_modules(lm: LoadedModel, spec: AdapterSpec) -> dict[str, nn.Linear]:
    """Full module name -> linear layer for every LoRA target of the chosen blocks."""
    prefix = _block_prefix(lm)
    return {f"{prefix}.{i}.{sub}": m for (i, sub), m in block_linears(lm, spec).items()}


def lora_shapes(lm: LoadedModel, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    """Key -> shape of PEFT's ``adapter_model.safetensors`` for ``spec`` on this model."""
    shapes = {}
    for name, linear in _lora_modules(lm, spec).items():
        key = f"base_model.model.{name}"
        shapes[f"{key}.lora_A.weight"] = (spec.rank, linear.in_features)
        shapes[f"{key}.lora_B.weight"] = (linear.out_features, spec.rank)
    return shapes


@register_method("lora")
class LoraAdapter(Adapter):
    """LoRA on the chosen blocks' projections via PEFT (injected into ``lm.model`` in place)."""

    default_lr = 5e-4

    def __init__(self, lm: LoadedModel, spec: AdapterSpec, peft_model) -> None:
        super().__init__(lm, spec)
        self.peft_model = peft_model

    @classmethod
    def peft_config(cls, lm: LoadedModel, spec: AdapterSpec):
        from peft import LoraConfig

        return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, bias="none",
                          target_modules=list(spec.target_modules),
                          layers_to_transform=list(spec.layers),
                          layers_pattern=_block_prefix(lm).rsplit(".", 1)[-1])

    @classmethod
    def create(cls, lm: LoadedModel, spec: AdapterSpec) -> LoraAdapter:
        from peft import get_peft_model

        check_layers(lm, spec.layers)
        _lora_modules(lm, spec)  # a clear error for a missing target before PEFT's own
        return cls(lm, spec, get_peft_model(lm.model, cls.peft_config(lm, spec)))

    @classmethod
    def from_artifact(cls, lm: LoadedModel, artifact: Artifact, spec: AdapterSpec) -> LoraAdapter:
        from peft import PeftModel

        check_layers(lm, spec.layers)
        _check_peft_config(artifact, spec)
        header = safetensors_header(artifact.path / PEFT_WEIGHTS)
        check_names_shapes(f"{artifact.path / PEFT_WEIGHTS}",
                           {k: tuple(v["shape"]) for k, v in header.items()},
                           lora_shapes(lm, spec))
        return cls(lm, spec, PeftModel.from_pretrained(lm.model, str(artifact.path)))

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.peft_model.named_parameters() if "lora_" in n}

    def reference(self):
        return self.peft_model.disable_adapter()

    def payload(self) -> Payload:
        return Payload({}, writer=lambda tmp: self.peft_model.save_pretrained(str(tmp)))

    def remove(self) -> None:
        if self.peft_model is not None:
            self.peft_model.unload()  # restores the original Linear modules, unmerged
            self.peft_model = None


def _check_peft_config(artifact: Artifact, spec: AdapterSpec) -> None:
    """The PEFT config in the folder must say what the manifest says."""
    try:
        saved = json.loads(artifact.read_text(PEFT_CONFIG))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{artifact.path}: LoRA adapter without {PEFT_CONFIG}") from exc
    expected = {"r": spec.rank, "lora_alpha": spec.alpha,
                "target_modules": sorted(spec.target_modules),
                "layers_to_transform": list(spec.layers)}
    found = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
             "target_modules": sorted(saved.get("target_modules") or []),
             "layers_to_transform": saved.get("layers_to_transform")}
    if diff := [k for k in expected if expected[k] != found[k]]:
        raise ArtifactError(f"{artifact.path / PEFT_CONFIG}: " + "; ".join(
            f"{k}: manifest says {expected[k]!r}, PEFT config says {found[k]!r}" for k in diff))


@register_method("reft")
class ReftAdapter(Adapter):
    """ReFT interventions on the chosen blocks' output hidden states (hooks, fp32 weights)."""

    default_lr = 2e-3

    def __init__(self, lm: LoadedModel, spec: AdapterSpec, modules: nn.ModuleDict) -> None:
        super().__init__(lm, spec)
        self.modules = modules

    @classmethod
    def create(cls, lm: LoadedModel, spec: AdapterSpec) -> ReftAdapter:
        check_layers(lm, spec.layers)
        config, d = spec.reft_config(), lm.identity.d_model
        modules = nn.ModuleDict({f"layer{i}": build_intervention(config, d).to(lm.block_device(i))
                                 for i in spec.layers})
        return cls(lm, spec, modules.eval())

    @classmethod
    def from_artifact(cls, lm: LoadedModel, artifact: Artifact, spec: AdapterSpec) -> ReftAdapter:
        check_layers(lm, spec.layers)
        found = {k: tuple(v["shape"]) for k, v in artifact.manifest["tensors"].get("reft",
                                                                                   {}).items()}
        check_names_shapes(f"{artifact.path}/reft.safetensors", found, reft_shapes(lm, spec))
        adapter = cls.create(lm, spec)
        state = artifact.tensors("reft")
        adapter.modules.load_state_dict(state, strict=True)
        for p in adapter.modules.parameters():
            p.requires_grad_(False)
        return adapter

    def trainable(self) -> dict[str, nn.Parameter]:
        # raw parameters (LoReFT's Householder factors, not R): bit-exact checkpoints
        return dict(self.modules.named_parameters())

    @contextmanager
    def edits(self) -> Iterator[dict[int, Tensor]]:
        gates: dict[int, Tensor] = {}
        fns = {i: _edit_fn(self.modules[f"layer{i}"], gates, i) for i in self.spec.layers}
        with edit_blocks(self.lm.blocks, fns):
            yield gates

    def payload(self) -> Payload:
        return Payload({"reft": {k: v.detach() for k, v in self.modules.state_dict().items()}})


def reft_shapes(lm: LoadedModel, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    per_layer = intervention_shapes(spec.reft_config(), lm.identity.d_model)
    return {f"layer{i}.{k}": tuple(v) for i in spec.layers for k, v in per_layer.items()}


def _edit_fn(module: nn.Module, gates: dict[int, Tensor], layer: int) -> Callable:
    if not isinstance(module, GatedIntervention):
        return module

    def gated(hidden: Tensor) -> Tensor:
        edited, sigma = module.forward_with_gate(hidden)
        gates[layer] = sigma  # kept for the gate loss of this forward pass
        return edited

    return gated


def middle_layers(n_layers: int, count: int = 3) -> list[int]:
    start = max(0, (n_layers - count) // 2)
    return list(range(start, min(n_layers, start + count)))


# Blocks edited when no layers artifact is given, per method (scrub: mmie.edits.interventions;
# glora keeps those after its gate's block).
DEFAULT_LAYERS: dict[str, Callable[[int], list[int]]] = {
    "lora": lambda n: list(range(n)), "glora": lambda n: list(range(n)),
    "nrows": lambda n: list(range(n)), "reft": middle_layers,
    "scrub": middle_layers}


def load_adapter(path: Path | str, lm: LoadedModel) -> Adapter:
    """Open an ``adapter`` artifact made for ``lm``'s base model and attach it (frozen).

    Refuses another base model, and any key or shape that differs from what the recorded
    spec implies on this model, before building the edit. LoRA layers are live in ``lm.model``
    from here until :meth:`Adapter.remove`; ReFT edits apply inside :meth:`Adapter.edits`.
    """
    artifact = load(path, kind="adapter", model=lm.identity)
    if "adapter" not in artifact.config:
        raise ArtifactError(f"{artifact.path}: manifest config has no 'adapter' spec")
    spec = AdapterSpec.from_dict(artifact.config["adapter"])
    # building draws a throw-away random init: keep the caller's RNG stream (sampling) intact
    with torch.random.fork_rng(devices=[]):
        adapter = METHODS[spec.method].from_artifact(lm, artifact, spec)
    adapter.source = artifact
    return adapter
