"""What `mmie gate` measures: eval-artifact records, their checks, and the gate registry.

Each gate turns an arm's records (paired with the baseline's by ``(set, idx)``) into evidence
of one of three kinds, which fixes how :mod:`mmie.core.bounds` bounds it:

* :class:`Proportion` ``x`` of ``n`` (a rate of 0/1 outcomes): exact Clopper-Pearson;
* :class:`ProportionRatio` (arm rate / baseline rate on the same prompts): Bonferroni-split
  Clopper-Pearson;
* :class:`Comparison` (any other statistic over resampled sample indices, arm and baseline
  resampled together): BCa bootstrap.

A gate whose inputs are absent, null everywhere or non-finite raises :class:`MissingInput`
with the reason. Adding a gate is one registered extractor here plus its threshold in
``mmie/gates.toml`` (the forward-only gates on mass.jsonl and mia.jsonl register themselves
in :mod:`mmie.gate.forward`, the paired kept-share gate ``xlang_retention`` in
:mod:`mmie.gate.paired`). Substitution and the perplexity ratio are defined once, in
:mod:`mmie.metrics.definitions`, and used by both `evaluate` and the gates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from mmie.core.artifacts import Artifact, load
from mmie.core.errors import ArtifactError, MetricError
from mmie.core.registry import Registry
from mmie.metrics import definitions as em

Key = tuple[str, int]
Getter = Callable[[dict], Any]


class MissingInput(MetricError):
    """A gate's inputs are absent, all null or non-finite; the gate FAILs with this reason."""


class Direction(str, Enum):
    """Which side of the threshold passes: above, below, or inside a ``[low, high]`` band."""

    GREATER = "greater"
    LESS = "less"
    WITHIN = "within"


class Method(str, Enum):
    """How a gate's evidence is bounded (see the module docstring)."""

    PROPORTION = "proportion"
    RATIO = "proportion ratio"
    BOOTSTRAP = "bootstrap"
    SEED = "per-seed value"


@dataclass(frozen=True)
class EvalRecords:
    """The parts of one eval artifact the gates read.

    samples / ppl / mass: records of samples.jsonl / ppl.jsonl / mass.jsonl keyed by
        ``(set, idx)``; ppl and mass are None when the artifact lacks the file.
    mia: records of mia.jsonl, or None when absent.
    metrics: the manifest metrics (``{name: {"value", "n", "missing"?}}``).
    """

    path: str
    arm: str
    seed: int
    data: dict
    samples: dict[Key, dict]
    ppl: dict[Key, dict] | None = None
    mia: list[dict] | None = None
    metrics: dict = field(default_factory=dict)
    mass: dict[Key, dict] | None = None

    def xlang_sets(self) -> list[str]:
        return sorted({name for name, _ in self.samples if name.startswith("xlang:")})


@dataclass(frozen=True)
class Proportion:
    """``x`` successes of ``n`` 0/1 outcomes; ``detail`` is shown in the report."""

    x: int
    n: int
    detail: str = ""


@dataclass(frozen=True)
class ProportionRatio:
    """Arm rate ``xa / n`` over baseline rate ``xb / n`` on the same ``n`` prompts."""

    xa: int
    xb: int
    n: int


@dataclass(frozen=True)
class Comparison:
    """``statistic`` maps an index array ``(..., m)`` into the ``n`` samples to ``(...)``.

    strata: optional class of each sample; the bootstrap then resamples within classes.
    """

    n: int
    statistic: Callable[[np.ndarray], np.ndarray]
    strata: np.ndarray | None = None


@dataclass(frozen=True)
class GateContext:
    """Run-wide settings an extractor may need."""

    replacement_lang: str = "en"


Extractor = Callable[[EvalRecords, EvalRecords, "str | None", GateContext], Any]


@dataclass(frozen=True)
class GateSpec:
    """A registered gate.

    extract: ``(arm, baseline, xlang_set, context) -> evidence`` (a float for
        ``method=SEED``).
    per_xlang: expands into one gate per ``xlang:XX`` set of the baseline (``name:XX``).
    floor: the gate compares with the baseline on a prompt family and is *not informative*
        (shown, not decisive) when the baseline's own rate there is below the rule's floor.
    """

    name: str
    direction: Direction
    description: str
    extract: Extractor
    method: Method
    per_xlang: bool = False
    floor: bool = False


