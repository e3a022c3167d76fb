"""Forward-only gates: teacher-forced token mass (mass.jsonl) and PrivLeak (mia.jsonl).

They need no generation, so they cost one forward pass per text and have the statistical power
of a continuous measure; each compares the arm with the baseline on the same texts, and the
bootstrap (:mod:`mmie.core.bounds`) resamples texts with arm and baseline together.
"""

from __future__ import annotations

import numpy as np

from mmie.core.stats import auc_statistic
from mmie.gate.metrics import (
    Comparison,
    Direction,
    EvalRecords,
    Method,
    MissingInput,
    paired,
    register_gate,
    xlang_set,
)


def _ratio_of_means(num: np.ndarray, den: np.ndarray, what: str) -> Comparison:
    if den.mean() <= 0:
        raise MissingInput(f"baseline {what} is 0; a ratio to it is undefined")

    def stat(idx):
        with np.errstate(divide="ignore", invalid="ignore"):
            return num[idx].mean(axis=-1) / den[idx].mean(axis=-1)

    return Comparison(len(num), stat)


@register_gate("forget_mass_ratio", Direction.LESS,
               "mean probability mass on forget-language tokens over held-out 'forget' "
               "continuations (teacher-forced): arm / baseline", Method.BOOTSTRAP)
def _forget_mass_ratio(arm, base, _xset, _ctx):
    a, b = paired(arm, base, "forget", "forget_mass", table="mass")
    return _ratio_of_means(a[:, 0], b[:, 0], "forget mass on set 'forget'")


@register_gate("xlang_own_mass", Direction.GREATER,
               "mean own-language token mass on each protected language's texts: arm / baseline",
               Method.BOOTSTRAP, per_xlang=True)
def _xlang_own_mass(arm, base, xset, _ctx):
    xset = xlang_set(xset)
    a, b = paired(arm, base, xset, "own_mass", table="mass")
    return _ratio_of_means(a[:, 0], b[:, 0], f"own mass on set '{xset}'")


def _mia_rows(records: EvalRecords, who: str) -> dict[tuple[int, int], float]:
    if records.mia is None:
        raise MissingInput(f"{who} artifact has no mia.jsonl")
    rows = {(int(r["member"]), int(r["idx"])): r.get("loss") for r in records.mia}
    return {k: float(v) for k, v in rows.items() if v is not None}


@register_gate("mia_privleak", Direction.WITHIN,
               "PrivLeak: (MIA AUC arm - MIA AUC baseline) / AUC baseline, score -loss on "
               "forget-train vs held-out texts; near 0 = no trace left", Method.BOOTSTRAP)
def _mia_privleak(arm, base, _xset, _ctx):
    theirs, ours = _mia_rows(base, "baseline"), _mia_rows(arm, "arm")
    keys = sorted(set(theirs) & set(ours))
    members = np.array([k[0] for k in keys])
    if min(members.sum(), len(keys) - members.sum()) < 2:
        raise MissingInput(f"mia.jsonl pairs need >= 2 members and >= 2 non-members, got "
                           f"{int(members.sum())} and {len(keys) - int(members.sum())}")
    scores = np.array([[-ours[k], -theirs[k]] for k in keys])
    if not np.isfinite(scores).all():
        raise MissingInput("NaN/inf loss in mia.jsonl")
    auc_arm, auc_base = (auc_statistic(scores[:, j], members) for j in (0, 1))

    def stat(idx):
        base_auc = auc_base(idx)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (auc_arm(idx) - base_auc) / base_auc

    return Comparison(len(keys), stat, strata=members)
