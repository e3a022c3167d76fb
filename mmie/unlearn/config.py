"""Settings of an `unlearn` run (:class:`UnlearnConfig`) and ``NAME=VALUE`` option parsing.

See :mod:`mmie.unlearn.stage` for what a run does with them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mmie.core import losses
from mmie.core.head_precision import HEAD_DTYPES
from mmie.core.models import ModelSpec
from mmie.edits.adapters import LORA_TARGETS, METHODS, AdapterSpec
from mmie.unlearn.objectives import get_objective, get_retain_loss, objective_names
from mmie.unlearn.validation import ValidationConfig

# every trainable edit (mmie.edits.adapters), and "scrub": a fitted direction, no training
METHOD_NAMES = (*METHODS, "scrub")


@dataclass(frozen=True)
class UnlearnConfig:
    """Settings of one `unlearn` run (one seed).

    forget: text file of the language to forget.
    retain: text files of the languages to keep, one set each (see the module docstring).
    model: which model to load.
    method: ``lora``, ``reft``, ``glora`` or ``nrows`` (:data:`mmie.edits.adapters.METHODS`;
        glora: LoRA behind a language gate, :mod:`mmie.edits.glora`; nrows: deltas on selected
        MLP neurons only, :mod:`mmie.edits.nrows`), or ``scrub`` (no training:
        fit a script-scrub direction per layer, :func:`mmie.edits.interventions.fit_scrub`).
    objective: a registered name (:mod:`mmie.unlearn.objectives`): ``ga``, ``graddiff``, ``npo``...
    objective_options: (name, value) pairs for the objective's config, e.g. ("beta", "0.2").
        RMU's ``layer`` defaults to the deepest edited block (the middle block when every
        block is edited) and its ``seed`` to ``seed``.
    retain_loss: ``kl`` (to the frozen reference) or ``nll``.
    retain_options: (name, value) pairs for the retain loss (``top_k``, ``exact``, ...).
    retain_weights: (set name, weight) pairs; unnamed sets weigh 1 (module docstring).
    layers: a ``layers`` artifact whose ``chosen`` blocks get the edit; None: every block for
        LoRA, the middle three for ReFT and scrub.
    seed: seeds the edit's initialisation, the batch schedule and RMU's direction.
    steps, lr, batch_size: optimizer steps, AdamW learning rate (None: 5e-4 for LoRA, 2e-3 for
        ReFT), texts per forget (and per retain) batch: the global batch, split evenly over the
        processes under a launcher.
    max_length: tokens per text (longer texts are truncated).
    rank, alpha, target_modules: LoRA rank (None: 8 for LoRA, 4 for ReFT), scaling numerator,
        and linear layers adapted inside each chosen block.
    reft_kind, gate, gate_hidden, gate_weight: ReFT intervention (``lowrank``/``loreft``),
        optional ``grun`` gate, its MLP width, and the weight of its loss.
    curriculum: visit forget texts easiest first (module docstring).
    checkpoint_every: steps between checkpoints (0: none).
    max_grad_norm: gradient clipping threshold (global L2 norm).
    field: JSON field / column holding the text.
    max_samples: use at most this many texts per file (None: all).
    chunk_size: tokens per vocabulary chunk in the loss functions (memory vs speed).
    head_dtype: ``fp32`` or ``bf16``: precision of the chunked LM-head matmul
        (:mod:`mmie.core.head_precision`; bf16 keeps the large logits and every reduction fp32).
    retain_pack: join each run of this many consecutive texts of a retain set (and of each
        ``--val-protect`` set) with a newline, a sliding window (1: the texts as given). Why:
        single-sentence retain texts never show the model what follows the end of a sentence,
        and that is where a redirect-trained edit switched Bengali answers to English
        (README, "Selective forgetting"); packed texts put that position under the retain
        loss and the validation rule.
    scrub_whiten: ``--method scrub`` only: LEACE-style whitened erasure instead of an
        orthogonal projection (:mod:`mmie.edits.interventions`).
    alternative: text file line-aligned with ``forget``: what each forget prompt should be
        continued with instead (``redirect``, ``dpo``); None: the fallback of
        :mod:`mmie.unlearn.pairs` (the first retain set's texts).
    gate_probe: ``--method glora`` only (and required there): the ``langgate`` artifact
        (``mmie langgate``) whose gate decides where the edit acts.
    neurons: ``--method nrows`` only (and required there): the ``neurons`` mask artifact
        (``mmie neurons select``) whose neurons alone the edit changes.
    validation: the validation split and the rule that picks the saved checkpoint
        (:mod:`mmie.unlearn.validation`); None: the last step's edit is saved.
    """

    forget: str
    retain: tuple[str, ...]
    model: ModelSpec = ModelSpec()
    method: str = "lora"
    objective: str = "npo"
    objective_options: tuple[tuple[str, str], ...] = ()
    retain_loss: str = "kl"
    retain_options: tuple[tuple[str, str], ...] = ()
    retain_weights: tuple[tuple[str, float], ...] = ()
    layers: str | None = None
    seed: int = 0
    steps: int = 30
    lr: float | None = None
    batch_size: int = 4
    max_length: int = 64
    rank: int | None = None
    alpha: float = 16.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    reft_kind: str = "lowrank"
    gate: str | None = None
    gate_hidden: int = 16
    gate_weight: float = 1.0
    curriculum: bool = False
    checkpoint_every: int = 10
    max_grad_norm: float = 1.0
    field: str = "text"
    max_samples: int | None = None
    chunk_size: int = losses.DEFAULT_CHUNK_SIZE
    scrub_whiten: bool = False
    alternative: str | None = None
    validation: ValidationConfig | None = None
    head_dtype: str = "fp32"
    retain_pack: int = 1
    gate_probe: str | None = None
    neurons: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.validation, dict):  # e.g. read back from a manifest or a TOML file
            object.__setattr__(self, "validation", ValidationConfig(**self.validation))
        if self.validation is not None and self.method == "scrub":
            raise ValueError("--val-* options apply to trained edits (lora, reft), not scrub")
        for name in ("retain", "target_modules", "objective_options", "retain_options",
                     "retain_weights"):
            object.__setattr__(self, name, tuple(tuple(x) if isinstance(x, list) else x
                                                 for x in getattr(self, name)))
        if not self.forget or not self.retain:
            raise ValueError("a forget file and at least one retain file are required")
        if self.method not in METHOD_NAMES:
            raise ValueError(f"method '{self.method}' not in {', '.join(sorted(METHOD_NAMES))}")
        _check_numbers(self)
        if self.retain_pack < 1:
            raise ValueError(f"retain pack must be >= 1, got {self.retain_pack}")
        if self.head_dtype not in HEAD_DTYPES:
            raise ValueError(f"head dtype must be one of {', '.join(HEAD_DTYPES)}, got "
                             f"{self.head_dtype!r}")
        self.set_weights()
        objective = self.build_objective(layer=0)
        self.build_retain_loss()
        if self.alternative and not objective.needs.alternative:
            raise ValueError(f"--alternative is read only by objectives that score an "
                             f"alternative text ({', '.join(alternative_objectives())}), not "
                             f"'{self.objective}'")

    def method_rank(self) -> int:
        return self.rank if self.rank is not None else {"reft": 4}.get(self.method, 8)

    def method_lr(self) -> float:
        return self.lr if self.lr is not None else METHODS[self.method].default_lr

    def set_names(self) -> list[str]:
        return [Path(p).stem for p in self.retain]

    def set_weights(self) -> list[float]:
        """Normalised weight per retain set, in ``retain`` order."""
        raw = [1.0] * len(self.retain)
        for name, weight in self.retain_weights:
            hits = [i for i, p in enumerate(self.retain) if name in (p, Path(p).stem)]
            if not hits:
                raise ValueError(f"retain weight for '{name}': no retain set of that path or "
                                 f"name (sets: {', '.join(self.set_names())})")
            if not float(weight) > 0:
                raise ValueError(f"retain weight for '{name}' must be > 0, got {weight}")
            for i in hits:
                raw[i] = float(weight)
        return [w / sum(raw) for w in raw]

    def build_objective(self, layer: int):
        options = dict(self.objective_options)
        if self.objective == "rmu":
            options = {"layer": str(layer), "seed": str(self.seed), **options}
        kind = get_objective(self.objective).config_class
        return get_objective(self.objective, **parse_options(kind, options))

    def build_retain_loss(self):
        kind = get_retain_loss(self.retain_loss).config_class
        return get_retain_loss(self.retain_loss, **parse_options(kind,
                                                                 dict(self.retain_options)))

    def spec(self, layers: Sequence[int]) -> AdapterSpec:
        return AdapterSpec(method=self.method, layers=tuple(layers), rank=self.method_rank(),
                           alpha=self.alpha, target_modules=self.target_modules,
                           reft_kind=self.reft_kind, gate=self.gate, gate_hidden=self.gate_hidden,
                           gate_probe=self.gate_probe, neurons=self.neurons)

    def to_dict(self) -> dict:
        return asdict(self)

    def check_processes(self, size: int) -> None:
        """Under a launcher every process takes an equal share of each step's batch."""
        if self.method != "scrub" and self.batch_size % size:
            raise ValueError(f"batch-size {self.batch_size} does not split evenly over {size} "
                             f"processes; use a multiple of {size} (each process takes "
                             f"batch-size / {size} texts of every step's batch)")


def alternative_objectives() -> list[str]:
    return [n for n in objective_names() if get_objective(n).needs.alternative]


def _check_numbers(c: UnlearnConfig) -> None:
    minimums = {"steps": 1, "batch_size": 1, "max_length": 2, "checkpoint_every": 0,
                "chunk_size": 1, "gate_hidden": 1}
    for name, low in minimums.items():
        if getattr(c, name) < low:
            raise ValueError(f"{name.replace('_', '-')} must be >= {low}, got {getattr(c, name)}")
    for name in ("lr", "alpha", "max_grad_norm"):
        value = getattr(c, name)
        if value is not None and not value > 0:
            raise ValueError(f"{name.replace('_', '-')} must be > 0, got {value}")
    if c.gate_weight < 0:
        raise ValueError(f"gate-weight must be >= 0, got {c.gate_weight}")
    if c.rank is not None and c.rank < 1:
        raise ValueError(f"rank must be >= 1, got {c.rank}")
    if c.gate and c.method != "reft":
        raise ValueError("--gate applies to ReFT only (--method reft)")
    if bool(c.gate_probe) != (c.method == "glora"):
        raise ValueError("--method glora needs --gate-probe (a langgate artifact), and "
                         "--gate-probe applies to glora only")
    if bool(c.neurons) != (c.method == "nrows"):
        raise ValueError("--method nrows needs --neurons (a neurons mask artifact), and "
                         "--neurons applies to nrows only")
    if c.max_samples is not None and c.max_samples < 1:
        raise ValueError(f"max-samples must be >= 1, got {c.max_samples}")


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"'{text}' is not a boolean (true/false)")
    return text.lower() in ("true", "1", "yes")


_PARSERS: dict[str, Callable[[str], object]] = {"float": float, "int": int, "bool": _parse_bool,
                                                "str": str}


def parse_options(config_class: type, options: dict[str, str]) -> dict[str, object]:
    """Turn ``name=value`` strings into the typed fields of a config dataclass."""
    types = {f.name: str(f.type) for f in fields(config_class)}
    out = {}
    for name, text in options.items():
        if name not in types:
            raise ValueError(f"unknown option '{name}' (options: {', '.join(types) or 'none'})")
        kind = types[name].replace(" | None", "")
        if not isinstance(text, str):
            out[name] = text
        elif text.lower() == "none" and "None" in types[name]:
            out[name] = None
        else:
            out[name] = _PARSERS.get(kind, str)(text)
    return out
