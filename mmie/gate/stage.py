"""`mmie gate`: one-sided bounds per gate and seed, and a PROCEED/STOP verdict per arm.

The decision rule is in :mod:`mmie.gate.decision` (an intersection-union test over gates and
seeds, each gate at level alpha; TOST for bands), the bounds in :mod:`mmie.core.bounds` (exact
Clopper-Pearson for proportions, BCa otherwise), the gates in :mod:`mmie.gate.metrics`.
docs/gates.md explains them for a reader. This module holds the thresholds (shipped
``gates.toml`` plus a user file), the config, and the stage that writes the ``gate`` artifact.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mmie.core import profile, provenance
from mmie.core.artifacts import Artifact, load, save
from mmie.core.progress import SILENT, Progress
from mmie.gate import forward, paired  # noqa: F401  (register the forward-only and paired gates)
from mmie.gate.decision import (  # noqa: F401  (re-exported: the stage's public names)
    FAIL,
    NOT_INFORMATIVE,
    PASS,
    PROCEED,
    REPORT,
    STOP,
    GateResult,
    Settings,
    discoveries,
    judge,
    min_n,
    verdicts,
)
from mmie.gate.depth import SOURCES, DepthContext, DepthSettings, describe, read_depth
from mmie.gate.metrics import (
    GATES,
    Direction,
    EvalRecords,
    GateContext,
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

SHIPPED_RULES = Path(__file__).with_name("gates.toml")


# --- thresholds -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """The threshold of one gate.

    threshold: a number for 'greater'/'less' gates, ``(low, high)`` for 'within' gates.
    enabled: False leaves the gate out entirely.
    report_only: computed and shown, but not part of the PROCEED decision.
    floor: for prompt-family gates, the baseline rate below which the gate is not informative.
    """

    threshold: float | tuple[float, float]
    enabled: bool = True
    report_only: bool = False
    floor: float | None = None

    def to_dict(self) -> dict:
        value = list(self.threshold) if isinstance(self.threshold, tuple) else self.threshold
        out = {"threshold": value, "enabled": self.enabled, "report_only": self.report_only}
        return out if self.floor is None else {**out, "floor": self.floor}


RULE_KEYS = frozenset({"threshold", "enabled", "report_only", "floor"})


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
    return Rule(threshold, merged.get("enabled", True), merged.get("report_only", False),
                _floor(name, merged.get("floor"), source))


def _floor(name: str, value: Any, source: str) -> float | None:
    if value is None:
        return None
    if not GATES[name].floor:
        raise ValueError(f"{source}: gate '{name}' takes no floor (only prompt-family gates)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{source}: gate '{name}': floor must be a number in [0, 1)")
    return float(value)


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

    alpha: level of each one-sided test (bands: TOST, a (1 - 2 alpha) interval); an arm
        PROCEEDs only when every decisive gate passes, so its error rate is at most alpha too.
    n_boot: bootstrap resamples per BCa interval (>= 100).
    seed: base seed; each interval derives its own from it and the gate/arm/seed names, so
        adding a gate or an arm leaves the other numbers unchanged.
    replacement_lang: the language a forget prompt should be answered in instead.
    rules: threshold per registered gate (shipped gates.toml, overridden by a user file).
    rules_file: the user TOML the rules came from, if any (recorded in the artifact).
    depth: which relearning step, metric and retrieval block the depth gates judge.
    """

    alpha: float = 0.05
    n_boot: int = 10000
    seed: int = 0
    replacement_lang: str = "en"
    rules: Mapping[str, Rule] = field(default_factory=default_rules)
    rules_file: str | None = None
    depth: DepthSettings = field(default_factory=DepthSettings)

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")
        if self.n_boot < 100:
            raise ValueError(f"n_boot must be >= 100, got {self.n_boot}")
        if not self.replacement_lang or "-" in self.replacement_lang:
            raise ValueError("replacement_lang must be a bare language code like 'en', got "
                             f"{self.replacement_lang!r}")
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

    def settings(self) -> Settings:
        return Settings(self.alpha, self.n_boot, self.seed, GateContext(self.replacement_lang))

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "n_boot": self.n_boot, "seed": self.seed,
                "replacement_lang": self.replacement_lang, "rules_file": self.rules_file,
                "rules": {name: rule.to_dict() for name, rule in sorted(self.rules.items())},
                "depth": asdict(self.depth)}


# --- the stage --------------------------------------------------------------------------------

