"""`mmie gate`: bootstrap intervals, BH-FDR and a PROCEED/STOP decision per unlearning arm.

For every gate (see :mod:`mmie.gate.metrics`) and arm:

* per seed, the gate's statistic on samples paired with the baseline by ``(set, idx)``, with a
  BCa interval over samples (sample level);
* with >= 2 seeds, a BCa interval over the per-seed estimates (seed level), the replication
  unit. A bootstrap over 2-3 seed estimates ignores the sampling noise within each seed, so a
  PASS also needs every seed's sample-level interval on the passing side, and the p-value is
  the largest of theirs (an intersection-union test). With one seed the sample-level interval
  decides, and the report says so;
* one-sided bootstrap p-values (:mod:`mmie.core.stats`).

BH then adjusts the p-values of the whole family of computable, gating gates x arms. A gate
PASSES when its (1 - alpha) interval lies on the passing side of the threshold and its
adjusted p < alpha; an arm PROCEEDs only when every gate passes. A gate that cannot be
computed FAILs with its reason and stays out of the FDR family (gate.json lists it).
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mmie.core import provenance
from mmie.core.artifacts import Artifact, save
from mmie.core.errors import MetricError
from mmie.core.progress import SILENT, Progress
from mmie.core.stats import (
    CI,
    Alternative,
    Bootstrap,
    CIMethod,
    bh_adjust,
    bootstrap_statistic,
    seed_level_bootstrap,
)
from mmie.gate.metrics import (
    GATES,
    Direction,
    EvalRecords,
    GateSpec,
    check_inputs,
    group_evals,
    instances,
    read_eval,
)
from mmie.gate.render import forest_png, markdown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PASS, FAIL, REPORT = "PASS", "FAIL", "REPORT"
PROCEED, STOP = "PROCEED", "STOP"
SHIPPED_RULES = Path(__file__).with_name("gates.toml")


# --- thresholds -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """The threshold of one gate.

    threshold: a number for 'greater'/'less' gates, ``(low, high)`` for 'within' gates.
    enabled: False leaves the gate out entirely.
    report_only: computed and shown, but outside the FDR family and the PROCEED decision.
    """

    threshold: float | tuple[float, float]
    enabled: bool = True
    report_only: bool = False

    def to_dict(self) -> dict:
        value = list(self.threshold) if isinstance(self.threshold, tuple) else self.threshold
        return {"threshold": value, "enabled": self.enabled, "report_only": self.report_only}


RULE_KEYS = frozenset({"threshold", "enabled", "report_only"})


def _threshold(name: str, direction: Direction, value: Any) -> float | tuple[float, float]:
    if direction is Direction.WITHIN:
        ok = (isinstance(value, (list, tuple)) and len(value) == 2
              and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
              and value[0] < value[1])
        if not ok:
            raise ValueError(f"gate '{name}': threshold must be [low, high] with low < high, "
                             f"got {value!r}")
        return (float(value[0]), float(value[1]))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"gate '{name}': threshold must be a finite number, got {value!r}")
    return float(value)


def _rule(name: str, entry: Any, base: Rule | None, source: str) -> Rule:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{source}: gate '{name}' must be a table like [{name}]")
    if unknown := sorted(set(entry) - RULE_KEYS):
        raise ValueError(f"{source}: gate '{name}': unknown key(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(RULE_KEYS))})")
    merged = {**(base.to_dict() if base else {}), **entry}
    if "threshold" not in merged:
        raise ValueError(f"{source}: gate '{name}' has no threshold")
    for flag in ("enabled", "report_only"):
        if not isinstance(merged.get(flag, False), bool):
            raise ValueError(f"{source}: gate '{name}': {flag} must be true or false")
    threshold = _threshold(name, GATES[name].direction, merged["threshold"])
    return Rule(threshold, merged.get("enabled", True), merged.get("report_only", False))


def parse_rules(table: Mapping[str, Any], source: str,
                base: Mapping[str, Rule] | None = None) -> dict[str, Rule]:
    """Rules from a parsed TOML table, each overriding ``base`` key by key.

    Unknown gate names and keys are refused by name: a typo must not leave a gate at its
    default without anyone noticing.
    """
    rules = dict(base or {})
    for name, entry in table.items():
        if name not in GATES:
            raise ValueError(f"{source}: unknown gate '{name}' "
                             f"(known: {', '.join(sorted(GATES))})")
        rules[name] = _rule(name, entry, rules.get(name), source)
    return rules


def read_toml(path: Path) -> dict:
    with open(path, "rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML ({exc})") from exc


def default_rules() -> dict[str, Rule]:
    """The shipped thresholds (mmie/gates.toml)."""
    return parse_rules(read_toml(SHIPPED_RULES), str(SHIPPED_RULES))


@dataclass(frozen=True)
class GateConfig:
    """Settings of a gate run.

    alpha: FDR level of the BH correction; intervals are two-sided (1 - alpha).
    n_boot: bootstrap resamples per interval (>= 100).
    seed: base seed; each interval derives its own from it and the gate/arm/seed names, so
        adding a gate or an arm leaves the other numbers unchanged.
    ci_method: bootstrap interval method (BCa by default).
    rules: threshold per registered gate (shipped gates.toml, overridden by a user file).
    rules_file: the user TOML the rules came from, if any (recorded in the artifact).
    """

    alpha: float = 0.05
    n_boot: int = 10000
    seed: int = 0
    ci_method: CIMethod = CIMethod.BCA
    rules: Mapping[str, Rule] = field(default_factory=default_rules)
    rules_file: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.n_boot < 100:
            raise ValueError(f"n_boot must be >= 100, got {self.n_boot}")
        object.__setattr__(self, "ci_method", CIMethod(self.ci_method))
        if unknown := sorted(set(self.rules) - set(GATES)):
            raise ValueError(f"unknown gate(s): {', '.join(unknown)}")
        if missing := sorted(set(GATES) - set(self.rules)):
            raise ValueError(f"no threshold for gate(s): {', '.join(missing)}")
        if not any(r.enabled and not r.report_only for r in self.rules.values()):
            raise ValueError("every gate is disabled or report-only; nothing would decide")

    @classmethod
    def from_toml(cls, path: Path | str | None = None, **settings) -> GateConfig:
        """Shipped thresholds, overridden by the user file ``path`` when given."""
        rules = default_rules()
        if path is not None:
            rules = parse_rules(read_toml(Path(path)), str(path), base=rules)
        return cls(rules=rules, rules_file=None if path is None else str(path), **settings)

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "n_boot": self.n_boot, "seed": self.seed,
                "ci_method": self.ci_method.value, "rules_file": self.rules_file,
                "rules": {name: rule.to_dict() for name, rule in sorted(self.rules.items())}}


@dataclass(frozen=True)
class GateResult:
    """One gate for one arm. ``level`` is 'seed' or 'sample': which interval decided."""

    gate: str
    arm: str
    direction: str
    threshold: float | tuple[float, float]
    report_only: bool
    level: str = ""
    estimate: float | None = None
    ci: CI | None = None
    per_seed: dict = field(default_factory=dict)
    p_raw: float | None = None
    p_adj: float | None = None
    decision: str = FAIL
    reason: str = ""

    @property
    def in_family(self) -> bool:
        return self.p_raw is not None and not self.report_only

    def to_dict(self) -> dict:
        return {**asdict(self), "in_fdr_family": self.in_family}


# --- statistics -------------------------------------------------------------------------------

def _seed(config: GateConfig, *parts: object) -> int:
    # crc32, not hash(): Python salts str hashes per process, which would break determinism.
    return zlib.crc32("\x1f".join(map(str, (config.seed, *parts))).encode())


def _pvalue(direction: Direction, threshold, boot: Bootstrap) -> float:
    if direction is Direction.GREATER:
        return boot.pvalue(threshold, Alternative.GREATER)
    if direction is Direction.LESS:
        return boot.pvalue(threshold, Alternative.LESS)
    # A band is two one-sided tests (TOST); the larger p-value is the band's p-value.
    return max(boot.pvalue(threshold[0], Alternative.GREATER),
               boot.pvalue(threshold[1], Alternative.LESS))


def _ci_side(direction: Direction, threshold, ci: CI) -> tuple[bool, str]:
    interval = f"CI [{ci.low:.4g}, {ci.high:.4g}]"
    if direction is Direction.GREATER:
        ok = ci.low > threshold
        return ok, f"{interval} {'above' if ok else 'not above'} {threshold:.4g}"
    if direction is Direction.LESS:
        ok = ci.high < threshold
        return ok, f"{interval} {'below' if ok else 'not below'} {threshold:.4g}"
    ok = threshold[0] < ci.low and ci.high < threshold[1]
    band = f"[{threshold[0]:.4g}, {threshold[1]:.4g}]"
    return ok, f"{interval} {'inside' if ok else 'not inside'} {band}"


def _per_seed(config: GateConfig, spec: GateSpec, res: GateResult, xset: str | None,
              seeds: Mapping[int, EvalRecords], base: EvalRecords):
    """Per-seed estimates, sample-level bootstraps (sample-scope gates) and what to show."""
    values, boots, shown = {}, {}, {}
    for s, rec in seeds.items():
        try:
            found = spec.extract(rec, base, xset)
            if spec.scope == "seed":
                values[s], shown[s] = found, {"estimate": found}
                continue
            boots[s] = bootstrap_statistic(found.n, found.statistic, config.n_boot, config.alpha,
                                           _seed(config, res.gate, res.arm, s), config.ci_method)
        except MetricError as exc:
            raise MetricError(f"seed {s}: {exc}") from exc
        values[s], shown[s] = boots[s].ci.estimate, {**boots[s].ci.to_dict(), "n": found.n}
    return values, boots, shown


def _measure(config: GateConfig, spec: GateSpec, res: GateResult, xset: str | None,
             seeds: Mapping[int, EvalRecords], base: EvalRecords) -> GateResult:
    values, boots, shown = _per_seed(config, spec, res, xset, seeds, base)
    res = replace(res, per_seed=shown)
    if len(values) >= 2:
        boot = seed_level_bootstrap(values, config.n_boot, config.alpha,
                                    _seed(config, res.gate, res.arm, "seeds"), config.ci_method)
        level = "seed"
    elif boots:
        boot, level = next(iter(boots.values())), "sample"
    else:
        return replace(res, level="seed", estimate=next(iter(values.values())),
                       reason="one seed: a per-seed metric has no interval")
    # Intersection-union test: the claim needs the seed level and every seed to pass, so its
    # p-value is the largest of theirs (valid at level alpha without a further correction).
    p_raw = max(_pvalue(spec.direction, res.threshold, b) for b in [boot, *boots.values()])
    return replace(res, level=level, estimate=boot.ci.estimate, ci=boot.ci, p_raw=p_raw)


def judge(config: GateConfig, spec: GateSpec, name: str, xset: str | None, arm: str,
          seeds: Mapping[int, EvalRecords], base: EvalRecords) -> GateResult:
    """Estimate, interval and raw p-value of one gate for one arm (decision comes later)."""
    rule = config.rules[spec.name]
    res = GateResult(name, arm, spec.direction.value, rule.threshold, rule.report_only)
    try:
        return _measure(config, spec, res, xset, seeds, base)
    except MetricError as exc:
        return replace(res, reason=f"not computable: {exc}")


def decide(results: Sequence[GateResult], alpha: float) -> list[GateResult]:
    """BH over the computable gating results, then PASS/FAIL/REPORT with the reason."""
    family = [i for i, r in enumerate(results) if r.in_family]
    adjusted = bh_adjust([results[i].p_raw for i in family])
    out = list(results)
    for i, p_adj in zip(family, adjusted, strict=True):
        out[i] = replace(out[i], p_adj=float(p_adj))
    return [_decision(r, alpha) for r in out]


def _sides(res: GateResult) -> tuple[bool, str]:
    """The deciding interval, and at seed level also every seed's sample-level interval.

    A bootstrap over 2-3 seed estimates sees none of the sampling noise within a seed and can
    be narrower than any single seed's interval; requiring each seed to pass too keeps a PASS
    from resting on that artefact.
    """
    direction = Direction(res.direction)
    ok, text = _ci_side(direction, res.threshold, res.ci)
    if res.level == "sample":
        return ok, f"{text} (single seed: sample-level interval)"
    seeds = {s: CI(v["estimate"], v["low"], v["high"], v["method"])
             for s, v in res.per_seed.items() if "low" in v}
    bad = [str(s) for s, ci in seeds.items() if not _ci_side(direction, res.threshold, ci)[0]]
    if bad:
        return False, f"{text}; sample-level CI of seed {', '.join(bad)} fails"
    return ok, text + ("; every seed's sample-level CI passes" if seeds else "")


def _decision(res: GateResult, alpha: float) -> GateResult:
    if res.ci is None:
        return replace(res, decision=REPORT if res.report_only else FAIL,
                       reason=res.reason + ("" if res.report_only else "; excluded from FDR"))
    side_ok, side = _sides(res)
    if res.report_only:
        return replace(res, decision=REPORT, reason=f"reported only; {side}")
    p_ok = res.p_adj < alpha
    reason = f"{side}; adjusted p {res.p_adj:.3g} {'<' if p_ok else '>='} {alpha:g}"
    return replace(res, decision=PASS if side_ok and p_ok else FAIL, reason=reason)


def verdicts(results: Sequence[GateResult]) -> dict[str, dict]:
    """Per arm: PROCEED only if every gating result passed."""
    out: dict[str, dict] = {}
    for arm in sorted({r.arm for r in results}):
        gating = [r for r in results if r.arm == arm and not r.report_only]
        failed = [r.gate for r in gating if r.decision != PASS]
        out[arm] = {"value": 0.0 if failed else 1.0, "decision": STOP if failed else PROCEED,
                    "n": len(gating), "passed": len(gating) - len(failed), "failed": failed}
    return out


# --- the stage --------------------------------------------------------------------------------

def evaluate_gates(config: GateConfig, base: EvalRecords,
                   arms: Mapping[str, Mapping[int, EvalRecords]],
                   progress: Progress = SILENT) -> list[GateResult]:
    plan = [(spec, name, xset) for spec in GATES.values() if config.rules[spec.name].enabled
            for name, xset in instances(spec, base)]
    jobs = [(arm, item) for arm in arms for item in plan]
    results = [judge(config, spec, name, xset, arm, arms[arm], base)
               for arm, (spec, name, xset) in progress.track(jobs, len(jobs), "gates")]
    return decide(results, config.alpha)


def _report(config: GateConfig, base: EvalRecords, arms, results, summary) -> dict:
    excluded = [f"{r.gate}@{r.arm}: {r.reason}" for r in results
                if not r.in_family and not r.report_only]
    return {
        "settings": config.to_dict(),
        "baseline": {"path": base.path, "arm": base.arm, "seed": base.seed},
        "arms": {arm: {**summary[arm], "seeds": sorted(seeds),
                       "level": "seed" if len(seeds) >= 2 else "sample"}
                 for arm, seeds in arms.items()},
        "fdr": {"method": "fdr_bh", "family_size": sum(r.in_family for r in results),
                "excluded": excluded},
        "pvalue": "one-sided shifted-null bootstrap (mmie.core.stats); with >= 2 seeds the largest "
                  "of the seed-level and every seed's sample-level p (intersection-union)",
        "gates": [r.to_dict() for r in results],
    }


def run(config: GateConfig, baseline: Path, evals: Sequence[Path], out: Path,
        force: bool = False, progress: Progress = SILENT) -> Artifact:
    """Judge every eval artifact against ``baseline``; write a ``gate`` artifact at ``out``."""
    if not evals:
        raise ValueError("give at least one eval artifact")
    provenance.gate_start(baseline, evals, out, force)
    base, arms = read_eval(Path(baseline)), group_evals(evals)
    check_inputs(base, arms)
    results = evaluate_gates(config, base, arms, progress)
    summary = verdicts(results)
    report = _report(config, base, arms, results, summary)
    files = {"gate.json": json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n",
             "gate.md": markdown(report), "forest.png": forest_png(report)}
    settings = {**config.to_dict(), "baseline": str(baseline), "evals": [str(e) for e in evals]}
    return save(out, "gate", tensors={}, config=settings, model=None,
                parents=[Path(baseline), *map(Path, evals)], metrics=summary, files=files,
                force=force)
