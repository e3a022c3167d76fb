"""Pure functions of `mmie evaluate`: records, metrics and the rates chart; no model, no files.

Generations are counted by a *label*: the LID language, ``degenerate`` when the degeneracy
test fires (junk, loops, no letters), or ``und`` when the detectors cannot tell the language
of real text. A degenerate continuation is never counted as any language, so junk can neither
pass for forgetting (it is not Hindi) nor for fluency in the replacement language (it is not
English). An ``und`` continuation is reported apart (``und_rate``) and is never forgetting
success: ``is_forget`` counts it as the forget language (conservative), and
``forget_rate_known`` gives the rate with ``und`` left out. A romanized label naming two
languages (``hi-ur-Latn``: :mod:`mmie.lid.roman`) counts as either, conservatively.

A metric that cannot be computed is a :class:`Metric` with ``value=None`` and the reason in
``missing``; functions that need a value raise :class:`~mmie.core.errors.MetricError` instead.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mmie.core.errors import MetricError
from mmie.lid.roman import covers

DEGENERATE = "degenerate"
UND = "und"
ROMAN_SUFFIX = "-Latn"


@dataclass(frozen=True)
class Metric:
    """One manifest metric: ``value`` over ``n`` samples, or ``missing`` with the reason."""

    value: float | None
    n: int
    missing: str | None = None

    def to_dict(self) -> dict:
        out = {"value": self.value, "n": self.n}
        return out | {"missing": self.missing} if self.missing is not None else out

    @classmethod
    def absent(cls, reason: str, n: int = 0) -> Metric:
        return cls(None, n, reason)


def label_of(lang: str, degenerate: bool) -> str:
    """What a generation counts as: ``degenerate``, else its language (``und`` included)."""
    return DEGENERATE if degenerate else lang


def forget_labels(forget_lang: str) -> frozenset[str]:
    """Labels that are the forget language for sure: itself and its romanization."""
    return frozenset({forget_lang, forget_lang + ROMAN_SUFFIX})


def is_forget(label: str, forget_lang: str) -> bool:
    """Whether a label may be the forget language (in either script); ``und`` counts, so that
    detector doubt is never forgetting success; ``degenerate`` does not."""
    return label == UND or covers(label, forget_lang) or covers(label, forget_lang + ROMAN_SUFFIX)


def is_own(label: str, own_lang: str | None) -> bool | None:
    """Whether a generation stays in its prompt's language; None for sets without one.
    ``und`` is not (conservative: doubt is never retention)."""
    return None if own_lang is None else covers(label, own_lang)


def sample_record(set_name: str, idx: int, prompt: str, generation: str, lid, junk,
                  fluency_nll: float | None, forget_lang: str, own_lang: str | None) -> dict:
    """One samples.jsonl record from a :class:`mmie.lid.detect.LidResult` and a
    :class:`mmie.lid.detect.Degeneracy`; ``lang`` is ``und`` for degenerate and undetermined
    continuations, told apart by ``degenerate`` and ``und``. ``fluent`` is added by
    :func:`mark_fluent` once the fluency reference is known."""
    degenerate = junk.is_degenerate
    label = label_of(lid.lang, degenerate)
    own = is_own(label, own_lang)
    return {"set": set_name, "idx": idx, "prompt": prompt, "generation": generation,
            "lang": UND if degenerate else label, "script": lid.script,
            "confidence": lid.confidence, "is_forget": int(is_forget(label, forget_lang)),
            "is_own": None if own is None else int(own), "degenerate": int(degenerate),
            "und": int(lid.lang == UND and not degenerate), "fluency_nll": fluency_nll}


def mark_fluent(records: Iterable[dict], ref) -> None:
    """Add ``fluent`` (:func:`mmie.metrics.fluency.is_fluent` against ``ref``) to each record."""
    from mmie.metrics.fluency import is_fluent

    for r in records:
        r["fluent"] = int(is_fluent(r["fluency_nll"], bool(r["degenerate"]), ref))


def rate(flags: Iterable[bool | int | None]) -> Metric:
    """Share of true flags; None entries (not applicable) are left out of ``n``."""
    kept = [bool(f) for f in flags if f is not None]
    if not kept:
        return Metric.absent("no applicable samples")
    return Metric(sum(kept) / len(kept), len(kept))


def distribution(labels: Sequence[str]) -> dict[str, Metric]:
    """Share of each label (degenerate included), keyed by label in sorted order."""
    counts = Counter(labels)
    return {label: Metric(counts[label] / len(labels), len(labels)) for label in sorted(counts)}


def base_lang(label: str) -> str:
    """'ur-Latn' -> 'ur': a language counts whatever script it is written in."""
    return label.split("-")[0]


def record_label(record: Mapping) -> str:
    """The label of a samples.jsonl record: ``degenerate`` or its language."""
    return DEGENERATE if record.get("degenerate") else record["lang"]


def replaced_by(label: str, replacement: str) -> bool:
    """The generation is in the expected replacement language (any script)."""
    return label not in (DEGENERATE, UND) and base_lang(label) == base_lang(replacement)


def fluent_replacement(record: Mapping, replacement: str) -> bool:
    """In the replacement language, not degenerate, and fluent where fluency was judged
    (a record without a ``fluent`` value counts on the label alone). samples.jsonl stores the
    flag as 0/1, so it is read as a truth value, never compared with ``True``."""
    fluent = record.get("fluent")
    return replaced_by(record_label(record), replacement) and (fluent is None or bool(fluent))


def substituted(label: str, forget_lang: str, replacement: str) -> bool:
    """The forget language was replaced by a real language other than the expected one."""
    if label in (DEGENERATE, UND):
        return False
    return base_lang(label) not in {base_lang(forget_lang), base_lang(replacement)}


def substitution(labels: Sequence[str], protected: Iterable[str], replacement: str,
                 forget_lang: str | None = None) -> dict[str, Metric]:
    """What replaced the forget language on forget prompts, side by side.

    ``replacement``: share in the expected replacement language; ``protected``: share in a
    protected related language (any script: ``ur-Latn`` counts as ``ur``); ``other`` (when
    ``forget_lang`` is given): share in any language but the forget and the replacement one,
    the quantity the ``substitution`` gate bounds.
    """
    keys = ("protected", "replacement") + (("other",) if forget_lang else ())
    if not labels:
        return {k: Metric.absent("no generations on forget prompts") for k in keys}
    wanted, n = {base_lang(p) for p in protected}, len(labels)
    out = {"protected": Metric(sum(base_lang(lb) in wanted for lb in labels) / n, n),
           "replacement": Metric(sum(replaced_by(lb, replacement) for lb in labels) / n, n)}
    if forget_lang:
        out["other"] = Metric(sum(substituted(lb, forget_lang, replacement)
                                  for lb in labels) / n, n)
    return out


def ppl_ratio(arm_nll, base_nll):
    """Perplexity ratio arm / baseline on the same texts: exp of the difference of their
    token-weighted mean NLLs (:func:`mean_nll`). Works on floats and numpy arrays alike."""
    import numpy as np

    return np.exp(np.asarray(arm_nll, dtype=np.float64) - base_nll)


def mean(values: Iterable[float | None], what: str = "values") -> Metric:
    """Mean of the non-null values; missing with a reason when there are none."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return Metric.absent(f"no {what}")
    return Metric(sum(kept) / len(kept), len(kept))