def evaluate_gates(config: GateConfig, base: EvalRecords,
                   arms: Mapping[str, Mapping[int, EvalRecords]],
                   progress: Progress = SILENT, depth: Mapping[str, Mapping] | None = None,
                   ) -> list[GateResult]:
    """Every enabled gate for every arm; a depth gate only when its artifacts were given
    (``depth``: ``{kind: {arm: record}}``, :mod:`mmie.gate.depth`)."""
    depth = depth or {}
    plan = [(spec, name, xset) for spec in GATES.values() if config.rules[spec.name].enabled
            and SOURCES.get(spec.name, "eval") in ("eval", *depth)
            for name, xset in instances(spec, base)]
    jobs = [(arm, item) for arm in arms for item in plan]
    settings = replace(config.settings(), context=DepthContext(
        config.replacement_lang, depth=depth, settings=config.depth))
    results = [judge(settings, spec, config.rules[spec.name], name, xset, arm,
                     _seeds(spec.name, arms[arm]), base)
               for arm, (spec, name, xset) in progress.track(jobs, len(jobs), "gates")]
    return discoveries(results)


def _seeds(gate: str, seeds: Mapping[int, EvalRecords]) -> Mapping:
    """A depth artifact measures an arm once, not per training seed: judged once, keyed by
    its kind."""
    if gate not in SOURCES:
        return seeds
    return {SOURCES[gate]: next(iter(seeds.values()))}


RULE_TEXT = (
    "PROCEED only when every decisive gate passes (an intersection-union test: each gate a "
    "one-sided test at level alpha, bands by TOST at 1 - 2 alpha, and with several seeds every "
    "seed must pass). Proportions: exact Clopper-Pearson bounds; ratios of proportions: "
    "Bonferroni-split Clopper-Pearson; other statistics: BCa bootstrap. A gate below its "
    "min_n FAILs as insufficient evidence; above it a zero-width interval (arm and baseline "
    "equal on every text) is judged at its value. Leakage counts what the arm introduced "
    "(paired with the baseline), like retention. A prompt-family "
    "gate is NOT INFORMATIVE (shown, not decisive) when the baseline's rate is below its floor "
    "or when even an arm with no forget-language answer could not pass at this n. q is the "
    "Benjamini-Hochberg adjusted p within one arm, shown for discoveries, never the verdict.")


def min_n_table(config: GateConfig) -> dict[str, int | None]:
    """Smallest passable sample size of every enabled gate at the configured alpha."""
    return {name: min_n(spec.method, spec.direction, config.rules[name].threshold,
                        config.alpha)
            for name, spec in GATES.items() if config.rules[name].enabled}


def _report(config: GateConfig, base: EvalRecords, arms, results, summary, depth) -> dict:
    return {
        **({"depth": describe(depth, config.depth)} if depth else {}),
        "settings": config.to_dict(),
        "baseline": {"path": base.path, "arm": base.arm, "seed": base.seed},
        "arms": {arm: {**summary[arm], "seeds": sorted(seeds),
                       "level": "every seed" if len(seeds) >= 2 else "sample"}
                 for arm, seeds in arms.items()},
        "rule": RULE_TEXT,
        "min_n": min_n_table(config),
        "gates": [r.to_dict() for r in results],
    }


def read_depth_inputs(baseline: Path, arms: Sequence[str], out: Path,
                      paths: Mapping[str, Sequence[Path]]) -> dict[str, dict]:
    """``{kind: {arm: record}}`` of the given relearn / comprehension artifacts."""
    given = {kind: list(p) for kind, p in paths.items() if p}
    if not given:
        return {}
    provenance.check_overlap(out, [p for ps in given.values() for p in ps])
    base = load(baseline, kind="eval")
    return {kind: read_depth(ps, kind, base, arms) for kind, ps in given.items()}


@profile.phase("gate")
def run(config: GateConfig, baseline: Path, evals: Sequence[Path], out: Path,
        force: bool = False, progress: Progress = SILENT, *, relearn: Sequence[Path] = (),
        comprehension: Sequence[Path] = ()) -> Artifact:
    """Judge every eval artifact (and any depth artifact of an arm) against ``baseline``;
    write a ``gate`` artifact at ``out``."""
    if not evals:
        raise ValueError("give at least one eval artifact")
    provenance.gate_start(baseline, evals, out, force)
    base, arms = read_eval(Path(baseline)), group_evals(evals)
    check_inputs(base, arms)
    depth_paths = {"relearn": list(relearn), "comprehension": list(comprehension)}
    depth = read_depth_inputs(Path(baseline), list(arms), Path(out), depth_paths)
    results = evaluate_gates(config, base, arms, progress, depth)
    summary = verdicts(results, config.alpha)
    report = _report(config, base, arms, results, summary, depth)
    files = {"gate.json": json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n",
             "gate.md": markdown(report), "forest.png": forest_png(report)}
    settings = {**config.to_dict(), "baseline": str(baseline), "evals": [str(e) for e in evals],
                **{kind: [str(p) for p in ps] for kind, ps in depth_paths.items() if ps}}
    parents = [Path(baseline), *map(Path, evals), *(Path(p) for ps in depth_paths.values()
                                                    for p in ps)]
    return save(out, "gate", tensors={}, config=settings, model=None, parents=parents,
                metrics=summary, files=files, force=force)
