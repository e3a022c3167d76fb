"""Two `make demo` runs of the same arms, compared gate by gate: did a setting change a verdict?

Made for settings that change what the evaluations measure at the margin (``--body-dtype
bf16``): run the demo both ways, then compare. For example, with the default ``EVAL_OPTS``
(bf16 body) and with the body in fp32::

    make demo                                                     # runs/demo
    make demo OUT=runs/demo-fp32 EVAL_OPTS="--head-dtype bf16"    # the same arms, fp32 body
    python bench/compare_demo_runs.py runs/demo-fp32 runs/demo

Reported: each arm's decision in both runs; for every gate, both estimates and whether the
second run's estimate lies inside the first run's interval (the gate's own interval, at
1 - 2 alpha); how many continuations of each evaluation are token-identical; whether the
adapters are byte-identical (if they are, only the evaluations differ). Exit status 1 when a
decision differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path


def gates(run: Path) -> dict:
    return json.loads((run / "gate" / "gate.json").read_text())


def compare_gates(first: dict, second: dict) -> dict:
    """Decisions per arm and, per gate, both estimates and whether the second lies inside the
    first's interval (gates without an interval, e.g. not computable, are listed apart)."""
    decisions = {arm: [first["arms"][arm]["decision"], second["arms"].get(arm, {}).get("decision")]
                 for arm in first["arms"]}
    by_key = {(g["arm"], g["gate"]): g for g in second["gates"]}
    inside, outside, no_interval = 0, {}, []
    for g in first["gates"]:
        other = by_key.get((g["arm"], g["gate"]))
        ci, name = g.get("ci") or {}, f"{g['arm']}/{g['gate']}"
        if other is None or other.get("estimate") is None or ci.get("low") is None:
            no_interval.append(name)
        elif ci["low"] <= other["estimate"] <= ci["high"]:
            inside += 1
        else:
            outside[name] = {"first": g["estimate"], "interval": [ci["low"], ci["high"]],
                             "second": other["estimate"]}
    return {"decisions": decisions,
            "same_decisions": all(a == b for a, b in decisions.values()),
            "estimates_inside_first_interval": inside, "outside": outside,
            "without_interval": no_interval}


def identical_samples(first: Path, second: Path) -> dict:
    """Token-identical continuations per evaluation present in both runs."""
    out = {}
    for samples in sorted(first.glob("eval-*/**/samples.jsonl")):
        other = second / samples.relative_to(first)
        if other.exists():
            a, b = (samples.read_text().splitlines(), other.read_text().splitlines())
            same = sum(json.loads(x)["generation"] == json.loads(y)["generation"]
                       for x, y in zip(a, b, strict=True))
            out[str(samples.parent.relative_to(first))] = f"{same}/{len(a)}"
    return out


def identical_adapters(first: Path, second: Path) -> dict:
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    return {str(p.relative_to(first)): (second / p.relative_to(first)).exists()
            and digest(p) == digest(second / p.relative_to(first))
            for p in sorted(first.glob("*/seed*/*.safetensors"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path, help="a demo output folder (e.g. runs/demo-fp32)")
    parser.add_argument("second", type=Path, help="the other one (e.g. runs/demo)")
    args = parser.parse_args(argv)
    result = {**compare_gates(gates(args.first), gates(args.second)),
              "identical_continuations": identical_samples(args.first, args.second),
              "identical_adapters": identical_adapters(args.first, args.second)}
    print(json.dumps(result, indent=2))
    return 0 if result["same_decisions"] else 1


if __name__ == "__main__":
    sys.exit(main())