GATES: Registry[GateSpec] = Registry("gate")


def register_gate(name: str, direction: Direction, description: str, method: Method, *,
                  per_xlang: bool = False, floor: bool = False):
    """Decorator adding an extractor to :data:`GATES`."""

    def add(fn: Extractor) -> Extractor:
        GATES.add(name, GateSpec(name, direction, description, fn, method, per_xlang, floor))
        return fn

    return add


def instances(spec: GateSpec, baseline: EvalRecords) -> list[tuple[str, str | None]]:
    """``(gate name, xlang set)`` pairs; a per-xlang gate with no xlang set stays one instance
    (it will FAIL, naming the missing sets, rather than silently vanish)."""
    if not spec.per_xlang:
        return [(spec.name, None)]
    sets = baseline.xlang_sets()
    if not sets:
        return [(spec.name, None)]
    return [(f"{spec.name}:{s.removeprefix('xlang:')}", s) for s in sets]


# --- eval artifacts -------------------------------------------------------------------------

def _jsonl(art: Artifact, rel: str) -> list[dict]:
    try:
        return art.read_jsonl(rel)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{art.path / rel}: invalid JSON ({exc})") from exc


def _keyed(art: Artifact, rel: str) -> dict[tuple[str, int], dict]:
    out: dict[tuple[str, int], dict] = {}
    for n, rec in enumerate(_jsonl(art, rel), 1):
        try:
            key = (str(rec["set"]), int(rec["idx"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{art.path / rel}: record {n} has no valid set/idx") from exc
        if key in out:
            raise ArtifactError(f"{art.path / rel}: two records for set '{key[0]}' idx {key[1]}")
        out[key] = rec
    return out


def read_eval(path: Path) -> EvalRecords:
    """The records of one eval artifact, verified by :func:`mmie.core.artifacts.load`."""
    art = load(path, kind="eval")
    for key, kind in (("arm", str), ("seed", int), ("data", dict)):
        if not isinstance(art.config.get(key), kind) or isinstance(art.config[key], bool):
            raise ArtifactError(f"{path}: eval config needs '{key}' ({kind.__name__}), found "
                                f"{art.config.get(key)!r}")
    files = art.manifest.get("files", {})
    if "samples.jsonl" not in files:
        raise ArtifactError(f"{path}: eval artifact has no samples.jsonl")
    return EvalRecords(
        path=str(path), arm=art.config["arm"], seed=art.config["seed"],
        data=art.config["data"], samples=_keyed(art, "samples.jsonl"),
        ppl=_keyed(art, "ppl.jsonl") if "ppl.jsonl" in files else None,
        mia=_jsonl(art, "mia.jsonl") if "mia.jsonl" in files else None, metrics=art.metrics,
        mass=_keyed(art, "mass.jsonl") if "mass.jsonl" in files else None)


def group_evals(paths: Sequence[Path]) -> dict[str, dict[int, EvalRecords]]:
    """``{arm: {seed: records}}``, refusing two evals for one arm and seed."""
    arms: dict[str, dict[int, EvalRecords]] = {}
    for path in paths:
        rec = read_eval(Path(path))
        seeds = arms.setdefault(rec.arm, {})
        if rec.seed in seeds:
            raise MetricError(f"two evals for arm '{rec.arm}' seed {rec.seed}: "
                              f"{seeds[rec.seed].path} and {rec.path}")
        seeds[rec.seed] = rec
    return {arm: dict(sorted(seeds.items())) for arm, seeds in sorted(arms.items())}


def data_difference(base: Mapping, other: Mapping, prefix: str = "data") -> str | None:
    """The first differing key of two ``data`` dicts (dotted), or None when equal."""
    for key in sorted(set(base) | set(other), key=str):
        name = f"{prefix}.{key}"
        if key not in other or key not in base:
            return f"{name} is only in the {'baseline' if key in base else 'eval'}"
        a, b = base[key], other[key]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            if found := data_difference(a, b, name):
                return found
        elif a != b:
            return f"{name} differs (baseline {a!r}, eval {b!r})"
    return None


def check_inputs(base: EvalRecords, arms: Mapping[str, Mapping[int, EvalRecords]]) -> None:
    """Same data as the baseline and >= 2 'forget' samples paired with it, for every eval."""
    for seeds in arms.values():
        for rec in seeds.values():
            if diff := data_difference(base.data, rec.data):
                raise MetricError(f"{rec.path} was not made on the same data as the baseline "
                                  f"{base.path}: {diff}")
            shared = sum(1 for k in base.samples if k[0] == "forget" and k in rec.samples)
            if shared < 2:
                raise MetricError(f"{rec.path}: {shared} 'forget' sample(s) paired with the "
                                  "baseline; each comparison needs at least 2")


# --- pairing helpers --------------------------------------------------------------------------

def _getter(spec: str | Getter) -> Getter:
    return spec if callable(spec) else (lambda record: record.get(spec))


def _keys(arm: EvalRecords, base: EvalRecords, set_name: str,
          table: str = "samples") -> list[Key]:
    theirs, ours = getattr(base, table), getattr(arm, table)
    return sorted(k for k in theirs if k[0] == set_name and k in ours)


def paired(arm: EvalRecords, base: EvalRecords, set_name: str, *fields: str | Getter,
           table: str = "samples") -> tuple[np.ndarray, np.ndarray]:
    """Arm and baseline values ``[n, len(fields)]`` on ``set_name``, paired by ``(set, idx)``.

    Pairs where any field is null on either side are skipped (nulls are allowed, e.g. is_own
    on a sample whose language is undetermined); NaN is not, since it signals a broken eval.
    """
    arm_table, base_table = getattr(arm, table), getattr(base, table)
    for who, tab in (("arm", arm_table), ("baseline", base_table)):
        if tab is None:
            raise MissingInput(f"{who} artifact has no {table}.jsonl")
    getters = [_getter(f) for f in fields]
    keys = _keys(arm, base, set_name, table)
    rows = [([g(arm_table[k]) for g in getters], [g(base_table[k]) for g in getters])
            for k in keys]
    rows = [r for r in rows if None not in r[0] and None not in r[1]]
    names = ", ".join(f if isinstance(f, str) else f.__name__ for f in fields)
    if len(rows) < 2:
        raise MissingInput(f"{len(rows)} paired sample(s) with {names} on set '{set_name}' "
                           f"({len(keys)} paired in all; need >= 2)")
    a = np.array([r[0] for r in rows], dtype=np.float64)
    b = np.array([r[1] for r in rows], dtype=np.float64)
    for who, values, rec in (("baseline", b, base), ("eval", a, arm)):  # name the broken side
        if not np.isfinite(values).all():
            raise MissingInput(f"NaN/inf in {names} on set '{set_name}' of the {who} {rec.path}")
    return a, b


def _count(values: np.ndarray) -> Proportion:
    return Proportion(int(values.sum()), len(values))


def xlang_set(xset: str | None) -> str:
    if xset is None:
        raise MissingInput("the baseline has no 'xlang:XX' sets")
    return xset


# --- generation-based gates ---------------------------------------------------------------

@register_gate("forget_rate", Direction.LESS,
               "share of 'forget' generations in the forget language (absolute)",
               Method.PROPORTION)
def _forget_rate(arm, base, _xset, _ctx):
    a, _ = paired(arm, base, "forget", "is_forget")
    return _count(a[:, 0])


@register_gate("replacement", Direction.GREATER,
               "share of 'forget' generations answered fluently in the replacement language",
               Method.PROPORTION)
def _replacement(arm, base, _xset, ctx):
    def replaced(record: dict) -> float:
        return float(em.fluent_replacement(record, ctx.replacement_lang))

    a, _ = paired(arm, base, "forget", replaced)
    return _count(a[:, 0])


@register_gate("substitution", Direction.LESS,
               "share of 'forget' generations in a language other than the forget and the "
               "replacement language", Method.PROPORTION)
def _substitution(arm, base, _xset, ctx):
    forget = arm.data.get("forget_lang")
    if not forget:
        raise MissingInput("config data.forget_lang is missing")
    labels = np.array([em.record_label(arm.samples[k]) for k in _keys(arm, base, "forget")])
    other = np.array([em.substituted(lb, forget, ctx.replacement_lang) for lb in labels])
    if len(labels) < 2:
        raise MissingInput(f"{len(labels)} paired sample(s) on set 'forget'; need >= 2")
    langs = sorted({em.base_lang(lb) for lb in labels[other]})
    detail = ", ".join(f"{lang} {sum(em.base_lang(lb) == lang for lb in labels)}"
                       for lang in langs)
    return Proportion(int(other.sum()), len(labels), f"into {detail}" if detail else "")


@register_gate("degenerate", Direction.LESS,
               "share of degenerate generations (repetition, no letters) on 'forget' prompts",
               Method.PROPORTION)
def _degenerate(arm, base, _xset, _ctx):
    a, _ = paired(arm, base, "forget", "degenerate")
    return _count(a[:, 0])


@register_gate("xlang_leakage", Direction.LESS,
               "share of each protected language's prompts the arm answers in the forget "
               "language where the baseline did not (leakage the edit introduced)",
               Method.PROPORTION, per_xlang=True)
def _xlang_leakage(arm, base, xset, _ctx):
    # Paired, like xlang_retention: the baseline's own forget-language (or undetermined) answers
    # on these prompts are the model's, not the edit's. Counted against it, an arm identical to
    # a baseline with 2 such answers of 60 had an upper bound of 0.101 and failed.
    a, b = paired(arm, base, xlang_set(xset), "is_forget")
    new = (a[:, 0] == 1) & (b[:, 0] == 0)
    detail = (f"introduced {int(new.sum())} of {len(new)}; arm rate {int(a[:, 0].sum())}/"
              f"{len(a)}, baseline {int(b[:, 0].sum())}/{len(b)}")
    return Proportion(int(new.sum()), len(new), detail)


def _family_rate(set_name: str) -> Extractor:
    def extract(arm, base, _xset, _ctx):
        a, b = paired(arm, base, set_name, "is_forget")
        return ProportionRatio(int(a[:, 0].sum()), int(b[:, 0].sum()), len(a))

    return extract


for _set in ("romanized", "mixed", "adversarial"):
    register_gate(f"{_set}_forget", Direction.LESS,
                  f"forget-language rate on '{_set}' forget prompts: arm / baseline",
                  Method.RATIO, floor=True)(_family_rate(_set))


@register_gate("fluency", Direction.LESS,
               "base-model NLL of 'forget' continuations: arm minus baseline (nats/token)",
               Method.BOOTSTRAP)
def _fluency(arm, base, _xset, _ctx):
    a, b = paired(arm, base, "forget", "fluency_nll")
    diff = a[:, 0] - b[:, 0]
    return Comparison(len(diff), lambda idx: diff[idx].mean(axis=-1))


# --- forward-only gates ---------------------------------------------------------------------

@register_gate("retain_ppl_ratio", Direction.LESS,
               "token-weighted perplexity on 'retain' texts: arm / baseline", Method.BOOTSTRAP)
def _retain_ppl_ratio(arm, base, _xset, _ctx):
    a, b = paired(arm, base, "retain", "nll_sum", "n_tokens", table="ppl")
    if (a[:, 1] <= 0).any() or (b[:, 1] <= 0).any():
        raise MissingInput("ppl.jsonl has records with n_tokens <= 0 on set 'retain'")

    def stat(idx):
        arm_nll = a[idx, 0].sum(axis=-1) / a[idx, 1].sum(axis=-1)
        base_nll = b[idx, 0].sum(axis=-1) / b[idx, 1].sum(axis=-1)
        return em.ppl_ratio(arm_nll, base_nll)

    return Comparison(len(a), stat)


@register_gate("probe_auc", Direction.WITHIN,
               "language-probe ROC AUC from the eval metrics (one value per seed)", Method.SEED)
def _probe_auc(arm, _base, _xset, _ctx) -> float:
    entry = arm.metrics.get("probe_auc")
    entry = entry if isinstance(entry, Mapping) else {}
    value = entry.get("value")
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MissingInput(f"metric probe_auc is missing ({entry.get('missing', 'not recorded')})")
    return float(value)
