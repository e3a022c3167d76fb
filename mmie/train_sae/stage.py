"""`train-sae`: one sparse autoencoder per chosen layer, then the forget-language latents.

Layer ``i`` is the output of decoder block ``i`` (0-based), TransformerLens'
``blocks.{i}.hook_resid_post``. Layers come from a ``layers`` artifact (``metrics['chosen']``,
written by select-layers) or are given explicitly.

Data: from the forget, retain and optional general sets a seeded ``holdout`` share of texts is
held out (for quality and feature statistics, see :mod:`mmie.train_sae.features`); the rest is the
training mix, whose activations come from :mod:`mmie.train_sae.stream` (one decoder pass per
chunk of texts for all layers, fp16 shards cached in ``cache_dir`` or a temporary folder, a bounded
seeded shuffle buffer).

Each SAE trains with Adam and a linear warm-up (:mod:`mmie.train_sae.trainer`, bf16 autocast on
CUDA), seeded. Every ``checkpoint_every`` steps the training state is written atomically to
``checkpoint_dir`` (default: ``.<out>.checkpoint`` beside ``out``, not inside it, because
``out`` must stay empty or an artifact until the atomic save); ``resume`` continues from there
and ends with the same weights as an uninterrupted run.

Data-parallel: ``torchrun --nproc_per_node N -m mmie train-sae ...`` (or ``accelerate launch
-m mmie train-sae ...``) runs one process per device. The processes share the activation
harvest and the held-out passes, and split every global batch by rows; the SAEs go through
accelerate's DDP (:mod:`mmie.train_sae.parallel`). The global batch is ``batch_tokens`` whatever
``N``, so the run equals the single-process one up to float rounding. Rank 0 alone writes
checkpoints and the artifact; the other processes wait and return the artifact it wrote.
Activation cache, checkpoints and ``out`` must be visible to every process (one machine, or a
shared filesystem across nodes).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mmie.core import profile
from mmie.core.artifacts import Artifact, check_model, load, save, sha256_file, sha256_json
from mmie.core.data import read_texts
from mmie.core.distributed import ensure_group, gather, main_writes, world
from mmie.core.errors import ArtifactError, DataError
from mmie.core.models import LoadedModel, ModelSpec, loaded, unwrap
from mmie.core.progress import SILENT, Progress
from mmie.sae.modules import SAE_REGISTRY, SaeConfig
from mmie.train_sae.export import load_sae, sae_from_artifact  # noqa: F401  (public API here too)
from mmie.train_sae.features import ABLATIONS, Analysis, FeatureSettings, analyse
from mmie.train_sae.parallel import replicate, shared_folder
from mmie.train_sae.stream import (
    ChunkStore,
    TokenStream,
    cache_key,
    harvest,
    make_chunks,
    open_cache,
)
from mmie.train_sae.trainer import Checkpoints, Trainer, new_trainer, train


@dataclass(frozen=True)
class TrainSaeConfig:
    """Settings of one `train-sae` run.

    forget, retain, general: text files (jsonl/txt/tsv/csv or HF dataset) of the language to
        forget, a language to keep, and optional general text; all three feed the training mix.
    protect: ``LANG=FILE`` texts of languages to keep (e.g. the forget language's neighbours);
        never trained on, only held out (up to ``max_heldout`` texts each). Forget latents are
        then selected by monolinguality: rare on retain *and* on each protected language.
    model: which model to load.
    layers: block indices to train on; give these or ``layers_artifact``, not both.
    layers_artifact: a ``layers`` artifact whose ``metrics['chosen']`` are the layers.
    field: JSON field or column holding the text.
    max_samples: at most this many texts per set; None = all.
    expansion, k, arch, auxk_coef: the SAE (see :class:`mmie.sae.modules.SaeConfig`).
    dead_after_tokens: training tokens without firing after which a latent counts as dead;
        None = tokens // 4, clamped to [batch_tokens, 10M] (short runs need a short window).
    tokens: training tokens each SAE sees (rounded up to whole batches).
    batch_tokens: tokens per SAE optimisation step.
    lr: Adam learning rate; None = :func:`auto_lr` (2e-4 at 16k latents, ~1/sqrt(n)).
    warmup_steps: linear learning-rate warm-up.
    buffer_tokens: shuffle-buffer size in tokens (at least 2 * batch_tokens).
    max_length: tokens per text (longer texts are truncated).
    batch_size: texts per forward pass (one cache shard).
    holdout: share of each set's texts held out for quality and features (at least one text).
    max_heldout: at most this many held-out texts per set (the rest train): the quality pass
        runs the full model 1 + 2 * layers times per text, LM head included.
    ablation: how the CE-recovered baseline replaces the layer output: zero or mean.
    top_n_features, n_contexts, context_window: forget features reported per layer, contexts
        per feature, tokens shown either side of the max-activating token.
    grad_attribution: also score latents by activation x gradient of the forget log-prob.
    cache_dir: keep activation shards here and reuse them next run; None = temporary.
    checkpoint_dir: where checkpoints go; None = ``.<out name>.checkpoint`` beside ``out``.
    checkpoint_every: optimisation steps between checkpoints.
    seed: seeds the held-out split, chunk order, shuffle buffer and SAE initialisation.
    """

    forget: str
    retain: str
    model: ModelSpec = ModelSpec()
    layers: tuple[int, ...] = ()
    layers_artifact: str | None = None
    general: str | None = None
    protect: tuple[str, ...] = ()
    field: str = "text"
    max_samples: int | None = None
    expansion: int = 16
    k: int = 32
    arch: str = "topk"
    auxk_coef: float = 1 / 32
    dead_after_tokens: int | None = None
    tokens: int = 200_000
    batch_tokens: int = 2048
    lr: float | None = None
    warmup_steps: int = 50
    buffer_tokens: int = 16_384
    max_length: int = 128
    batch_size: int = 8
    holdout: float = 0.1
    max_heldout: int = 200
    ablation: str = "zero"
    top_n_features: int = 20
    n_contexts: int = 5
    context_window: int = 8
    grad_attribution: bool = False
    cache_dir: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.forget or not self.retain:
            raise ValueError("forget and retain files are both required")
        if bool(self.layers) == bool(self.layers_artifact):
            raise ValueError("give either a layers artifact (--layers DIR) or explicit layers "
                             "(--layer N, repeatable), not both and not neither")
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct block indices >= 0, got {self.layers}")
        _check_ranges(self)
        object.__setattr__(self, "protect", tuple(self.protect))
        protected_sets(self.protect)  # refuses a malformed or clashing entry before any work
        if self.arch not in SAE_REGISTRY:
            raise ValueError(f"unknown arch '{self.arch}' (known: {', '.join(SAE_REGISTRY)})")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation '{self.ablation}' (known: {', '.join(ABLATIONS)})")

    def feature_settings(self) -> FeatureSettings:
        return FeatureSettings(max_length=self.max_length, batch_size=self.batch_size,
                               ablation=self.ablation, top_n=self.top_n_features,
                               n_contexts=self.n_contexts, window=self.context_window,
                               grad_attribution=self.grad_attribution,
                               against=("retain", *protected_sets(self.protect)))


RESERVED = frozenset({"forget", "retain", "general", "all"})


def protected_sets(entries: tuple[str, ...]) -> dict[str, str]:
    """``{lang: file}`` from ``LANG=FILE`` entries; names must be distinct, simple, unreserved."""
    sets: dict[str, str] = {}
    for entry in entries:
        lang, sep, path = entry.partition("=")
        if not sep or not path or not lang.replace("_", "").isalnum():
            raise ValueError(f"protect entries are LANG=FILE with a simple name, got {entry!r}")
        if lang in RESERVED or lang in sets:
            raise ValueError(f"protect name {lang!r} is reserved or given twice")
        sets[lang] = path
    return sets


def _check_ranges(c: TrainSaeConfig) -> None:
    minimums = {"expansion": 1, "k": 1, "tokens": 1, "batch_tokens": 2, "warmup_steps": 0,
                "max_length": 2, "batch_size": 1, "top_n_features": 1, "n_contexts": 1,
                "context_window": 0, "checkpoint_every": 1, "max_heldout": 1}
    for name, low in minimums.items():
        if getattr(c, name) < low:
            raise ValueError(f"{name.replace('_', '-')} must be >= {low}, got {getattr(c, name)}")
    if c.buffer_tokens < 2 * c.batch_tokens:
        raise ValueError(f"buffer-tokens {c.buffer_tokens} must be at least twice batch-tokens "
                         f"{c.batch_tokens}")
    if not 0 < c.holdout < 1:
        raise ValueError(f"holdout must be in (0, 1), got {c.holdout}")
    if c.lr is not None and not c.lr > 0:
        raise ValueError(f"lr must be > 0, got {c.lr}")
    if c.max_samples is not None and c.max_samples < 2:
        raise ValueError(f"max-samples must be >= 2 (one text is held out), got {c.max_samples}")


def steps_of(c: TrainSaeConfig) -> int:
    return -(-c.tokens // c.batch_tokens)


def auto_lr(n_latents: int) -> float:
    """Adam learning rate falling as 1/sqrt(latents), 2e-4 at 16k (Gao et al. 2024's fit)."""
    return 2e-4 / (n_latents / 2**14) ** 0.5


def sae_config(c: TrainSaeConfig, d_model: int) -> SaeConfig:
    dead = c.dead_after_tokens or min(10_000_000, max(c.batch_tokens, c.tokens // 4))
    return SaeConfig(d_model=d_model, expansion=c.expansion, k=c.k, arch=c.arch,
                     auxk_coef=c.auxk_coef, dead_after_tokens=dead)


# --------------------------------------------------------------------------- data
@dataclass
class Split:
    train: list[str]
    heldout: dict[str, list[str]]
    records: dict[str, dict]


def split_sets(c: TrainSaeConfig) -> Split:
    """Read every set (errors before any model loads) and hold out a seeded share of each."""
    paths = {"forget": c.forget, "retain": c.retain}
    paths.update({"general": c.general} if c.general else {})
    train, heldout, records = [], {}, {}
    for index, (name, path) in enumerate(paths.items()):
        texts = read_texts(path, c.field, c.max_samples)
        if len(texts) < 2:
            raise DataError(f"{path}: {len(texts)} text in the {name} set; at least 2 are needed "
                            "(one is held out)")
        n_hold = min(len(texts) - 1, c.max_heldout, max(1, round(len(texts) * c.holdout)))
        held = set(random.Random(c.seed * 1009 + index).sample(range(len(texts)), n_hold))
        train += [t for i, t in enumerate(texts) if i not in held]
        heldout[name] = [t for i, t in enumerate(texts) if i in held]
        records[name] = _record(path, len(texts) - n_hold, n_hold)
    for name, path in protected_sets(c.protect).items():  # measured only: never in the mix
        heldout[name] = read_texts(path, c.field, c.max_samples)[:c.max_heldout]
        if not heldout[name]:
            raise DataError(f"{path}: no text in the protected set {name}")
        records[name] = _record(path, 0, len(heldout[name]))
    return Split(train, heldout, records)


def _record(path: str, n_train: int, n_heldout: int) -> dict:
    return {"path": str(path), "n_train": n_train, "n_heldout": n_heldout,
            "sha256": sha256_file(Path(path)) if Path(path).is_file() else None}


# --------------------------------------------------------------------------- run
# Settings that change what is reported, not what is trained: a checkpoint survives them.
REPORT_ONLY = frozenset({"protect", "ablation", "top_n_features", "n_contexts", "context_window",
                         "grad_attribution", "cache_dir", "checkpoint_dir", "checkpoint_every"})


def default_checkpoint_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.checkpoint"


def resolve_layers(c: TrainSaeConfig, parent: Artifact | None, lm: LoadedModel) -> list[int]:
    """Explicit layers, or the layers artifact's ``chosen`` (checked against the model)."""
    layers = list(c.layers)
    if parent is not None:
        check_model(parent.path, parent.model, lm.identity)
        chosen = parent.metrics.get("chosen")
        if not isinstance(chosen, list) or not chosen:
            raise ArtifactError(f"{parent.path}: metrics['chosen'] holds no layers")
        layers = [int(i) for i in chosen]
    bad = [i for i in layers if not 0 <= i < lm.n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: {lm.identity.name} has {lm.n_layers} "
                         f"blocks (0..{lm.n_layers - 1})")
    return sorted(layers)


def _fingerprint(c: TrainSaeConfig, lm: LoadedModel, layers: list[int]) -> str:
    settings = {k: v for k, v in asdict(c).items() if k not in REPORT_ONLY}
    return sha256_json({"config": settings, "layers": layers, "model": lm.identity.to_dict()})


@dataclass
class Trained:
    trainer: Trainer
    cache: dict
    resumed_from: int


def train_all(lm: LoadedModel, split: Split, layers: list[int], cfg: SaeConfig,
              c: TrainSaeConfig, ckpt: Checkpoints, resume: bool, progress: Progress) -> Trained:
    """Train every layer's SAE from one activation stream (see the module docstring)."""
    chunks, n_real = make_chunks(lm, split.train, c.max_length, c.batch_size)
    # protected sets are never trained on, so they do not key the training activations
    data = {name: r["sha256"] for name, r in split.records.items() if r["n_train"]}
    key = cache_key(lm, layers, chunks, c.max_length, data)
    with shared_folder(c.cache_dir, "mmie-acts-") as root:
        store = ChunkStore(lm, chunks, n_real, layers, open_cache(root, key), c.max_length)
        stream = TokenStream(store, c.buffer_tokens, c.batch_tokens, c.seed)
        trainer = new_trainer(lm.device, layers, cfg, stream, c.seed,
                              c.lr or auto_lr(cfg.n_latents), c.warmup_steps)
        state = ckpt.load() if resume else None
        if state is not None:
            trainer.load_state_dict(state)
        harvest(store, stream, steps_of(c) - trainer.step, progress)
        trainer.replicas = replicate(trainer.saes, trainer.optimizers)
        train(trainer, steps_of(c), c.checkpoint_every, ckpt, progress)
    # hits: shards the stream read (every process reads all); misses: shards computed, by anyone
    cache = {"dir": c.cache_dir, "hits": store.hits, "misses": sum(gather(store.misses)),
             "chunks": len(chunks), "epochs": stream.epoch + stream.pos / len(chunks)}
    return Trained(trainer, cache, state["step"] if state else 0)


@profile.phase("train_sae")
def run(config: TrainSaeConfig, out: Path | str, *, force: bool = False, resume: bool = False,
        progress: Progress = SILENT) -> Artifact:
    """Train, measure and save the ``sae`` artifact; see the module docstring.

    Under a launcher every process calls this; rank 0 writes, the others return its artifact.
    """
    out = Path(out)
    _check_start(config, out, force)
    ensure_group()
    split = split_sets(config)
    parent = load(config.layers_artifact, kind="layers") if config.layers_artifact else None
    with loaded(config.model) as lm:
        layers = resolve_layers(config, parent, lm)
        cfg = sae_config(config, lm.identity.d_model)
        folder = Path(config.checkpoint_dir or default_checkpoint_dir(out))
        ckpt = Checkpoints(folder, _fingerprint(config, lm, layers))
        trained = train_all(lm, split, layers, cfg, config, ckpt, resume, progress)
        analysis = analyse(lm, trained.trainer.saes, trained.trainer.means(), split.heldout,
                           config.feature_settings(), progress)
        extra, identity = _recorded(config, lm, layers, cfg), lm.identity
    def write() -> Artifact:
        artifact = save(out, "sae", tensors=_tensors(trained, analysis),
                        config={**asdict(config), **extra}, model=identity,
                        parents=[parent.path] if parent else [],
                        metrics=_metrics(trained, analysis, split, config),
                        files={**analysis.files,
                               "training_log.jsonl": _jsonl(trained.trainer.log)},
                        force=force)
        ckpt.clear()
        return artifact

    return main_writes(write, lambda: load(out, kind="sae"), str(out))


def _check_start(config: TrainSaeConfig, out: Path, force: bool) -> None:
    if out.exists() and not force:  # save() checks again; this spares a whole training run
        raise ArtifactError(f"{out} already exists; pass --force to replace it")
    if world().size > config.batch_tokens:
        raise ValueError(f"batch-tokens {config.batch_tokens} is below the {world().size} "
                         "processes: each needs rows of every batch")


def _recorded(c: TrainSaeConfig, lm: LoadedModel, layers: list[int], cfg: SaeConfig) -> dict:
    """What the manifest records beyond the config: resolved layers, SAE config, block path."""
    names = {id(m): name for name, m in unwrap(lm.model).named_modules()}
    return {"layers": layers, "sae": asdict(cfg), "blocks_module": names.get(id(lm.blocks)),
            "lr": c.lr or auto_lr(cfg.n_latents), "steps": steps_of(c)}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)


def _tensors(trained: Trained, analysis: Analysis) -> dict[str, dict[str, torch.Tensor]]:
    saes = trained.trainer.saes
    return {**{f"layer{i}": sae.state_dict() for i, sae in saes.items()}, **analysis.tensors}


def _metrics(trained: Trained, analysis: Analysis, split: Split, c: TrainSaeConfig) -> dict:
    trainer = trained.trainer
    last = {str(e["layer"]): e for e in trainer.log}  # the final logged step per layer
    training = {"steps": trainer.step, "tokens": trainer.step * c.batch_tokens,
                "resumed_from_step": trained.resumed_from, "final": last,
                "device": str(next(iter(trainer.saes.values())).W_enc.device)}
    return {"layers": {str(i): q for i, q in analysis.quality.items()},
            "selected": {str(i): ids for i, ids in analysis.selected.items()},
            "training": training, "cache": trained.cache, "data": split.records}
