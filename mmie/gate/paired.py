"""Gates that judge the arm on the prompts the baseline got right, paired prompt by prompt.

``xlang_retention`` asks how many of a protected language's own-language answers the arm
keeps. A ratio of two rates (arm own rate / baseline own rate) bounded from two independent
Clopper-Pearson bounds cannot pass at the sample sizes we use: at 60 prompts an arm identical
to a baseline with 57 own-language answers has the ratio's 95% lower bound 0.87. Pairing removes
the baseline's own sampling noise from the question: among the prompts the baseline answered in
their own language, the share the arm also answers in it is a single proportion with an exact
bound, and it bounds the ratio from below (see :func:`_xlang_retention`).
"""

from __future__ import annotations

from mmie.gate.metrics import (
    Direction,
    Method,
    MissingInput,
    Proportion,
    paired,
    register_gate,
    xlang_set,
)


@register_gate("xlang_retention", Direction.GREATER,
               "kept share: of each protected language's prompts the baseline answered in their "
               "own language, the share the arm also answers in it (a lower bound on own rate "
               "arm / baseline)", Method.PROPORTION, per_xlang=True)
def _xlang_retention(arm, base, xset, _ctx) -> Proportion:
    """``x`` = prompts answered in their own language by both, ``n`` = by the baseline.

    Why a bound on it is a bound on retention R = P(arm own) / P(base own): P(arm own) >=
    P(arm own and base own) = P(arm own | base own) P(base own), so R >= P(arm own | base own),
    the kept share. Its exact Clopper-Pearson lower bound is therefore a conservative lower
    bound on R (conservative because prompts the arm newly answers in their own language do
    not count). A baseline with few own-language answers gives a small ``n``, and the gate says
    "insufficient evidence" below min_n (29 at 0.90 and alpha 0.05) rather than guess.
    """
    name = xlang_set(xset)
    a, b = paired(arm, base, name, "is_own")
    base_own = b[:, 0] == 1
    kept, n = int((a[base_own, 0] == 1).sum()), int(base_own.sum())
    if n == 0:
        raise MissingInput(f"the baseline answered none of the {len(b)} prompts of set "
                           f"'{name}' in their own language; there is nothing to keep")
    return Proportion(kept, n, f"kept {kept} of {n} baseline own-language answers; arm own "
                               f"rate {int(a[:, 0].sum())}/{len(a)}")
