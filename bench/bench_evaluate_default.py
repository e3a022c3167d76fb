"""`mmie evaluate` on the default model: the #17 code path against today's, in one run.

Both runs are the `mmie evaluate` command a user types, on the demo's test split of
``data/sample`` (lines 161 on of each line-aligned file; 60 prompts per set; Hindi, English,
Urdu, Punjabi, Bengali, romanized Hindi, code-mixed and adversarial sets; membership inference
against lines 1-130), with no reference cache (``MMIE_CACHE=0``: every pass computed):

- **before**: ``--engine transformers --batch-size 16 --head-dtype fp32`` with the system's
  allocator (``MMIE_MALLOC=system``): transformers' ``generate`` 16 prompts at a time and an
  fp32 LM head, as ``evaluate`` ran when #17 was filed (its z-scores on every perplexity pass
  are gone from the code and not re-created, so "before" is if anything faster than then);
- **after**: the defaults (mmie's greedy loop, 64 prompts per batch, freed memory reused) with
  ``--head-dtype bf16``: the same continuations as before;
- **after_body_bf16**: as *after* with ``--body-dtype bf16`` too, as ``make demo`` runs it: the
  decoder body's projections in bf16, which changes some continuations.

Reported: each run's wall time (and its profile phases) and its ratio to *before*; for each,
how many continuations are token-identical to *before*'s; the largest relative difference of
any manifest metric and the metrics that moved by more than 0.1%, each with its value in both
runs. Needs the converted default model.

    python bench/bench_evaluate_default.py        # about 11 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mmie.core.bounds import cp_bound

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
RUNS = {
    "before": (["--engine", "transformers", "--batch-size", "16", "--head-dtype", "fp32"],
               {"MMIE_MALLOC": "system"}),
    "after": (["--head-dtype", "bf16"], {}),
    "after_body_bf16": (["--head-dtype", "bf16", "--body-dtype", "bf16"], {}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-prompts", type=int, default=60)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def split(root: Path) -> dict[str, Path]:
    """The demo's train (1-130) and test (161-) lines of each sample file."""
    out = {}
    for name in ("hi", "en", "ur", "pa", "bn", "hi_latn"):
        lines = (SAMPLE / f"{name}.jsonl").read_text(encoding="utf-8").splitlines(True)
        for part, rows in (("train", lines[:130]), ("test", lines[160:])):
            out[f"{name}.{part}"] = root / f"{name}.{part}.jsonl"
            out[f"{name}.{part}"].write_text("".join(rows), encoding="utf-8")
    return out


def command(files: dict[str, Path], n_prompts: int, out: Path, extra: list[str]) -> list[str]:
    xlang = [a for lang in ("ur", "pa", "bn")
             for a in ("--xlang", f"{lang}={files[lang + '.test']}")]
    return [sys.executable, "-m", "mmie", "--quiet", "evaluate", "--model", "default",
            "--forget", str(files["hi.test"]), "--forget-train", str(files["hi.train"]),
            "--retain", str(files["en.test"]), *xlang, "--romanized", str(files["hi_latn.test"]),
            "--mixed", str(SAMPLE / "hi_en_mixed.jsonl"),
            "--adversarial", str(SAMPLE / "adversarial_hi.jsonl"), "--arm", "base",
            "--n-prompts", str(n_prompts), "--out", str(out), "--force", *extra]


def evaluate(files: dict[str, Path], n_prompts: int, out: Path, name: str) -> dict:
    extra, env = RUNS[name]
    start = time.perf_counter()
    subprocess.run(command(files, n_prompts, out, extra), check=True,
                   env={**os.environ, "MMIE_CACHE": "0", "MMIE_PROFILE": "1", **env})
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return {"seconds": seconds, "metrics": manifest["metrics"], "samples": samples}


def compare(before: dict, after: dict) -> dict:
    same = sum(a["generation"] == b["generation"] for a, b in zip(before["samples"],
                                                                  after["samples"],
                                                        strict=True))
    moved, largest = {}, 0.0
    for name, m in before["metrics"].items():
        a, b = m.get("value") if isinstance(m, dict) else None, \
            (after["metrics"].get(name) or {}).get("value")
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            relative = abs(a - b) / max(abs(a), 1e-12)
            largest = max(largest, relative)
            if relative > 1e-3:
                moved[name] = [a, b]
    rates = {name: rate_intervals(before["metrics"][name], after["metrics"][name])
             for name in moved if name.endswith("_rate")}
    return {"continuations_identical_to_before": f"{same}/{len(before['samples'])}",
            "largest_relative_metric_difference": largest,
            "metrics_moved_over_0.1%": moved,
            "moved_rates": len(rates),
            "moved_rates_inside_before's_95%_interval": sum(v["inside"] for v in rates.values()),
            "moved_rates_outside_it": {k: v for k, v in rates.items() if not v["inside"]}}


def _interval(metric: dict) -> list[float]:
    """The two-sided 95% Clopper-Pearson interval of a rate metric (``value`` of ``n``)."""
    n = int(metric["n"])
    x = round(metric["value"] * n)
    return [cp_bound(x, n, 0.025, "greater"), cp_bound(x, n, 0.025, "less")]


def rate_intervals(before: dict, after: dict) -> dict:
    """Both runs' values and 95% intervals; ``inside``: after's value in before's interval,
    ``before_inside_after``: the converse (1/60 -> 0/60 fails the first, since an exact
    interval of 1/60 excludes 0, and passes the second)."""
    lo, hi = _interval(before)
    alo, ahi = _interval(after)
    return {"before": before["value"], "after": after["value"], "interval": [lo, hi],
            "after_interval": [alo, ahi], "inside": lo <= after["value"] <= hi,
            "before_inside_after": alo <= before["value"] <= ahi}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = split(Path(tmp))
        got = {name: evaluate(files, args.n_prompts, Path(tmp) / name, name) for name in RUNS}
    result = {"model": "default (Gemma 3 270M)", "n_prompts": args.n_prompts}
    for name, run in got.items():
        result[f"{name}_s"] = run["seconds"]
        if name != "before":
            result[f"ratio_{name}"] = got["before"]["seconds"] / run["seconds"]
            result[name] = compare(got["before"], run)
    result |= {f"profile_{name}": run["metrics"].get("profile") for name, run in got.items()}
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return result


def _table(result: dict) -> str:
    rows = []
    for key, value in result.items():
        if key.startswith("profile"):
            phases = {k.split("/", 1)[-1]: round(v["seconds"], 1)
                      for k, v in (value or {}).get("phases", {}).items() if k.count("/") == 1}
            rows.append(f"{key:>26}: {phases}")
        else:
            rows.append(f"{key:>26}: {value:.4g}" if isinstance(value, float)
                        else f"{key:>26}: {value}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
