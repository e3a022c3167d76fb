"""`unlearn`: train a LoRA or ReFT edit that forgets one language and keeps the others.

Pipeline of one seed: read every text set (``DataError`` before any model loads), load the
model once, attach a fresh edit (:mod:`mmie.edits.adapters`), compute the reference targets once
(the base model *is* the reference: LoRA runs with adapters disabled, ReFT without its hooks,
so no second model copy is loaded), train for ``steps`` steps (:mod:`mmie.unlearn.train`),
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

Checkpoints (:mod:`mmie.unlearn.checkpoint`): every ``checkpoint_every`` steps into
``.{out name}.checkpoint`` beside the artifact. ``resume`` continues from it when every
setting, the content hash of every data file and of the layers artifact, and the base model's
fingerprint match (only ``checkpoint_every`` may change); on a complete artifact it checks the
same against the artifact's record and then does nothing, and it starts fresh where there is
nothing to resume. ``out`` is checked before any work (:func:`mmie.core.provenance.check_out`). The
checkpoint is deleted once the artifact is saved; after a NaN/inf loss it is kept.

Under ``torchrun`` / ``accelerate launch`` every process loads the model, computes the
reference targets of its own share of the schedule and trains data-parallel (DDP, through
accelerate); ``batch_size`` stays the global batch and must split evenly over the processes.
Only rank 0 writes checkpoints and artifacts; the others wait for it and return the artifact
it wrote. A failure to write on rank 0 reaches every process, so none waits forever.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

import torch

from mmie.core import kl_stats, profile
from mmie.core.artifacts import Artifact, content_hash, load, save
from mmie.core.data import pack_texts, read_texts
from mmie.core.distributed import World, gather, main_writes, shard, world
from mmie.core.errors import ArtifactError, DataError, MmieError
from mmie.core.head_precision import head_precision
from mmie.core.models import LoadedModel, loaded
from mmie.core.progress import SILENT, Progress
from mmie.core.provenance import (
    check_out,
    check_overlap,
    config_inputs,
    file_hash,
    file_hashes,
    refuse_same_texts,
    setting_changes,
)
from mmie.edits.adapters import DEFAULT_LAYERS, METHODS, Adapter, load_adapter
from mmie.unlearn import fsdp as unlearn_fsdp
from mmie.unlearn import refcache
from mmie.unlearn.checkpoint import checkpoint_dir, run_identity
from mmie.unlearn.config import UnlearnConfig, parse_options
from mmie.unlearn.data import (
    References,
    Schedule,
    build_schedule,
    curriculum_order,
    encode,
    forget_references,
    retain_references,
    sequence_references,
)
from mmie.unlearn.pairs import Alternatives, Rows, build_rows, read_aligned
from mmie.unlearn.pairs import choose as choose_alternatives
from mmie.unlearn.train import Loop, Plan, Trainer, make_accelerator, train
from mmie.unlearn.validation import ValTexts, check_disjoint, read_validation
from mmie.unlearn.valscore import Keeper
from mmie.unlearn.valscore import start as start_validation

__all__ = ["UnlearnConfig", "checkpoint_dir", "load_adapter", "parse_options", "prepare", "run",
           "run_seeds"]


# --- data -------------------------------------------------------------------------------------

@dataclass
class TextData:
    forget: list[str]
    retain: list[list[str]]  # one list per retain set
    alternative: Alternatives | None = None  # one per forget text (redirect, dpo)
    validation: ValTexts | None = None  # held out: never a training text

    def records(self, c: UnlearnConfig) -> dict:
        weights = c.set_weights()
        sets = [{"path": p, "name": n, "n": len(t), "weight": w, "sha256": file_hash(p)}
                for p, n, t, w in zip(c.retain, c.set_names(), self.retain, weights, strict=True)]
        alt = {"alternative": self.alternative.record} if self.alternative else {}
        return {"forget": {"path": c.forget, "n": len(self.forget), "sha256": file_hash(c.forget)},
                "retain": sets, **alt}


def read_data(c: UnlearnConfig) -> TextData:
    """Every text set, validated (``DataError`` on an empty or unreadable one, or a forget
    set that is also a retain set)."""
    refuse_same_texts(c.forget, c.retain)
    given = None
    if c.alternative:  # line-aligned: read together (mmie.unlearn.pairs)
        forget, given = read_aligned(c.forget, c.alternative, c.field, c.max_samples)
    else:
        forget = read_texts(c.forget, field=c.field, limit=c.max_samples)
    retain = [read_texts(p, field=c.field, limit=c.max_samples) for p in c.retain]
    wanted = c.method != "scrub" and c.build_objective(layer=0).needs.alternative
    alt = choose_alternatives(given, c.alternative, retain, len(forget)) if wanted else None
    val = None
    if c.validation:
        val = read_validation(c.validation, c.field)
        check_disjoint(c.validation, val, [*forget, *(t for s in retain for t in s)])
        val = replace(val, protect={lang: pack_texts(t, c.retain_pack)
                                    for lang, t in val.protect.items()})
    # packed after the alternatives (line-aligned with the forget texts) and the disjointness
    # check (sentence by sentence) are taken from the texts as given
    retain = [pack_texts(t, c.retain_pack) for t in retain]
    return TextData(forget, retain, alt, val)


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
    _launched(c)
    layers = edit_layers(c, lm, parent)
    with torch.random.fork_rng(devices=[]):  # the same initial edit on every process
        torch.manual_seed(c.seed)
        adapter = METHODS[c.method].create(lm, c.spec(layers))
    try:
        return _prepare_with(c, lm, data, layers, adapter)
    except BaseException:
        adapter.remove()  # no LoRA layers left in the model on a failed setup; re-raised
        raise


def _prepare_with(c, lm, data, layers, adapter) -> Prepared:
    here = world()
    objective, retain_loss = c.build_objective(act_layer(layers, lm.n_layers)), \
        c.build_retain_loss()
    plan = Plan(objective, retain_loss, getattr(objective.config, "layer", None),
                c.gate_weight, c.max_grad_norm, c.chunk_size)
    rows = build_rows(lm, data.forget, data.alternative.texts if data.alternative else None,
                      objective.needs, c.max_length, c.forget)
    sets = [_rows(lm, t, c.max_length, p) for t, p in zip(data.retain, c.retain, strict=True)]
    retain = [row for s in sets for row in s]
    start = time.perf_counter()
    refs, schedule = _references(c, lm, adapter, plan, rows, sets, here)
    trainer = Trainer(lm, adapter, plan, rows.forget, retain, refs, schedule, c.method_lr(),
                      pairs=rows)
    options = {"objective_config": asdict(objective.config),
               "retain_loss_config": asdict(retain_loss.config)}
    if data.alternative:
        options["alternative_inputs"] = {**data.alternative.record, "dropped": rows.dropped}
    # the edit's own blocks (glora drops those up to its gate's block)
    return Prepared(trainer, adapter, list(adapter.spec.layers), options,
                    time.perf_counter() - start)


@profile.phase("reference")
def _references(c, lm, adapter, plan: Plan, rows: Rows, sets,
                here: World) -> tuple[References, Schedule]:
    """This process's share of the batch schedule, and the reference targets of exactly the
    examples that share visits."""
    needs, rl, refs, forget = plan.objective.needs, plan.retain_loss, References(), rows.forget
    kw = dict(batch_size=c.batch_size, chunk_size=c.chunk_size)
    top_k = rl.config.top_k if needs.retain_loss and rl.needs_reference_targets else None
    # the exact KL's reference, summarised once where the head allows (mmie.core.kl_stats)
    summary = needs.retain_loss and rl.needs_reference_hidden and kl_stats.applies(lm)
    layer = plan.act_layer if needs.reference_activations else None
    cache = refcache.start(lm, rows, [r for s in sets for r in s], refs, top_k=top_k, layer=layer,
                           kl_summary=summary, settings={**kw, "head_dtype": c.head_dtype})
    order = _curriculum(lm, adapter, rows, refs, here, kw) if c.curriculum else None
    schedule = build_schedule(len(forget), [len(s) for s in sets], c.set_weights(), c.steps,
                              c.batch_size, c.seed, order).local(here)
    visited = sum(schedule.forget, [])
    if needs.reference_logprobs:
        forget_references(lm, adapter, forget, visited, refs, starts=rows.forget_starts, **kw)
    if needs.reference_alternative:
        sequence_references(lm, adapter, rows.alternative, rows.alternative_starts, visited,
                            refs.alternative_logp, None, **kw)
    if top_k is not None or summary or layer is not None:
        retain_references(lm, adapter, [row for s in sets for row in s],
                          sum(schedule.retain, []), refs, top_k=top_k, kl_summary=summary,
                          layer=layer, **kw)
    refs.cache = cache.store(refs) if cache is not None else {"used": False}
    return refs, schedule


def _curriculum(lm, adapter, rows: Rows, refs: References, here: World,
                kw: dict) -> list[int]:
    """Easiest-first order of every forget text. Each process scores its share and all share
    the scores, so every process orders, and so schedules, alike."""
    mine = shard(range(len(rows.forget)), here)
    forget_references(lm, adapter, rows.forget, mine, refs, starts=rows.forget_starts, **kw)
    for part in gather({i: (refs.forget_logp[i], refs.forget_tokens[i]) for i in mine}):
        for i, (logp, n_tokens) in part.items():
            refs.forget_logp[i], refs.forget_tokens[i] = logp, n_tokens
    return curriculum_order(refs, len(rows.forget))


# --- training and saving ----------------------------------------------------------------------

def _metrics(curve: list[dict], resumed: int, prepared: Prepared, data: TextData,
             c: UnlearnConfig) -> dict:
    timed = [r["seconds"] for r in curve[resumed:]]
    return {"curve": curve, "final": curve[-1], "resumed_from_step": resumed,
            "seconds_per_step": statistics.mean(timed) if timed else None,
            "median_seconds_per_step": statistics.median(timed) if timed else None,
            "reference_seconds": prepared.reference_seconds, "data": data.records(c),
            "reference_cache": prepared.trainer.refs.cache,
            "processes": prepared.trainer.processes, "fsdp": prepared.trainer.sharded}


def _save(c: UnlearnConfig, out: Path, lm: LoadedModel, prepared: Prepared, metrics: dict,
          parent: Artifact | None, force: bool, files: dict | None = None) -> Artifact:
    payload = prepared.adapter.payload()
    config = {**c.to_dict(), "adapter": prepared.adapter.spec.to_dict(), "layers_used":
              prepared.layers, "rank": c.method_rank(), "lr": c.method_lr(),
              "retain_set_weights": dict(zip(c.set_names(), c.set_weights(), strict=True)),
              **prepared.options}
    parents = [parent.path] if parent else []
    parents += [Path(p) for p in (c.gate_probe, c.neurons) if p]
    return save(out, "adapter", tensors=payload.tensors, writer=payload.writer, config=config,
                model=lm.identity, parents=parents, metrics=metrics,
                files=files or {}, force=force)


def _complete(out: Path) -> Artifact | None:
    try:
        return load(out, kind="adapter")
    except ArtifactError:
        return None


def _recorded(c: UnlearnConfig) -> dict:
    """The settings and input hashes a finished artifact must match to count as this run."""
    layers = [content_hash(Path(p)) for p in (c.layers, c.gate_probe, c.neurons) if p]
    return {**c.to_dict(), "lr": c.method_lr(), "rank": c.method_rank(),
            "data_sha256": file_hashes([c.forget, *c.retain]), "layers_sha256": layers}


def _finished(c: UnlearnConfig, done: Artifact, progress: Progress) -> Artifact:
    """``--resume`` on a complete artifact: the same run does nothing; another is refused."""
    data = done.metrics.get("data", {})
    sets = [data.get("forget", {}), *data.get("retain", [])]
    # a field added since the artifact was written counts as its default then
    defaults = asdict(replace(c, **{f.name: f.default for f in fields(c)
                                    if f.default is not MISSING}))
    record = {**{k: done.config.get(k, defaults[k]) for k in c.to_dict()},
              "data_sha256": {s.get("path"): s.get("sha256") for s in sets},
              "layers_sha256": [p.get("sha256") for p in done.manifest.get("parents", [])]}
    if changes := setting_changes(record, _recorded(c)):
        raise ArtifactError(f"{done.path} is already complete but was made with other settings "
                            f"({'; '.join(changes)}); use another --out, or --force to retrain")
    with progress.task(f"unlearn seed {c.seed}", total=c.steps) as task:
        task.advance(c.steps)
        task.log(f"{done.path}: already complete, nothing to do")
    return done


def _identity(c: UnlearnConfig, lm: LoadedModel) -> dict:
    """What a checkpoint must match: settings, input contents and the base model."""
    return run_identity({**_recorded(c), "base_model": lm.identity.fingerprint})


@profile.phase("unlearn")
def train_adapter(c: UnlearnConfig, out: Path, *, force: bool = False, resume: bool = False,
                  progress: Progress = SILENT) -> Artifact:
    """One seed: train, save the ``adapter`` artifact, remove the edit, release the model."""
    check_out(out, config_inputs(c), force=force, resume=resume, main=world().main)
    if resume and out.exists() and (done := _complete(out)) is not None:
        return _finished(c, done, progress)
    if out.exists() and not force:  # save() checks again; this spares a whole run
        raise ArtifactError(f"{out} already exists; pass --force to replace it")
    if unlearn_fsdp.wanted() and world().distributed:  # before the model loads
        unlearn_fsdp.check(c.method, None, c.checkpoint_every, resume)
    data = read_data(c)
    parent = load(c.layers, kind="layers") if c.layers else None
    ckpt, main = checkpoint_dir(out), world().main
    if c.validation and resume and ckpt.is_dir():
        raise MmieError(f"{ckpt}: --resume of a run with validation is not supported (the "
                        "best checkpoint so far is kept in memory); rerun without --resume")
    with loaded(c.model) as lm, head_precision(c.head_dtype):
        prepared = prepare(c, lm, data, parent)
        try:
            keeper = _keeper(c, lm, prepared, data)
            desc = f"unlearn {c.method}-{c.objective} seed {c.seed}"
            loop = Loop(c.steps, c.method_lr(), c.checkpoint_every, ckpt, _identity(c, lm),
                        desc, main, keeper, c.validation.every if c.validation else 0)
            with profile.phase("train"):
                curve, resumed = train(prepared.trainer, loop, resume, progress)
            metrics, files = _metrics(curve, resumed, prepared, data, c), {}
            if keeper is not None:  # puts the chosen checkpoint's weights back
                metrics["validation"], files = keeper.finish()
            if prepared.trainer.sharded:  # every process, before rank 0 writes
                unlearn_fsdp.gather_trainable(prepared.adapter)
            artifact = main_writes(lambda: _save(c, out, lm, prepared, metrics, parent,
                                                 force or resume, files),
                                   lambda: load(out, kind="adapter"), str(out))
        finally:
            prepared.trainer.close()
            prepared.adapter.remove()
    if main:
        shutil.rmtree(ckpt, ignore_errors=True)
    return artifact


def _keeper(c: UnlearnConfig, lm: LoadedModel, prepared: Prepared,
            data: TextData) -> Keeper | None:
    if c.validation is None:
        return None
    return start_validation(c.validation, lm, prepared.adapter, data.validation, c.max_length,
                            max(16, c.batch_size), prepared.trainer.sharded)


def run_scrub(c: UnlearnConfig, out: Path, *, force: bool = False, resume: bool = False,
              progress: Progress = SILENT) -> Artifact:
    """``--method scrub``: fit a forget-vs-retain direction per layer (no training; under a
    launcher rank 0 fits it alone)."""
    from mmie.edits.interventions import ScrubConfig, fit_scrub

    del resume  # nothing to resume: the fit is one pass over the data
    check_out(out, config_inputs(c), force=force, main=world().main)
    data = read_data(c)
    parent = load(c.layers, kind="layers") if c.layers else None
    settings = ScrubConfig(whiten=c.scrub_whiten, max_length=c.max_length,
                           batch_size=c.batch_size, seed=c.seed)

    def fit() -> Artifact:
        with loaded(c.model) as lm:
            layers = edit_layers(c, lm, parent)
            retain = [t for texts in data.retain for t in texts]
            return fit_scrub(lm, data.forget, retain, layers, out, config=settings, force=force,
                             parents=[parent.path] if parent else [], progress=progress)

    return main_writes(fit, lambda: load(out, kind="scrub"), str(out))


RUNNERS: dict[str, Callable[..., Artifact]] = {
    "lora": train_adapter, "reft": train_adapter, "glora": train_adapter, "nrows": train_adapter,
    "scrub": run_scrub}


def _launched(config: UnlearnConfig) -> None:
    """Under a launcher: refuse an uneven batch split, and join the process group through
    accelerate (which also gives each process its GPU) before any collective."""
    here = world()
    config.check_processes(here.size)
    if here.distributed:
        make_accelerator()


def run(config: UnlearnConfig, out: Path | str, *, force: bool = False, resume: bool = False,
        progress: Progress = SILENT) -> Artifact:
    """Run one seed of ``config`` into ``out``; see the module docstring."""
    _launched(config)
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
    _launched(config)
    check_overlap(out, config_inputs(config))
    read_data(config)  # a bad file fails before the first seed's model loads
    return [run(replace(config, seed=s), Path(out) / f"seed{s}", force=force, resume=resume,
                progress=progress) for s in seeds]
