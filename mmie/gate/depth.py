"""Depth gates: is the forget language gone, or only hidden? (issue "Depth", docs/gates.md)

Read from the artifacts of `mmie relearn` and `mmie comprehension` (through
:func:`mmie.core.artifacts.load`, never by importing the depth stage), each tied to a gated arm
by the arm name it recorded (``metrics.arm_name``, named as `evaluate` names arms):

* ``relearn_recovery``: the recovery fraction after ``step`` attack steps on held-out forget
  texts (:func:`mmie.metrics.depth.recovery_fraction`), recomputed from ``scores.jsonl`` and
  bounded by BCa over texts (arm and base values of a text resampled together) at the gate's
  alpha; <= threshold passes. A cheap attack that brings the language back means it was hidden.
* ``retrieval_ratio``: top-1 parallel-sentence retrieval of the forget language, arm / base, at
  one block, from ``ranks.jsonl`` (the same sentences under both); Bonferroni-split
  Clopper-Pearson like the other ratios of proportions; <= threshold passes.

Both are report-only in the shipped gates.toml: they describe depth, and an arm may be
deployable while still understanding the language. A depth artifact holds one measurement of
an arm, not one per training seed, so these gates are judged once per arm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmie.core.artifacts import Artifact, load
from mmie.core.errors import ArtifactError, MetricError
from mmie.core.provenance import check_same_model
from mmie.gate.metrics import (
    Comparison,
    Direction,
    GateContext,
    Method,
    MissingInput,
    ProportionRatio,
    register_gate,
)
from mmie.metrics.depth import ratio_of_sums, recovery_fraction

SOURCES = {"relearn_recovery": "relearn", "retrieval_ratio": "comprehension"}
RELEARN_FIELDS = {"nll": "nll_sum", "script_mass": "mass_sum"}


@dataclass(frozen=True)
class DepthSettings:
    """relearn_step: attack steps after which recovery is judged (must be in the schedule).
    relearn_metric: 'nll' (mean NLL per token) or 'script_mass' (forget-script mass).
    retrieval_block: block of the retrieval ratio (None: where the base model retrieves the
    forget language best, i.e. where there is most to remove; chosen on the base alone).
    """

    relearn_step: int = 20
    relearn_metric: str = "nll"
    retrieval_block: int | None = None

    def __post_init__(self) -> None:
        if self.relearn_step < 1:
            raise ValueError(f"relearn step must be >= 1 (0 is before the attack), got "
                             f"{self.relearn_step}")
        if self.relearn_metric not in RELEARN_FIELDS:
            raise ValueError(f"relearn metric must be one of {', '.join(RELEARN_FIELDS)}, got "
                             f"{self.relearn_metric!r}")
        if self.retrieval_block is not None and self.retrieval_block < 0:
            raise ValueError(f"retrieval block must be >= 0, got {self.retrieval_block}")


@dataclass(frozen=True)
class DepthRecord:
    """One depth artifact: its path, kind, the arm it measured, metrics and rows."""

    path: str
    kind: str
    arm: str
    metrics: dict
    rows: list[dict]


@dataclass(frozen=True)
class DepthContext(GateContext):
    """The gate context plus the depth artifacts (``{kind: {arm: record}}``) and settings."""

    depth: Mapping[str, Mapping[str, DepthRecord]] = field(default_factory=dict)
    settings: DepthSettings = field(default_factory=DepthSettings)


ROWS = {"relearn": "scores.jsonl", "comprehension": "ranks.jsonl"}


def read_depth(paths: Sequence[Path | str], kind: str, baseline: Artifact,
               arms: Sequence[str]) -> dict[str, DepthRecord]:
    """``{arm: record}``; refuses another base model, two artifacts for one arm and an arm
    name that no gated eval has."""
    found: dict[str, DepthRecord] = {}
    for path in paths:
        art = load(path, kind=kind)
        check_same_model("baseline", baseline, art)
        arm = art.metrics.get("arm_name")
        if not isinstance(arm, str) or arm not in arms:
            raise MetricError(f"--{kind} {path} measured arm {arm!r}, which no --eval has "
                              f"(arms: {', '.join(arms)})")
        if arm in found:
            raise MetricError(f"two {kind} artifacts for arm '{arm}': {found[arm].path} and "
                              f"{path}")
        if ROWS[kind] not in art.manifest.get("files", {}):
            raise ArtifactError(f"{path}: {kind} artifact has no {ROWS[kind]}")
        found[arm] = DepthRecord(str(path), kind, arm, art.metrics, art.read_jsonl(ROWS[kind]))
    return found


def _record(ctx: GateContext, kind: str, arm: str) -> tuple[DepthRecord, DepthSettings]:
    records = getattr(ctx, "depth", {}).get(kind, {})
    if arm not in records:
        raise MissingInput(f"no {kind} artifact for arm '{arm}' (give one with --{kind})")
    return records[arm], ctx.settings


def _texts(rows: list[dict], run: str, step: int, fld: str) -> dict[int, tuple[float, float]]:
    return {int(r["idx"]): (float(r[fld]), float(r["n_tokens"])) for r in rows
            if r.get("run") == run and r.get("step") == step and r.get("set") == "heldout"
            and r.get(fld) is not None}


def _relearn_arrays(rec: DepthRecord, s: DepthSettings) -> list[np.ndarray]:
    if s.relearn_metric not in rec.metrics.get("metrics", []):
        why = rec.metrics.get("missing", {}).get(s.relearn_metric, "not recorded")
        raise MissingInput(f"{rec.path}: metric {s.relearn_metric} is missing ({why})")
    if s.relearn_step not in rec.metrics.get("steps", []):
        raise MissingInput(f"{rec.path}: step {s.relearn_step} is not in the attack schedule "
                           f"{rec.metrics.get('steps')}; choose one with --relearn-step")
    fld = RELEARN_FIELDS[s.relearn_metric]
    parts = [_texts(rec.rows, "arm", 0, fld), _texts(rec.rows, "arm", s.relearn_step, fld),
             _texts(rec.rows, "base", 0, fld)]
    keys = sorted(set(parts[0]) & set(parts[1]) & set(parts[2]))
    if len(keys) < 2:
        raise MissingInput(f"{rec.path}: {len(keys)} held-out text(s) scored at steps 0 and "
                           f"{s.relearn_step} for arm and base; need >= 2")
    arrays = [np.array([p[k] for k in keys], dtype=np.float64) for p in parts]
    if not all(np.isfinite(a).all() for a in arrays) or any((a[:, 1] <= 0).any()
                                                             for a in arrays):
        raise MissingInput(f"{rec.path}: NaN/inf values or texts without tokens")
    return arrays


@register_gate("relearn_recovery", Direction.LESS,
               "recovery fraction after K relearning-attack steps on held-out forget texts: "
               "(arm before - arm after) / (arm before - base); 0 = nothing came back",
               Method.BOOTSTRAP)
def _relearn_recovery(arm, _base, _xset, ctx) -> Comparison:
    rec, s = _record(ctx, "relearn", arm.arm)
    before, after, base = _relearn_arrays(rec, s)

    def stat(idx):
        return recovery_fraction(*(ratio_of_sums(a[:, 0], a[:, 1], idx)
                                   for a in (before, after, base)))

    if not np.isfinite(stat(np.arange(len(before)))):
        raise MissingInput(f"{rec.path}: the arm removed nothing (arm = base before the "
                           "attack): no recovery fraction")
    return Comparison(len(before), stat)


def retrieval_block(rec: DepthRecord, s: DepthSettings) -> int:
    """The configured block, or the block where the base model retrieves best (lowest first)."""
    cells = rec.metrics.get("base", {}).get("retrieval", {}).get(rec.metrics.get("forget"), {})
    if s.retrieval_block is not None:
        return s.retrieval_block
    if not cells:
        raise MissingInput(f"{rec.path}: no base retrieval of the forget language recorded")
    return min((int(b) for b in cells), key=lambda b: (-cells[str(b)]["top1"], b))


def _hits(rec: DepthRecord, condition: str, lang: Any, block: int) -> dict[int, int]:
    return {int(r["idx"]): int(r["rank"] == 1) for r in rec.rows
            if r.get("condition") == condition and r.get("lang") == lang
            and r.get("layer") == block}


@register_gate("retrieval_ratio", Direction.LESS,
               "top-1 retrieval of the aligned pivot sentence for the forget language at one "
               "block: arm / base; near 1 = the model still understands it", Method.RATIO)
def _retrieval_ratio(arm, _base, _xset, ctx) -> ProportionRatio:
    rec, s = _record(ctx, "comprehension", arm.arm)
    block, lang = retrieval_block(rec, s), rec.metrics.get("forget")
    mine, theirs = _hits(rec, "arm", lang, block), _hits(rec, "base", lang, block)
    keys = sorted(set(mine) & set(theirs))
    if len(keys) < 2:
        raise MissingInput(f"{rec.path}: {len(keys)} sentence(s) ranked under both the arm and "
                           f"the base model for '{lang}' at block {block}; need >= 2")
    xb = sum(theirs[k] for k in keys)
    if xb == 0:
        raise MissingInput(f"{rec.path}: the base model retrieves no '{lang}' sentence at "
                           f"block {block}; a ratio to it is undefined")
    return ProportionRatio(sum(mine[k] for k in keys), xb, len(keys))


def describe(records: Mapping[str, Mapping[str, DepthRecord]], s: DepthSettings) -> dict:
    """What gate.json records of each depth artifact: path, and the step or block judged."""
    out: dict[str, dict] = {}
    for kind, by_arm in records.items():
        for arm, rec in by_arm.items():
            entry: dict = {"path": rec.path}
            if kind == "relearn":
                entry.update(step=s.relearn_step, metric=s.relearn_metric)
            else:
                try:
                    entry.update(block=retrieval_block(rec, s), lang=rec.metrics.get("forget"))
                except MissingInput as exc:
                    entry.update(block=None, missing=str(exc))
            out.setdefault(arm, {})[kind] = entry
    return out
