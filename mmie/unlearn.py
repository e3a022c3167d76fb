"""`unlearn`: train a LoRA or ReFT edit that forgets one language and keeps the others.

Pipeline of one seed: read every text set (``DataError`` before any model loads), load the
model once, attach a fresh edit (:mod:`mmie.adapters`), compute the reference targets once
(the base model *is* the reference: LoRA runs with adapters disabled, ReFT without its hooks,
so no second model copy is loaded), train for ``steps`` steps (:mod:`mmie.unlearn_train`),
save an ``adapter`` artifact, take the edit out and release the model. Several seeds run one
after another, each with its own model load and release, into ``out/seed{N}``.

Retain sets: each ``retain`` file is one set (a language). A retain batch draws each example's
set with probability equal to the set's weight, so in expectation the retain loss is the
weighted sum of the per-set losses. Weights default to equal *per set* (not per example), so a
small set counts as much as a large one; ``retain_weights`` names a set by its path or file
stem (``en`` for ``data/en.jsonl``); unnamed sets weigh 1; weights are normalised to sum to 1.

Curriculum: forget texts are visited easiest first, in each epoch, where difficulty is the
base model's *total* NLL of the text (its summed, not averaged, token NLL): short texts and
texts the model finds likely come first.

Checkpoints: every ``checkpoint_every`` steps into ``.{out name}.checkpoint`` beside the
artifact (a sibling, not inside it, so the artifact folder only ever holds a complete,
hash-checked artifact). ``resume`` continues from it when the run settings match (``lr``,
``max_grad_norm`` and ``checkpoint_every`` may change), skips a seed whose artifact is
already complete, and starts fresh where there is nothing to resume. The checkpoint is
deleted once the artifact is saved; after a NaN/inf loss it is kept.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from mmie import losses
from mmie.adapters import DEFAULT_LAYERS, LORA_TARGETS, METHODS, Adapter, AdapterSpec, load_adapter
from mmie.artifacts import Artifact, load, save, sha256_file
from mmie.data import read_texts
from mmie.errors import ArtifactError, DataError
from mmie.models import LoadedModel, ModelSpec, loaded
from mmie.objectives import get_objective, get_retain_loss
from mmie.progress import SILENT, Progress
from mmie.unlearn_train import (
    Loop,
    Plan,
    References,
    Schedule,
    Trainer,
    build_schedule,
    checkpoint_dir,
    curriculum_order,
    encode,
    forget_references,
    retain_references,
    run_identity,
    train,
)

__all__ = ["UnlearnConfig", "checkpoint_dir", "load_adapter", "prepare", "run", "run_seeds"]


@dataclass(frozen=True)
class UnlearnConfig:
    """Settings of one `unlearn` run (one seed).

    forget: text file of the language to forget.
    retain: text files of the languages to keep, one set each (see the module docstring).
    model: which model to load.
    method: ``lora`` or ``reft`` (:data:`mmie.adapters.METHODS`), or ``scrub`` (no training:
        fit a script-scrub direction per layer, :func:`mmie.interventions.fit_scrub`).
    objective: ``ga``, ``graddiff``, ``npo``, ``simnpo`` or ``rmu`` (:mod:`mmie.objectives`).
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
        ReFT), texts per forget (and per retain) batch.
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
    scrub_whiten: ``--method scrub`` only: LEACE-style whitened erasure instead of an
        orthogonal projection (:mod:`mmie.interventions`).
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

    def __post_init__(self) -> None:
        for name in ("retain", "target_modules", "objective_options", "retain_options",
                     "retain_weights"):
            object.__setattr__(self, name, tuple(tuple(x) if isinstance(x, list) else x
                                                 for x in getattr(self, name)))
        if not self.forget or not self.retain:
            raise ValueError("a forget file and at least one retain file are required")
        if self.method not in RUNNERS:
            raise ValueError(f"method '{self.method}' not in {', '.join(sorted(RUNNERS))}")
        _check_numbers(self)
        self.set_weights()
        self.build_objective(layer=0)
        self.build_retain_loss()

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
                           reft_kind=self.reft_kind, gate=self.gate, gate_hidden=self.gate_hidden)

    def to_dict(self) -> dict:
        return asdict(self)


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
    if c.gate_weight < 0 or (c.rank is not None and c.rank < 1):
        raise ValueError(f"gate-weight must be >= 0 and rank >= 1 ({c.gate_weight}, {c.rank})")
    if c.gate and c.method != "reft":
        raise ValueError("--gate applies to ReFT only (--method reft)")
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


# --- data -------------------------------------------------------------------------------------

