"""Per-layer forget-vs-retain metrics and the rules that pick layers from them.

Metrics come from :mod:`mmie.core.similarity`; a metric that cannot be computed for a layer is kept
as missing with its reason, and the rules score each layer on whatever is left.

A rule (strategy) is a signed sum of z-scored metrics over the candidate layers. The z-score
divides by ``max(std, min_spread)``: a metric that is flat across layers (probe AUC saturated
at 1.0 on every layer, say) then contributes ~0 instead of magnifying noise-level differences.
A layer missing one of the rule's metrics gets 0 for that term (counted as average). Layers are
ranked by score, highest first, ties broken by the lower layer index, so the choice is
deterministic.

The language-specific neuron count follows LAPE (Tang et al. 2024, "Language-Specific Neurons"):
per language, the probability that a neuron is active (> 0) over tokens; normalised across
languages, its entropy. Neurons whose probability is above the ``prob_quantile`` of all
probabilities in no language are dismissed; of the rest, the ``entropy_quantile`` share of all
neurons with the lowest entropy is language-specific, and counts for every language whose
probability is above that threshold (a Hindi/Urdu neuron counts for both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mmie.core.errors import MetricError
from mmie.core.registry import Registry
from mmie.core.similarity import LAYER_METRICS, probe_auc

PROBE = "probe_auc"
UNPAIRED_REASON = ("forget and retain are not line-aligned (paired=false); this metric compares "
                   "the same inputs under two representations")


@dataclass
class LayerRow:
    """Everything measured about one layer (block output), for the table and the rule."""

    layer: int
    candidate: bool
    values: dict[str, float] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    score: float | None = None
    rank: int | None = None
    lape: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        metrics = {name: self.values.get(name) for name in metric_names()}
        return {"layer": self.layer, "candidate": self.candidate, **metrics,
                "probe_auc_std": self.values.get("probe_auc_std"), "missing": self.missing,
                "score": self.score, "rank": self.rank, "lape": self.lape}


def metric_names() -> list[str]:
    """Names of the per-layer metrics: the probe, then the paired ones registered in similarity."""
    return [PROBE] + [m.name for m in LAYER_METRICS.values() if m.paired]


def _attempt(values: dict, missing: dict, name: str, compute) -> None:
    try:
        found = compute()
    except (MetricError, np.linalg.LinAlgError) as exc:
        missing[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return
    if not all(math.isfinite(v) for v in found.values()):
        missing[name] = f"non-finite result {found}"
        return
    values.update(found)


def measure_layer(layer: int, forget: torch.Tensor, retain: torch.Tensor, *, paired: bool,
                  folds: int, seed: int, candidate: bool) -> LayerRow:
    """Every metric for one layer's pooled activations ([n, d] each, rows paired if ``paired``)."""
    row = LayerRow(layer, candidate)
    for metric in LAYER_METRICS.values():
        if not metric.paired:
            continue  # the probe below is the unpaired metric, run with our folds and seed
        if not paired:
            row.missing[metric.name] = UNPAIRED_REASON
            continue
        _attempt(row.values, row.missing, metric.name,
                 lambda m=metric: {m.name: float(m.fn(forget, retain))})
    _attempt(row.values, row.missing, PROBE, lambda: _probe_values(forget, retain, folds, seed))
    return row


def _probe_values(forget, retain, folds: int, seed: int) -> dict[str, float]:
    result = probe_auc(forget, retain, folds=folds, seed=seed)
    return {PROBE: result.auc, "probe_auc_std": result.auc_std}


@dataclass(frozen=True)
class Strategy:
    """A layer-picking rule: score = sum(sign * z(metric)) over ``terms``.

    terms: (metric name, +1 when higher is better for forgetting, -1 when lower is better).
    description: one line shown in ``--help`` and stored with the artifact.
    """

    name: str
    terms: tuple[tuple[str, int], ...]
    description: str


STRATEGIES: Registry[Strategy] = Registry("strategy")


def register_strategy(strategy: Strategy) -> Strategy:
    return STRATEGIES.add(strategy.name, strategy)


register_strategy(Strategy(
    "probe-cka", ((PROBE, +1), ("debiased_cka", -1)),
    "z(probe AUC) - z(debiased CKA): the language is decodable and represented unlike retain"))
register_strategy(Strategy("probe", ((PROBE, +1),), "highest linear-probe AUC"))
register_strategy(Strategy("cka", (("debiased_cka", -1),), "lowest debiased CKA"))
register_strategy(Strategy(
    "probe-procrustes", ((PROBE, +1), ("procrustes", -1)),
    "z(probe AUC) - z(Procrustes similarity)"))


def zscores(values: Mapping[int, float], min_spread: float) -> dict[int, float]:
    """(v - mean) / max(std, min_spread) over the given layers."""
    arr = np.array(list(values.values()), dtype=np.float64)
    scale = max(float(arr.std()), min_spread)
    return {layer: (v - float(arr.mean())) / scale for layer, v in values.items()}


