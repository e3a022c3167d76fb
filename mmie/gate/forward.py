"""Forward-only gates: teacher-forced token mass (mass.jsonl), and forget generalisation and
PrivLeak (mia.jsonl).

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


# Below this mean loss rise (nats per text) on the forget-train texts the arm unlearned nothing
# measurable, and a ratio to the rise would divide by noise.
MIN_RISE = 0.05


def _mia_pairs(arm: EvalRecords, base: EvalRecords) -> tuple[np.ndarray, np.ndarray]:
    """Member flags and ``[n, 2]`` losses (arm, baseline) of the texts both scored."""
    theirs, ours = _mia_rows(base, "baseline"), _mia_rows(arm, "arm")
    keys = sorted(set(theirs) & set(ours))
    members = np.array([k[0] for k in keys])
    if min(members.sum(), len(keys) - members.sum()) < 2:
        raise MissingInput(f"mia.jsonl pairs need >= 2 members and >= 2 non-members, got "
                           f"{int(members.sum())} and {len(keys) - int(members.sum())}")
    losses = np.array([[ours[k], theirs[k]] for k in keys])
    if not np.isfinite(losses).all():
        raise MissingInput("NaN/inf loss in mia.jsonl")
    return members, losses


@register_gate("forget_generalization", Direction.GREATER,
               "loss rise (arm - baseline, mean NLL per text) on held-out forget texts over "
               "that on the forget-train texts; below 1 = the trained texts are recognisable",
               Method.BOOTSTRAP)
def _forget_generalization(arm, base, _xset, _ctx):
    # The baseline's loss on the same text calibrates each text's difficulty (the reference
    # model of LiRA, Carlini et al. 2022), so what is left is what unlearning did to it.
    members, losses = _mia_pairs(arm, base)
    rise, member = losses[:, 0] - losses[:, 1], members.astype(bool)
    if (trained := rise[member].mean()) <= MIN_RISE:
        raise MissingInput(f"the arm did not raise the loss on the forget-train texts (mean "
                           f"rise {trained:.3g} <= {MIN_RISE:g} nats); nothing was unlearned "
                           "to generalise")

    def stat(idx):
        # the class of each drawn text, not of its position: the jackknife drops positions
        inside, held = member[idx], ~member[idx]
        values = rise[idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            return ((values * held).sum(axis=-1) / held.sum(axis=-1)) / (
                (values * inside).sum(axis=-1) / inside.sum(axis=-1))

    return Comparison(len(rise), stat, strata=members)


@register_gate("mia_privleak", Direction.WITHIN,
               "PrivLeak: (MIA AUC arm - MIA AUC baseline) / AUC baseline, score -loss on "
               "forget-train vs held-out texts; near 0 = no trace left", Method.BOOTSTRAP)
def _mia_privleak(arm, base, _xset, _ctx):
    members, losses = _mia_pairs(arm, base)
    auc_arm, auc_base = (auc_statistic(-losses[:, j], members) for j in (0, 1))

    def stat(idx):
        base_auc = auc_base(idx)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (auc_arm(idx) - base_auc) / base_auc

    return Comparison(len(members), stat, strata=members)