DEGENERACY_FIELDS = ("nonletter_share", "distinct_1", "distinct_2", "longest_repeat")


def degeneracy_summary(records: Sequence[object]) -> dict[str, Metric]:
    """Means of :class:`mmie.lid.detect.Degeneracy` measures (any object with those attributes)."""
    return {name: mean((getattr(r, name) for r in records), name) for name in DEGENERACY_FIELDS}


def mean_nll(nll_sums: Sequence[float], n_tokens: Sequence[int]) -> float:
    """Token-weighted mean NLL: every token counts once, however the texts are split."""
    if len(nll_sums) != len(n_tokens):
        raise MetricError(f"{len(nll_sums)} NLL sums but {len(n_tokens)} token counts")
    total = sum(n_tokens)
    if total <= 0:
        raise MetricError("no scored tokens: every text is empty after tokenization")
    return math.fsum(nll_sums) / total


def perplexity(nll_sums: Sequence[float], n_tokens: Sequence[int]) -> Metric:
    """exp(token-weighted mean NLL) over ``n`` texts."""
    return Metric(math.exp(mean_nll(nll_sums, n_tokens)), len(nll_sums))


def min_k_pp(z_scores: Sequence[float], k: float = 0.2) -> float:
    """Min-K%++ (Zhang et al. 2024): mean of the lowest ``k`` share of per-token z-scores.

    A token's z-score is ``(log p(x_t) - mu_t) / sigma_t`` with ``mu_t, sigma_t`` the mean and
    standard deviation of ``log p`` under the model's own next-token distribution; members
    score higher. At least one token is always kept.
    """
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    if not z_scores:
        raise MetricError("Min-K%++ of a text with no scored tokens")
    lowest = sorted(z_scores)[:max(1, math.ceil(k * len(z_scores)))]
    return math.fsum(lowest) / len(lowest)