@dataclass
class TextData:
    forget: list[str]
    retain: list[list[str]]  # one list per retain set

    def records(self, c: UnlearnConfig) -> dict:
        weights = c.set_weights()
        sets = [{"path": p, "name": n, "n": len(t), "weight": w, "sha256": _file_hash(p)}
                for p, n, t, w in zip(c.retain, c.set_names(), self.retain, weights, strict=True)]
        return {"forget": {"path": c.forget, "n": len(self.forget), "sha256": _file_hash(c.forget)},
                "retain": sets}


def _file_hash(path: str) -> str | None:
    return sha256_file(Path(path)) if Path(path).is_file() else None


def read_data(c: UnlearnConfig) -> TextData:
    """Every text set, validated (``DataError`` on an empty or unreadable one)."""
    forget = read_texts(c.forget, field=c.field, limit=c.max_samples)
    retain = [read_texts(p, field=c.field, limit=c.max_samples) for p in c.retain]
    return TextData(forget, retain)


# --- preparing a run ---------------------------------------------------------------------------

def edit_layers(c: UnlearnConfig, lm: LoadedModel, parent: Artifact | None) -> list[int]:
    if parent is None:
        return DEFAULT_LAYERS[c.method](lm.n_layers)
    load(parent.path, kind="layers", model=lm.identity)  # made for this model?
    chosen = parent.metrics.get("chosen")
    chosen = chosen.get("value") if isinstance(chosen, dict) else chosen
    if not chosen:
        raise ArtifactError(f"{parent.path}: layers artifact has no chosen layers")
    return sorted(int(i) for i in chosen)


def act_layer(layers: Sequence[int], n_layers: int) -> int:
    """RMU's default block: the deepest edited one, or the middle when every block is edited."""
    return n_layers // 2 if len(layers) == n_layers else max(layers)


@dataclass
class Prepared:
    trainer: Trainer
    adapter: Adapter
    layers: list[int]
    options: dict  # resolved objective / retain-loss configs, for the manifest
    reference_seconds: float


def _rows(lm: LoadedModel, texts: list[str], max_length: int, what: str) -> list[list[int]]:
    rows = [r for r in encode(lm, texts, max_length) if len(r) >= 2]
    if not rows:
        raise DataError(f"{what}: no text gives 2 or more tokens; nothing to train on")
    return rows


def prepare(c: UnlearnConfig, lm: LoadedModel, data: TextData,
            parent: Artifact | None = None) -> Prepared:
    """Attach a fresh edit, compute the reference targets once and build the trainer."""
    layers = edit_layers(c, lm, parent)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c.seed)
        adapter = METHODS[c.method].create(lm, c.spec(layers))
    try:
        return _prepare_with(c, lm, data, layers, adapter)
    except BaseException:
        adapter.remove()  # no LoRA layers left in the model on a failed setup; re-raised
        raise


def _prepare_with(c, lm, data, layers, adapter) -> Prepared:
    objective, retain_loss = c.build_objective(act_layer(layers, lm.n_layers)), \
        c.build_retain_loss()
    plan = Plan(objective, retain_loss, getattr(objective.config, "layer", None),
                c.gate_weight, c.max_grad_norm, c.chunk_size)
    forget = _rows(lm, data.forget, c.max_length, c.forget)
    sets = [_rows(lm, t, c.max_length, p) for t, p in zip(data.retain, c.retain, strict=True)]
    retain = [row for s in sets for row in s]
    start = time.perf_counter()
    refs, schedule = _references(c, lm, adapter, plan, forget, sets)
    trainer = Trainer(lm, adapter, plan, forget, retain, refs, schedule, c.method_lr())
    options = {"objective_config": asdict(objective.config),
               "retain_loss_config": asdict(retain_loss.config)}
    return Prepared(trainer, adapter, layers, options, time.perf_counter() - start)


def _references(c, lm, adapter, plan: Plan, forget, sets) -> tuple[References, Schedule]:
    """The batch schedule, and the reference targets of exactly the examples it visits."""
    needs, rl, refs = plan.objective.needs, plan.retain_loss, References()
    kw = dict(batch_size=c.batch_size, chunk_size=c.chunk_size)
    if c.curriculum:  # difficulty needs every forget text's reference likelihood
        forget_references(lm, adapter, forget, range(len(forget)), refs, **kw)
    order = curriculum_order(refs, len(forget)) if c.curriculum else None
    schedule = build_schedule(len(forget), [len(s) for s in sets], c.set_weights(), c.steps,
                              c.batch_size, c.seed, order)
    if needs.reference_logprobs:
        forget_references(lm, adapter, forget, sum(schedule.forget, []), refs, **kw)
    top_k = rl.config.top_k if needs.retain_loss and rl.needs_reference_targets else None
    if top_k is not None or needs.reference_activations:
        retain = [row for s in sets for row in s]
        retain_references(lm, adapter, retain, sum(schedule.retain, []), refs, top_k=top_k,
                          layer=plan.act_layer if needs.reference_activations else None, **kw)
    return refs, schedule


