"""The decision rule of `mmie gate`: per-seed bounds, gate decisions and the arm verdict.

Each gate is a one-sided test at level alpha (a band is two, TOST: its (1 - 2 alpha) interval
inside the band). Within a seed the gate's evidence is bounded as :mod:`mmie.core.bounds` says
(exact for proportions, BCa otherwise). Across seeds the claim is "every trained seed meets
the bar": the gate passes only when it passes in each seed, and its p-value is the largest of
theirs (an intersection-union test, Berger 1982), valid at alpha without a correction. An arm
PROCEEDs only when every decisive gate passes: again an intersection-union test, so the chance
that an arm failing any gate's claim PROCEEDs is at most alpha. No multiplicity correction is
needed for the verdict; Benjamini-Hochberg is applied only to list the gates of one arm that
are discoveries on their own (``q``), never across arms, so an arm's report does not depend
on which other arms were run.

A gate below its smallest passable sample size (``min_n``), or whose interval has zero width,
FAILs with "insufficient evidence". A prompt-family gate whose baseline rate is below its floor,
or so low that even an arm with no forget-language answer could not pass at this n, is "not
informative": shown, not decisive.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from mmie.core import bounds
from mmie.core.errors import MetricError
from mmie.core.stats import bh_adjust
from mmie.gate.metrics import (
    Comparison,
    Direction,
    EvalRecords,
    GateContext,
    GateSpec,
    Method,
    Proportion,
    ProportionRatio,
)

PASS, FAIL, REPORT, NOT_INFORMATIVE = "PASS", "FAIL", "REPORT", "NOT INFORMATIVE"
PROCEED, STOP = "PROCEED", "STOP"
INSUFFICIENT = "insufficient evidence"


@dataclass(frozen=True)
class Settings:
    """What the decision needs from the gate config."""

    alpha: float
    n_boot: int
    seed: int
    context: GateContext = field(default_factory=GateContext)


@dataclass(frozen=True)
class GateResult:
    """One gate for one arm.

    ci: the two-sided (1 - 2 alpha) interval whose ends are the one-sided alpha bounds (with
        several seeds, the envelope of the seeds' intervals). decisive: counts for the verdict.
    q: Benjamini-Hochberg adjusted p within the arm (report only, never the verdict).
    """

    gate: str
    arm: str
    direction: str
    threshold: float | tuple[float, float]
    method: str
    report_only: bool
    min_n: int | None = None
    level: str = ""
    estimate: float | None = None
    ci: dict | None = None
    n: int | None = None
    per_seed: dict = field(default_factory=dict)
    p_raw: float | None = None
    q: float | None = None
    decision: str = FAIL
    decisive: bool = True
    insufficient: bool = False
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _seed(settings: Settings, *parts: object) -> int:
    # crc32, not hash(): Python salts str hashes per process, which would break determinism.
    return zlib.crc32("\x1f".join(map(str, (settings.seed, *parts))).encode())


def min_n(method: Method, direction: Direction, threshold, alpha: float) -> int | None:
    """Smallest sample size at which a gate could pass (see :mod:`mmie.core.bounds`)."""
    if method is Method.PROPORTION and direction is not Direction.WITHIN:
        return bounds.proportion_min_n(threshold, alpha, direction.value)
    if method is Method.RATIO and direction is not Direction.WITHIN:
        return bounds.ratio_min_n(threshold, alpha, direction.value)
    return bounds.BOOTSTRAP_MIN_N


def _pvalue(direction: Direction, threshold, p_of) -> float:
    if direction is Direction.WITHIN:  # TOST: both one-sided tests must reject
        return max(p_of(threshold[0], bounds.GREATER), p_of(threshold[1], bounds.LESS))
    return p_of(threshold, direction.value)


def _summarise(evidence, direction: Direction, threshold, alpha: float, n_boot: int,
               seed: int) -> dict:
    """Estimate, (1 - 2 alpha) interval, p-value and n of one seed's evidence."""
    lo, hi = bounds.GREATER, bounds.LESS
    if isinstance(evidence, Proportion):
        x, n = evidence.x, evidence.n
        return {"estimate": x / n, "low": bounds.cp_bound(x, n, alpha, lo),
                "high": bounds.cp_bound(x, n, alpha, hi), "n": n, "x": x,
                "p": _pvalue(direction, threshold, lambda t, s: bounds.binom_p(x, n, t, s)),
                "zero_width": False, "detail": evidence.detail}
    if isinstance(evidence, ProportionRatio):
        args = (evidence.xa, evidence.n, evidence.xb, evidence.n)
        p = _pvalue(direction, threshold,
                    lambda t, s: bounds.proportion_ratio(*args, t, alpha, s).p)
        return {"estimate": (evidence.xa / evidence.xb) if evidence.xb else None,
                "low": bounds.ratio_bound(*args, alpha, lo),
                "high": bounds.ratio_bound(*args, alpha, hi),
                "n": evidence.n, "x": evidence.xa, "x_base": evidence.xb, "p": p,
                "zero_width": False}
    res = bounds.bca(evidence.n, evidence.statistic, n_boot, seed, evidence.strata)
    flat = {"detail": "zero width: every resample gave the same value"} if res.zero_width else {}
    return {"estimate": res.estimate, "low": res.bound(alpha, lo), "high": res.bound(alpha, hi),
            "n": evidence.n, "p": _pvalue(direction, threshold, res.pvalue),
            "zero_width": res.zero_width, **flat}


def clears(direction: Direction, threshold, low: float, high: float) -> bool:
    """The interval's deciding end(s) on the passing side of the threshold."""
    if direction is Direction.LESS:
        return high < threshold
    if direction is Direction.GREATER:
        return low > threshold
    return threshold[0] < low and high < threshold[1]


def _side_text(direction: Direction, threshold, low: float, high: float) -> str:
    ok = clears(direction, threshold, low, high)
    if direction is Direction.WITHIN:
        where = f"{'inside' if ok else 'not inside'} [{threshold[0]:.4g}, {threshold[1]:.4g}]"
        return f"interval [{low:.4g}, {high:.4g}] {where} (TOST)"
    end, word = (high, "upper") if direction is Direction.LESS else (low, "lower")
    sign = ("<" if ok else ">=") if direction is Direction.LESS else (">" if ok else "<=")
    return f"{word} bound {end:.4g} {sign} {threshold:.4g}"


def _evidence(spec: GateSpec, xset: str | None, seeds: Mapping[int, EvalRecords],
              base: EvalRecords, context: GateContext) -> dict:
    found = {}
    for s, rec in seeds.items():
        try:
            found[s] = spec.extract(rec, base, xset, context)
        except MetricError as exc:
            # a depth artifact is keyed by its kind, not a seed: its message says where
            raise MetricError(f"seed {s}: {exc}" if isinstance(s, int) else str(exc)) from exc
    return found


def _seed_values(found: dict) -> Comparison:
    """Per-seed values (probe AUC) as a bootstrap over seeds, the replication unit."""
    values = np.array([found[s] for s in sorted(found)], dtype=np.float64)
    if len(values) < 2:
        raise MetricError("one seed: a per-seed metric has no interval")
    return Comparison(len(values), lambda idx: values[idx].mean(axis=-1))


def _floor_check(res: GateResult, found: dict, floor: float | None,
                 alpha: float) -> GateResult | None:
    """A prompt-family gate the baseline leaves nothing to judge on: shown, not decisive."""
    if floor is None:
        return None
    rates = [ev.xb / ev.n for ev in found.values()]
    if min(rates) < floor:
        return replace(res, decisive=False, decision=NOT_INFORMATIVE,
                       reason=f"not informative: the baseline's own rate on this family is "
                              f"{min(rates):.3g} < floor {floor:g}, so no arm can show a drop; "
                              "shown, not decisive")
    return _unpassable(res, found, alpha)


def _unpassable(res: GateResult, found: dict, alpha: float) -> GateResult | None:
    """Not informative when even an arm with no forget-language answer could not pass.

    A baseline above the floor can still be too rare at this n: 12 of 60 leaves the ratio bound
    of an arm at 0 of 60 at 0.553 > 0.5, so the gate would FAIL a perfect arm. An n below the
    gate's min_n is left to "insufficient evidence" (a FAIL): that is the evaluation being too
    small, which must not be waved through.
    """
    worst = None
    for ev in found.values():
        if res.min_n is None or ev.n < res.min_n:
            continue
        best = bounds.ratio_bound(0, ev.n, ev.xb, ev.n, alpha, bounds.LESS)
        if best >= res.threshold and (worst is None or best > worst[0]):
            worst = (best, ev)
    if worst is None:
        return None
    best, ev = worst
    return replace(res, decisive=False, decision=NOT_INFORMATIVE,
                   reason=f"not informative: at n={ev.n} with the baseline at {ev.xb}/{ev.n}, "
                          "even an arm with no forget-language answer could not pass (upper "
                          f"bound {best:.3g} >= {res.threshold:g}); shown, not decisive")


def _insufficient(res: GateResult, per_seed: dict) -> str | None:
    small = [v["n"] for v in per_seed.values() if res.min_n is None or v["n"] < res.min_n]
    if small:
        need = "no n suffices" if res.min_n is None else f"needs >= {res.min_n}"
        return f"{INSUFFICIENT}: n={min(small)}, {need}"
    # A zero-width interval at n >= min n is not a lack of evidence: every resample gave one
    # value because arm and baseline agree on every text (a gated edit that never fired there).
    # Failing it would rank that arm below one that changed a few texts a little; the tiny
    # samples that once passed on zero width are below min n and stopped above.
    return None


def _combine(res: GateResult, per_seed: dict) -> GateResult:
    """One seed: its interval. Several: the envelope (it clears iff every seed clears)."""
    estimates = [v["estimate"] for v in per_seed.values() if v["estimate"] is not None]
    return replace(res, per_seed={str(s): v for s, v in per_seed.items()},
                   level="sample" if len(per_seed) == 1 else "every seed",
                   estimate=sum(estimates) / len(estimates) if estimates else None,
                   ci={"low": min(v["low"] for v in per_seed.values()),
                       "high": max(v["high"] for v in per_seed.values())},
                   n=min(v["n"] for v in per_seed.values()),
                   p_raw=max(v["p"] for v in per_seed.values()))


def _details(per_seed: dict) -> str:
    """The evidence's own words (a Proportion's ``detail``), per seed when there are several."""
    found = [(s, v["detail"]) for s, v in per_seed.items() if v.get("detail")]
    if len(per_seed) == 1:
        return "".join(f"; {text}" for _, text in found)
    return "".join(f"; seed {s}: {text}" for s, text in found)


def _decision(res: GateResult) -> GateResult:
    if res.ci is None:
        return replace(res, decision=REPORT if res.report_only else FAIL)
    direction = Direction(res.direction)
    side = _side_text(direction, res.threshold, res.ci["low"], res.ci["high"])
    if len(res.per_seed) > 1:
        side += f" ({len(res.per_seed)} seeds, each must clear)"
    side += _details(res.per_seed)
    if res.report_only:
        return replace(res, decision=REPORT, reason=f"reported only; {side}")
    if why := _insufficient(res, res.per_seed):
        return replace(res, decision=FAIL, insufficient=True, reason=f"{why}; {side}")
    ok = clears(direction, res.threshold, res.ci["low"], res.ci["high"])
    return replace(res, decision=PASS if ok else FAIL, reason=side)


def judge(settings: Settings, spec: GateSpec, rule, name: str, xset: str | None, arm: str,
          seeds: Mapping[int, EvalRecords], base: EvalRecords) -> GateResult:
    """Bounds, p-value and decision of one gate for one arm."""
    direction, floor = spec.direction, rule.floor if spec.floor else None
    res = GateResult(name, arm, direction.value, rule.threshold, spec.method.value,
                     rule.report_only, decisive=not rule.report_only,
                     min_n=min_n(spec.method, direction, rule.threshold, settings.alpha))
    try:
        found = _evidence(spec, xset, seeds, base, settings.context)
        if spec.method is Method.SEED:
            found = {"seeds": _seed_values(found)}
        skip = _floor_check(res, found, floor, settings.alpha)
        if skip is not None and any(ev.xb == 0 for ev in found.values()):
            return skip
        per_seed = {s: _summarise(ev, direction, rule.threshold, settings.alpha,
                                  settings.n_boot, _seed(settings, name, arm, s))
                    for s, ev in found.items()}
    except MetricError as exc:
        return _decision(replace(res, reason=f"not computable: {exc}"))
    if skip is not None:
        return replace(_combine(skip, per_seed), decision=NOT_INFORMATIVE)
    return _decision(_combine(res, per_seed))


def discoveries(results: Sequence[GateResult]) -> list[GateResult]:
    """BH-adjusted p (``q``) over each arm's own decisive gates, for the report only."""
    out = list(results)
    for arm in sorted({r.arm for r in results}):
        family = [i for i, r in enumerate(out)
                  if r.arm == arm and r.decisive and r.p_raw is not None]
        for i, q in zip(family, bh_adjust([out[i].p_raw for i in family]), strict=True):
            out[i] = replace(out[i], q=float(q))
    return out


def verdicts(results: Sequence[GateResult], alpha: float) -> dict[str, dict]:
    """Per arm: PROCEED only if every decisive gate passed (intersection-union test)."""
    out: dict[str, dict] = {}
    for arm in sorted({r.arm for r in results}):
        mine = [r for r in results if r.arm == arm]
        decisive = [r for r in mine if r.decisive]
        failed = [r.gate for r in decisive if r.decision != PASS]
        out[arm] = {"value": 0.0 if failed else 1.0, "decision": STOP if failed else PROCEED,
                    "n": len(decisive), "passed": len(decisive) - len(failed), "failed": failed,
                    "insufficient": [r.gate for r in decisive if r.insufficient],
                    "not_informative": [r.gate for r in mine if r.decision == NOT_INFORMATIVE],
                    "discoveries": sum(r.q is not None and r.q < alpha for r in decisive)}
    return out