@dataclass(frozen=True)
class Choice:
    """The chosen layers, best first, with the reason for each (keyed by str(layer))."""

    chosen: list[int]
    reasons: dict[str, dict]
    dropped: dict[str, str]   # rule metrics missing on every candidate, with one reason each


def _term_values(rows: Sequence[LayerRow], metric: str) -> dict[int, float]:
    return {r.layer: r.values[metric] for r in rows if metric in r.values}


def _usable_terms(strategy: Strategy, rows: Sequence[LayerRow]):
    terms, dropped = [], {}
    for metric, sign in strategy.terms:
        if _term_values(rows, metric):
            terms.append((metric, sign))
        else:
            reasons = {r.missing.get(metric, "not computed") for r in rows}
            dropped[metric] = "; ".join(sorted(reasons))
    if not terms:
        detail = "; ".join(f"{m}: {why}" for m, why in dropped.items())
        raise MetricError(f"strategy '{strategy.name}' has no usable metric on any candidate "
                          f"layer ({detail})")
    return terms, dropped


def choose(rows: Sequence[LayerRow], strategy: Strategy, top_k: int,
           min_spread: float) -> Choice:
    """Score the candidate rows (in place), rank them and keep the ``top_k`` best."""
    candidates = [r for r in rows if r.candidate]
    terms, dropped = _usable_terms(strategy, candidates)
    z = {metric: zscores(_term_values(candidates, metric), min_spread) for metric, _ in terms}
    scored = [r for r in candidates if any(r.layer in z[m] for m, _ in terms)]
    if len(scored) < top_k:
        raise MetricError(f"only {len(scored)} candidate layer(s) have a usable metric for "
                          f"strategy '{strategy.name}'; top-k is {top_k}")
    for row in scored:
        row.score = sum(sign * z[m].get(row.layer, 0.0) for m, sign in terms)
    ranked = sorted(scored, key=lambda r: (-r.score, r.layer))
    for rank, row in enumerate(ranked, start=1):
        row.rank = rank
    chosen = ranked[:top_k]
    reasons = {str(r.layer): _reason(r, terms, z, len(ranked)) for r in chosen}
    return Choice([r.layer for r in chosen], reasons, dropped)


def _reason(row: LayerRow, terms, z, n_ranked: int) -> dict:
    parts, detail = [], {}
    for metric, sign in terms:
        if row.layer not in z[metric]:
            detail[metric] = {"value": None, "missing": row.missing.get(metric, "not computed")}
            parts.append(f"{metric} missing (counted as average)")
            continue
        value, zv = row.values[metric], z[metric][row.layer]
        detail[metric] = {"value": value, "z": zv, "better": "higher" if sign > 0 else "lower"}
        parts.append(f"{metric}={value:.4g} (z={zv:+.2f}, {detail[metric]['better']} is better)")
    text = f"rank {row.rank} of {n_ranked}: " + ", ".join(parts) + f"; score {row.score:+.3f}"
    return {"rank": row.rank, "score": row.score, "terms": detail, "text": text}


@dataclass(frozen=True)
class LapeResult:
    """Language-specific neurons (see the module docstring)."""

    counts: dict[int, dict[str, int]]   # layer -> language -> count
    threshold: float                    # activation-probability threshold
    entropy_cutoff: float | None        # highest entropy among the selected neurons
    selected: int                       # neurons specific to at least one language


def _entropy(p: np.ndarray, n_langs: int) -> np.ndarray:
    total = p.sum(0)
    q = p / np.where(total > 0, total, 1.0)
    logs = np.log(np.where(q > 0, q, 1.0))
    # A never-active neuron has no distribution; maximal entropy keeps it out of the selection.
    return np.where(total > 0, -(q * logs).sum(0), math.log(n_langs))


def lape_counts(prob: torch.Tensor, languages: Sequence[str], *, entropy_quantile: float,
                prob_quantile: float) -> LapeResult:
    """Count language-specific neurons from ``prob`` [languages, layers, neurons].

    Like the LAPE reference code: neurons with no language above the threshold are dismissed,
    then the ``entropy_quantile`` share of all neurons with the lowest entropy is kept.
    """
    if prob.shape[0] < 2:
        raise MetricError(f"language-specific neurons need at least 2 languages, got "
                          f"{prob.shape[0]}")
    p = prob.double().numpy()
    threshold = float(np.quantile(p, prob_quantile))
    entropy = np.where(p.max(0) > threshold, _entropy(p, len(languages)), np.inf)
    k = max(1, round(entropy.size * entropy_quantile))
    picked = np.argsort(entropy, axis=None, kind="stable")[:k]
    picked = picked[np.isfinite(entropy.flat[picked])]
    specific = np.zeros(entropy.size, dtype=bool)
    specific[picked] = True
    specific = specific.reshape(entropy.shape)
    counts = {layer: {lang: int((specific[layer] & (p[i, layer] > threshold)).sum())
                      for i, lang in enumerate(languages)} for layer in range(p.shape[1])}
    cutoff = float(entropy.flat[picked].max()) if len(picked) else None
    return LapeResult(counts, threshold, cutoff, int(specific.sum()))
