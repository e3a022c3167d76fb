"""`mmie comprehension`: does the model still understand the forget language, output aside?

From line-aligned files (each language's line i translates pivot line i) the mean-pooled hidden
states of the chosen blocks are harvested in one decoder pass per batch
(:func:`mmie.core.activations.harvest`; layer ``i`` is the output of block ``i``, so the issue's
"hidden state 13, index 0 = embeddings" is block 12). Per language and layer:

- parallel-sentence retrieval against the pivot (:mod:`mmie.depth.retrieval`): top-1 with a
  bootstrap interval over sentences, MRR, and their chance levels;
- for the forget language, a cross-validated linear probe separating its sentences from every
  other set's (:func:`mmie.core.similarity.probe_auc`; each fold scores held-out sentences).

With an arm (:mod:`mmie.depth.arms`) the same is measured on the base model and with the arm
applied, in one model load, plus the arm-minus-base change of top-1 with a paired interval.
Unlearning that removes the language should push its retrieval toward chance while the control
languages hold; unlearning that only hides the output leaves retrieval where it was (or raises
it, as issue #19 reports for an NPO + redirect run).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mmie.core.activations import harvest
from mmie.core.artifacts import Artifact, ModelIdentity, save, sha256_file
from mmie.core.data import read_parallel
from mmie.core.errors import ArtifactError, MetricError
from mmie.core.models import ModelSpec, loaded
from mmie.core.progress import SILENT, Progress
from mmie.core.similarity import probe_auc
from mmie.core.stats import bootstrap_ci, paired_bootstrap_ci
from mmie.depth.arms import ArmSpec, applied
from mmie.depth.retrieval import retrieve


@dataclass(frozen=True)
class ComprehensionConfig:
    """pivot: file of the pivot language (English), line-aligned with every ``langs`` file.
    langs: (name, file) sets; ``forget`` must be one of them, the others are controls.
    layers: blocks to measure (None = all). folds: probe folds (and the fewest sentences).
    max_samples: first N aligned rows (None = all). n_boot, alpha: bootstrap intervals.
    """

    pivot: str
    langs: tuple[tuple[str, str], ...]
    forget: str = "hi"
    pivot_name: str = "en"
    model: ModelSpec = ModelSpec()
    arm: ArmSpec = ArmSpec()
    field: str = "text"
    layers: tuple[int, ...] | None = None
    max_samples: int | None = None
    max_length: int = 128
    batch_size: int = 8
    folds: int = 5
    seed: int = 0
    n_boot: int = 2000
    alpha: float = 0.05

    def __post_init__(self) -> None:
        names = [n for n, _ in self.langs]
        if not self.pivot or not self.langs or any(not n or not p for n, p in self.langs):
            raise ValueError("a pivot file and at least one NAME=FILE language are required")
        if len(set(names)) != len(names) or self.pivot_name in names:
            raise ValueError(f"language names repeat: {', '.join([self.pivot_name, *names])}")
        if self.forget not in names:
            raise ValueError(f"forget language '{self.forget}' is not among {', '.join(names)}")
        if self.folds < 2 or self.max_length < 2 or self.batch_size < 1 or self.n_boot < 1:
            raise ValueError("folds >= 2, max_length >= 2, batch_size >= 1, n_boot >= 1")
        if self.max_samples is not None and self.max_samples < self.folds:
            raise ValueError(f"max-samples {self.max_samples} is below folds {self.folds}")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"layers must be block indices >= 0, got {self.layers}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")


def read_sets(c: ComprehensionConfig) -> dict[str, list[str]]:
    """``{pivot_name: [...], lang: [...]}``, rows kept only where every file has text."""
    paths = [c.pivot, *(p for _, p in c.langs)]
    rows = read_parallel(paths, field=c.field, limit=c.max_samples)
    if len(rows) < c.folds:
        raise MetricError(f"{len(rows)} aligned rows, fewer than the {c.folds} probe folds")
    names = [c.pivot_name, *(n for n, _ in c.langs)]
    return {name: [row[k] for row in rows] for k, name in enumerate(names)}


Pooled = dict[str, dict[int, np.ndarray]]  # set name -> layer -> [n, d]


def _layers(c: ComprehensionConfig, n_layers: int) -> list[int]:
    layers = list(range(n_layers)) if c.layers is None else sorted(set(c.layers))
    if bad := [i for i in layers if i >= n_layers]:
        raise ValueError(f"layers {bad} out of range: the model has {n_layers} blocks")
    return layers


def _pool(lm, sets: dict[str, list[str]], layers: list[int], c: ComprehensionConfig,
          progress: Progress, tag: str) -> Pooled:
    kw = dict(max_length=c.max_length, batch_size=c.batch_size, token_sample=0, seed=c.seed,
              progress=progress)
    return {name: {k: v.double().numpy() for k, v in
                   harvest(lm, texts, layers, desc=f"{tag} {name}", **kw).pooled.items()}
            for name, texts in sets.items()}


def measure(c: ComprehensionConfig, sets: dict[str, list[str]],
            progress: Progress = SILENT) -> tuple[dict[str, Pooled], dict, ModelIdentity, list]:
    """Pooled states of every set for ``base`` (and ``arm`` if one is given), one model load."""
    with loaded(c.model) as lm:
        layers = _layers(c, lm.n_layers)
        pooled = {"base": _pool(lm, sets, layers, c, progress, "base")}
        record: dict = {}
        if not c.arm.is_base:
            with applied(lm, c.arm) as record:
                pooled["arm"] = _pool(lm, sets, layers, c, progress, "arm")
        return pooled, record, lm.identity, layers


def _retrieval_cell(query, pivot, c: ComprehensionConfig) -> tuple[dict, np.ndarray]:
    got, ranks = retrieve(query, pivot)
    hits = (ranks == 1).astype(np.float64)
    cell = got.to_dict()
    try:
        ci = bootstrap_ci(hits, n_boot=c.n_boot, alpha=c.alpha, seed=c.seed)
        cell.update(top1_low=ci.low, top1_high=ci.high, ci_method=ci.method)
    except MetricError as exc:
        cell["ci_missing"] = str(exc)
    return cell, ranks


def _probe_cell(pooled: Pooled, layer: int, c: ComprehensionConfig) -> dict:
    others = np.concatenate([v[layer] for name, v in pooled.items() if name != c.forget])
    try:
        got = probe_auc(pooled[c.forget][layer], others, folds=c.folds, seed=c.seed)
    except MetricError as exc:
        return {"value": None, "missing": str(exc)}
    return {"value": got.auc, "auc_std": got.auc_std, "folds": got.folds}


def _condition(pooled: Pooled, layers: list[int], c: ComprehensionConfig):
    """Retrieval per language and layer, the probe per layer, and every rank (for the file)."""
    retrieval, probe, ranks = {}, {}, {}
    for name, _ in c.langs:
        retrieval[name] = {}
        for layer in layers:
            cell, r = _retrieval_cell(pooled[name][layer], pooled[c.pivot_name][layer], c)
            retrieval[name][str(layer)], ranks[(name, layer)] = cell, r
    for layer in layers:
        probe[str(layer)] = _probe_cell(pooled, layer, c)
    return {"retrieval": retrieval, "probe": probe}, ranks


def _change(base_ranks: dict, arm_ranks: dict, c: ComprehensionConfig) -> dict:
    """Arm minus base top-1 per language and layer, paired over sentences."""
    out: dict = {}
    for (name, layer), arm in arm_ranks.items():
        a, b = (arm == 1).astype(float), (base_ranks[(name, layer)] == 1).astype(float)
        try:
            ci = paired_bootstrap_ci(a, b, n_boot=c.n_boot, alpha=c.alpha, seed=c.seed)
            cell = {"value": ci.estimate, "low": ci.low, "high": ci.high, "method": ci.method}
        except MetricError as exc:
            cell = {"value": float(a.mean() - b.mean()), "missing": str(exc)}
        out.setdefault(name, {})[str(layer)] = cell
    return out


def _rank_rows(all_ranks: dict[str, dict]) -> str:
    rows = [{"condition": cond, "lang": name, "layer": layer, "idx": i, "rank": int(r)}
            for cond, ranks in all_ranks.items() for (name, layer), rs in ranks.items()
            for i, r in enumerate(rs)]
    return "".join(json.dumps(row) + "\n" for row in rows)


def _data_records(c: ComprehensionConfig, n: int) -> dict:
    files = {c.pivot_name: c.pivot, **dict(c.langs)}
    return {name: {"path": str(path), "n": n,
                   "sha256": sha256_file(Path(path)) if Path(path).is_file() else None}
            for name, path in files.items()}


def run(config: ComprehensionConfig, out: Path | str, *, force: bool = False,
        progress: Progress = SILENT) -> Artifact:
    """Measure retrieval and the probe, save and return the ``comprehension`` artifact."""
    if Path(out).exists() and not force:
        raise ArtifactError(f"{out} already exists; pass --force to replace it")
    sets = read_sets(config)
    pooled, record, identity, layers = measure(config, sets, progress)
    metrics: dict = {"layers": layers, "forget": config.forget, "pivot": config.pivot_name,
                     "n": len(sets[config.pivot_name]), "arm_name": record.get("arm", "base"),
                     "data": _data_records(config, len(sets[config.pivot_name]))}
    all_ranks = {}
    for cond, by_set in pooled.items():
        metrics[cond], all_ranks[cond] = _condition(by_set, layers, config)
    if "arm" in pooled:
        metrics["change_top1"] = _change(all_ranks["base"], all_ranks["arm"], config)
    settings = {**asdict(config), "applied": {k: v for k, v in record.items() if k != "arm"}}
    files = {"ranks.jsonl": _rank_rows(all_ranks), "retrieval.png": plot_png(metrics, config)}
    parents = [Path(p) for p in (config.arm.adapter, config.arm.sae, config.arm.scrub,
                                 config.arm.neurons) if p]
    return save(out, "comprehension", tensors={}, config=settings, model=identity,
                parents=parents, metrics=metrics, files=files, force=force)


def plot_png(metrics: dict, c: ComprehensionConfig) -> bytes:
    """Top-1 against block per language (base solid, arm dashed) and the chance level."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    layers = metrics["layers"]
    for k, (name, _) in enumerate(c.langs):
        for cond, style in (("base", "-"), ("arm", "--")):
            if cond in metrics:
                cells = metrics[cond]["retrieval"][name]
                ax.plot(layers, [cells[str(i)]["top1"] for i in layers], style, marker=".",
                        color=f"C{k}", label=f"{name} ({cond})")
    ax.axhline(1 / metrics["n"], color="grey", linestyle=":", label="chance")
    ax.set_xlabel("block")
    ax.set_ylabel(f"top-1 retrieval of the aligned {c.pivot_name} sentence")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()