def membership_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of telling members from non-members by score (higher = member); 0.5 = chance."""
    from sklearn.metrics import roc_auc_score

    if min(len(member_scores), len(nonmember_scores)) < 1:
        raise MetricError(f"membership AUC needs members and non-members, got "
                          f"{len(member_scores)} and {len(nonmember_scores)}")
    scores = [*member_scores, *nonmember_scores]
    if not all(math.isfinite(s) for s in scores):
        raise MetricError("membership AUC: NaN/inf scores")
    labels = [1] * len(member_scores) + [0] * len(nonmember_scores)
    return float(roc_auc_score(labels, scores))


class MetricBook:
    """The manifest metrics of one run, in insertion order.

    ``put`` records a computed :class:`Metric`; a missing one raises under ``strict``.
    ``skip`` records a metric that was not asked for (no input given): never an error.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.metrics: dict[str, Metric] = {}

    def put(self, name: str, metric: Metric) -> None:
        if metric.missing is not None and self.strict:
            raise MetricError(f"metric '{name}' cannot be computed: {metric.missing} "
                              "(--strict)")
        self.metrics[name] = metric

    def put_all(self, prefix: str, metrics: dict[str, Metric]) -> None:
        for name, metric in metrics.items():
            self.put(f"{prefix}{name}", metric)

    def compute(self, name: str, fn, n: int) -> None:
        """Record ``fn()`` over ``n`` samples, or its MetricError as the missing reason."""
        try:
            self.put(name, Metric(float(fn()), n))
        except MetricError as exc:
            self.put(name, Metric.absent(str(exc), n))

    def skip(self, name: str, reason: str) -> None:
        self.metrics[name] = Metric.absent(reason)

    def value(self, name: str) -> float | None:
        metric = self.metrics.get(name)
        return None if metric is None else metric.value

    def to_dict(self) -> dict[str, dict]:
        return {name: metric.to_dict() for name, metric in self.metrics.items()}


def set_metrics(records: Sequence[dict], degeneracies: Sequence[object],
                own_lang: str | None) -> dict[str, Metric]:
    """Rates and junk measures of one prompt set's samples.jsonl records."""
    out = {"forget_rate": rate(r["is_forget"] for r in records),
           "forget_rate_known": rate(None if r["und"] else r["is_forget"] for r in records),
           "degenerate_rate": rate(r["degenerate"] for r in records),
           "und_rate": rate(r["und"] for r in records),
           "fluent_rate": rate(r.get("fluent") for r in records)}
    if own_lang is not None:
        out["own_rate"] = rate(r["is_own"] for r in records)
    out["fluency_nll"] = mean((r["fluency_nll"] for r in records), "non-empty continuations")
    return out | degeneracy_summary(degeneracies)


def replacement_metrics(samples: Mapping[str, Sequence[dict]], forget_lang: str,
                        protected: Iterable[str], replacement: str) -> dict[str, Metric]:
    """Which language replaces the forget language: the label distribution on forget prompts
    (``forget.lang.<label>``), substitution shares, and the romanized rate when that set ran."""
    out: dict[str, Metric] = {}
    if "romanized" in samples:
        roman = forget_lang + ROMAN_SUFFIX
        out["romanized.romanized_rate"] = rate(covers(r["lang"], roman)
                                               for r in samples["romanized"])
    labels = [record_label(r) for r in samples["forget"]]
    out |= {f"forget.lang.{k}": v for k, v in distribution(labels).items()}
    out |= {f"substitution.{k}": v for k, v in substitution(labels, protected, replacement,
                                                             forget_lang).items()}
    return out


def ppl_records(scores: Mapping[str, Sequence[object]]) -> list[dict]:
    """ppl.jsonl rows from per-text scores (objects with ``nll_sum`` and ``n_tokens``)."""
    return [{"set": name, "idx": i, "nll_sum": s.nll_sum, "n_tokens": s.n_tokens}
            for name, group in scores.items() for i, s in enumerate(group)]


