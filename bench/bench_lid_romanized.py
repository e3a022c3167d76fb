"""Out-of-sample precision and recall of romanized-Hindustani detection (docs/lid.md).

Scores :mod:`mmie.lid.detect` on NTREX-128 rows 1000-1996 (Hindi in casual romanization vs English)
and UD Hindi-PUD (IAST transliteration vs English), from ``../shared/data``; see
:mod:`mmie.lid.validation` for what was looked at while writing the rule and what was not.

    python bench/bench_lid_romanized.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmie.lid.validation import ntrex_pools, pud_pools, score_pools


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    args = parser.parse_args()
    scores = score_pools(ntrex_pools(args.data) + pud_pools(args.data))
    print("| pool | labelled hi-ur-Latn | of | precision | recall |")
    print("|---|---|---|---|---|")
    for name, s in scores.items():
        n = s.tp + s.fn + s.fp + s.tn
        print(f"| {name} | {s.tp + s.fp} | {n} | {s.precision:.3f} | {s.recall:.3f} |")


if __name__ == "__main__":
    main()
