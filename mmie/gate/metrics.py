"""What `mmie gate` measures: eval-artifact records, their checks, and the gate registry.

Each gate turns an arm's records (paired with the baseline's by ``(set, idx)``) into a
:class:`Comparison`: a sample count and a statistic over resampled sample indices, so that the
bootstrap in :mod:`mmie.core.stats` resamples whole samples, arm and baseline together. A gate whose
inputs are absent, null everywhere or non-finite raises :class:`MissingInput` with the reason.
Adding a gate is one registered extractor here plus its threshold in ``mmie/gates.toml``.
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
from mmie.core.stats import auc_statistic

Key = tuple[str, int]
Getter = Callable[[dict], Any]


class MissingInput(MetricError):
    """A gate's inputs are absent, all null or non-finite; the gate FAILs with this reason."""


class Direction(str, Enum):
    """Which side of the threshold passes: above, below, or inside a ``[low, high]`` band."""

    GREATER = "greater"
    LESS = "less"
    WITHIN = "within"


@dataclass(frozen=True)
class EvalRecords:
    """The parts of one eval artifact the gates read.

    samples / ppl: records of samples.jsonl / ppl.jsonl keyed by ``(set, idx)``; ppl is None
        when the artifact has no ppl.jsonl.
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

    def xlang_sets(self) -> list[str]:
        return sorted({name for name, _ in self.samples if name.startswith("xlang:")})


@dataclass(frozen=True)
class Comparison:
    """``statistic`` maps an index array ``(..., m)`` into the ``n`` samples to ``(...)``."""

    n: int
    statistic: Callable[[np.ndarray], np.ndarray]


Extractor = Callable[[EvalRecords, EvalRecords, "str | None"], Any]


@dataclass(frozen=True)
class GateSpec:
    """A registered gate.

    extract: ``(arm, baseline, xlang_set) -> Comparison`` (or a float for ``scope='seed'``).
    scope: 'sample' (bootstrap over samples) or 'seed' (one number per seed, e.g. probe AUC).
    per_xlang: expands into one gate per ``xlang:XX`` set of the baseline (``name:XX``).
    """

    name: str
    direction: Direction
    description: str
    extract: Extractor
    scope: str = "sample"
    per_xlang: bool = False


GATES: dict[str, GateSpec] = {}


def register_gate(name: str, direction: Direction, description: str, *,
                  scope: str = "sample", per_xlang: bool = False):
    """Decorator adding an extractor to :data:`GATES`."""

    def add(fn: Extractor) -> Extractor:
        if name in GATES:
            raise ValueError(f"gate '{name}' is already registered")
        GATES[name] = GateSpec(name, direction, description, fn, scope, per_xlang)
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
        mia=_jsonl(art, "mia.jsonl") if "mia.jsonl" in files else None, metrics=art.metrics)


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
    keys = sorted(k for k in base_table if k[0] == set_name and k in arm_table)
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


def _mean(values: np.ndarray) -> Comparison:
    return Comparison(len(values), lambda idx: values[idx].mean(axis=-1))


def _positive_rate(values: np.ndarray, what: str) -> None:
    if values.mean() <= 0:
        raise MissingInput(f"baseline {what} is 0; a relative change is undefined")


def _ratio_of_means(num: np.ndarray, den: np.ndarray) -> Comparison:
    def stat(idx):
        with np.errstate(divide="ignore", invalid="ignore"):
            return num[idx].mean(axis=-1) / den[idx].mean(axis=-1)

    return Comparison(len(num), stat)


def base_lang(code: str) -> str:
    """'ur-Latn' -> 'ur': substitution counts a language whatever script it is written in."""
    return code.split("-")[0]


# --- the gates --------------------------------------------------------------------------------

@register_gate("forget_drop", Direction.GREATER,
               "forget-language rate on 'forget' prompts: baseline minus arm (absolute drop)")
def _forget_drop(arm, base, _xset):
    a, b = paired(arm, base, "forget", "is_forget")
    return _mean(b[:, 0] - a[:, 0])


@register_gate("forget_drop_rel", Direction.GREATER,
               "forget-language rate on 'forget' prompts: drop relative to the baseline rate")
def _forget_drop_rel(arm, base, _xset):
    a, b = paired(arm, base, "forget", "is_forget")
    _positive_rate(b[:, 0], "forget rate on set 'forget'")
    ratio = _ratio_of_means(a[:, 0], b[:, 0])
    return Comparison(ratio.n, lambda idx: 1.0 - ratio.statistic(idx))


@register_gate("retain_ppl_ratio", Direction.LESS,
               "token-weighted perplexity on 'retain' texts: arm / baseline")
def _retain_ppl_ratio(arm, base, _xset):
    a, b = paired(arm, base, "retain", "nll_sum", "n_tokens", table="ppl")
    if (a[:, 1] <= 0).any() or (b[:, 1] <= 0).any():
        raise MissingInput("ppl.jsonl has records with n_tokens <= 0 on set 'retain'")

    def stat(idx):
        arm_nll = a[idx, 0].sum(axis=-1) / a[idx, 1].sum(axis=-1)
        base_nll = b[idx, 0].sum(axis=-1) / b[idx, 1].sum(axis=-1)
        return np.exp(arm_nll - base_nll)

    return Comparison(len(a), stat)


def _xlang_set(xset: str | None) -> str:
    if xset is None:
        raise MissingInput("the baseline has no 'xlang:XX' sets")
    return xset


@register_gate("xlang_leakage", Direction.LESS,
               "share of generations in the forget language on each protected language's prompts",
               per_xlang=True)
def _xlang_leakage(arm, base, xset):
    a, _ = paired(arm, base, _xlang_set(xset), "is_forget")
    return _mean(a[:, 0])


@register_gate("xlang_retention", Direction.GREATER,
               "own-language rate on each protected language's prompts: arm / baseline",
               per_xlang=True)
def _xlang_retention(arm, base, xset):
    xset = _xlang_set(xset)
    a, b = paired(arm, base, xset, "is_own")
    _positive_rate(b[:, 0], f"own-language rate on set '{xset}'")
    return _ratio_of_means(a[:, 0], b[:, 0])


@register_gate("degenerate", Direction.LESS,
               "share of degenerate generations (repetition, no letters) on 'forget' prompts")
def _degenerate(arm, base, _xset):
    a, _ = paired(arm, base, "forget", "degenerate")
    return _mean(a[:, 0])


@register_gate("fluency", Direction.LESS,
               "base-model NLL of 'forget' continuations: arm minus baseline (nats/token)")
def _fluency(arm, base, _xset):
    a, b = paired(arm, base, "forget", "fluency_nll")
    return _mean(a[:, 0] - b[:, 0])


@register_gate("substitution", Direction.LESS,
               "share of 'forget' generations in a protected related language (data.protected)")
def _substitution(arm, base, _xset):
    protected = arm.data.get("protected")
    if not protected:
        raise MissingInput("config data.protected is missing or empty")
    langs = {base_lang(code) for code in protected} - {arm.data.get("forget_lang")}

    def is_protected(record: dict) -> float | None:
        lang = record.get("lang")
        return None if lang is None else float(base_lang(lang) in langs)

    a, _ = paired(arm, base, "forget", is_protected)
    return _mean(a[:, 0])


def _forget_rate_on(set_name: str) -> Extractor:
    def extract(arm, base, _xset):
        a, _ = paired(arm, base, set_name, "is_forget")
        return _mean(a[:, 0])

    return extract


for _set in ("romanized", "mixed", "adversarial"):
    register_gate(f"{_set}_forget", Direction.LESS,
                  f"forget-language rate on '{_set}' forget prompts")(_forget_rate_on(_set))


@register_gate("mia_auc", Direction.WITHIN,
               "membership-inference ROC AUC (score: -loss) on mia.jsonl; near 0.5 = forgotten")
def _mia_auc(arm, _base, _xset):
    if arm.mia is None:
        raise MissingInput("arm artifact has no mia.jsonl")
    rows = [(r.get("loss"), r.get("member")) for r in arm.mia]
    rows = [r for r in rows if None not in r]
    data = np.array(rows, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(data).all():
        raise MissingInput("NaN/inf loss in mia.jsonl")
    members = int(data[:, 1].sum())
    if min(members, len(data) - members) < 2:
        raise MissingInput(f"mia.jsonl needs >= 2 members and >= 2 non-members, got {members} "
                           f"and {len(data) - members}")
    return Comparison(len(data), auc_statistic(-data[:, 0], data[:, 1]))


@register_gate("probe_auc", Direction.WITHIN,
               "language-probe ROC AUC from the eval metrics (one value per seed)", scope="seed")
def _probe_auc(arm, _base, _xset) -> float:
    entry = arm.metrics.get("probe_auc")
    entry = entry if isinstance(entry, Mapping) else {}
    value = entry.get("value")
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MissingInput(f"metric probe_auc is missing ({entry.get('missing', 'not recorded')})")
    return float(value)