# --- training and saving ----------------------------------------------------------------------

def _metrics(curve: list[dict], resumed: int, prepared: Prepared, data: TextData,
             c: UnlearnConfig) -> dict:
    timed = [r["seconds"] for r in curve[resumed:]]
    return {"curve": curve, "final": curve[-1], "resumed_from_step": resumed,
            "seconds_per_step": statistics.mean(timed) if timed else None,
            "median_seconds_per_step": statistics.median(timed) if timed else None,
            "reference_seconds": prepared.reference_seconds, "data": data.records(c)}


def _save(c: UnlearnConfig, out: Path, lm: LoadedModel, prepared: Prepared, metrics: dict,
          parent: Artifact | None, force: bool) -> Artifact:
    payload = prepared.adapter.payload()
    config = {**c.to_dict(), "adapter": prepared.adapter.spec.to_dict(), "layers_used":
              prepared.layers, "rank": c.method_rank(), "lr": c.method_lr(),
              "retain_set_weights": dict(zip(c.set_names(), c.set_weights(), strict=True)),
              **prepared.options}
    return save(out, "adapter", tensors=payload.tensors, writer=payload.writer, config=config,
                model=lm.identity, parents=[parent.path] if parent else [], metrics=metrics,
                force=force)


def _complete(out: Path) -> Artifact | None:
    try:
        return load(out, kind="adapter")
    except ArtifactError:
        return None


def train_adapter(c: UnlearnConfig, out: Path, *, force: bool = False, resume: bool = False,
                  progress: Progress = SILENT) -> Artifact:
    """One seed: train, save the ``adapter`` artifact, remove the edit, release the model."""
    if resume and out.exists() and (done := _complete(out)) is not None:
        return done
    if out.exists() and not force:  # save() checks again; this spares a whole run
        raise ArtifactError(f"{out} already exists; pass --force to replace it")
    data = read_data(c)
    parent = load(c.layers, kind="layers") if c.layers else None
    ckpt = checkpoint_dir(out)
    with loaded(c.model) as lm:
        prepared = prepare(c, lm, data, parent)
        try:
            desc = f"unlearn {c.method}-{c.objective} seed {c.seed}"
            loop = Loop(c.steps, c.method_lr(), c.checkpoint_every, ckpt,
                        run_identity(c.to_dict()), desc)
            curve, resumed = train(prepared.trainer, loop, resume, progress)
            metrics = _metrics(curve, resumed, prepared, data, c)
            artifact = _save(c, out, lm, prepared, metrics, parent, force or resume)
        finally:
            prepared.adapter.remove()
    shutil.rmtree(ckpt, ignore_errors=True)
    return artifact


def run_scrub(c: UnlearnConfig, out: Path, *, force: bool = False, resume: bool = False,
              progress: Progress = SILENT) -> Artifact:
    """``--method scrub``: fit a forget-vs-retain direction per layer (no training)."""
    from mmie.interventions import ScrubConfig, fit_scrub

    del resume  # nothing to resume: the fit is one pass over the data
    data = read_data(c)
    parent = load(c.layers, kind="layers") if c.layers else None
    settings = ScrubConfig(whiten=c.scrub_whiten, max_length=c.max_length,
                           batch_size=c.batch_size, seed=c.seed)
    with loaded(c.model) as lm:
        layers = edit_layers(c, lm, parent)
        retain = [t for texts in data.retain for t in texts]
        return fit_scrub(lm, data.forget, retain, layers, out, config=settings, force=force,
                         parents=[parent.path] if parent else [], progress=progress)


RUNNERS: dict[str, Callable[..., Artifact]] = {
    "lora": train_adapter, "reft": train_adapter, "scrub": run_scrub}


def run(config: UnlearnConfig, out: Path | str, *, force: bool = False, resume: bool = False,
        progress: Progress = SILENT) -> Artifact:
    """Run one seed of ``config`` into ``out``; see the module docstring."""
    return RUNNERS[config.method](config, Path(out), force=force, resume=resume,
                                  progress=progress)


def run_seeds(config: UnlearnConfig, seeds: Sequence[int], out: Path | str, *,
              force: bool = False, resume: bool = False,
              progress: Progress = SILENT) -> list[Artifact]:
    """One artifact per seed, one after another: ``out`` itself for a single seed, else
    ``out/seed{N}``. Each seed loads and releases its own model, so memory does not grow."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    if len(seeds) == 1:
        return [run(replace(config, seed=seeds[0]), out, force=force, resume=resume,
                    progress=progress)]
    read_data(config)  # a bad file fails before the first seed's model loads
    return [run(replace(config, seed=s), Path(out) / f"seed{s}", force=force, resume=resume,
                progress=progress) for s in seeds]