def mia_records(members: Sequence[object], nonmembers: Sequence[object],
                k: float) -> list[dict]:
    """mia.jsonl rows: per text its mean NLL (``loss``) and Min-K%++ score; members first.
    Items have ``mean_nll``, ``z_scores`` and ``n_tokens``; a text with no tokens gets nulls."""
    rows = [(1, s) for s in members] + [(0, s) for s in nonmembers]
    return [{"idx": i, "member": member, "loss": s.mean_nll,
             "mink_pp": min_k_pp(s.z_scores, k) if s.n_tokens else None}
            for i, (member, s) in enumerate(rows)]


def ppl_metrics(rows: Sequence[dict]) -> dict[str, Metric]:
    """``<set>_nll`` and ``<set>_ppl`` (token-weighted) from ppl.jsonl records."""
    out: dict[str, Metric] = {}
    for name in sorted({r["set"] for r in rows}):
        sums = [r["nll_sum"] for r in rows if r["set"] == name]
        counts = [r["n_tokens"] for r in rows if r["set"] == name]
        try:
            nll = mean_nll(sums, counts)
        except MetricError as exc:
            out[f"{name}_nll"] = out[f"{name}_ppl"] = Metric.absent(str(exc), len(sums))
            continue
        out[f"{name}_nll"] = Metric(nll, len(sums))
        out[f"{name}_ppl"] = Metric(math.exp(nll), len(sums))
    return out


def _auc_of(rows: Sequence[dict], key: str, sign: float) -> Metric:
    kept = [r for r in rows if r.get(key) is not None]
    members = [sign * r[key] for r in kept if r["member"]]
    nonmembers = [sign * r[key] for r in kept if not r["member"]]
    try:
        return Metric(membership_auc(members, nonmembers), len(kept))
    except MetricError as exc:
        return Metric.absent(str(exc), len(kept))


def mia_metrics(rows: Sequence[dict]) -> dict[str, Metric]:
    """Membership-inference AUCs from mia.jsonl records: by loss (lower = member, so the
    score is -loss) and by Min-K%++ (higher = member)."""
    return {"mia_auc_loss": _auc_of(rows, "loss", -1.0),
            "mia_auc_mink_pp": _auc_of(rows, "mink_pp", 1.0)}


def probe_metrics(forget: Mapping[int, object], retain: Mapping[int, object], seed: int = 0,
                  max_folds: int = 5) -> dict[str, Metric]:
    """Forget-vs-retain linear-probe AUC per layer (``probe_auc.layerN``) and their mean
    (``probe_auc``); pooled activations ``[n_texts, d]`` per layer. Fewer texts than
    ``max_folds`` per class use fewer folds; fewer than 2 leave the metric missing."""
    from mmie.core.similarity import probe_auc

    out: dict[str, Metric] = {}
    for layer in sorted(forget):
        x, y = forget[layer], retain[layer]
        folds = min(max_folds, len(x), len(y))
        try:
            out[f"probe_auc.layer{layer}"] = Metric(probe_auc(x, y, folds, seed).auc,
                                                    len(x) + len(y))
        except MetricError as exc:
            out[f"probe_auc.layer{layer}"] = Metric.absent(str(exc), len(x) + len(y))
    out["probe_auc"] = mean((m.value for m in out.values()), "probe AUC on any chosen layer")
    return out


RATE_BARS = (("forget_rate", "forget language"), ("own_rate", "own language"),
             ("degenerate_rate", "degenerate"))


def chart_png(metrics: dict, set_names: list[str], arm: str) -> bytes:
    """Grouped bars: forget-language, own-language and degenerate share per prompt set."""
    import matplotlib

    matplotlib.use("Agg")  # no display; the PNG goes into the artifact
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(set_names)), 4))
    width = 0.8 / len(RATE_BARS)
    for k, (key, label) in enumerate(RATE_BARS):
        values = [(metrics.get(f"{name}.{key}") or {}).get("value") or 0.0 for name in set_names]
        ax.bar([i + k * width for i in range(len(set_names))], values, width, label=label)
    ax.set_xticks([i + width for i in range(len(set_names))], set_names, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of continuations")
    ax.set_title(f"language of continuations by prompt set (arm {arm})")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
