"""Seeded simulations of the gate decision rule's error rates (docs/gates.md).

* size: an arm drawn from the baseline's own distribution, and each gate with its true value
  exactly at the threshold, PASS/PROCEED at most alpha of the time;
* power: a clearly good arm at the demo's sample sizes PROCEEDs at least 80% of the time.

The exact gates (Clopper-Pearson) are checked by enumerating every outcome, not sampled.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from mmie.core import bounds
from mmie.gate.metrics import Comparison
from mmie.gate.stage import PROCEED, GateConfig, evaluate_gates, verdicts
from tests.gate_synth import BASE, GOOD, Sizes, records

ALPHA = 0.05
# The sizes `make demo` should use (docs/gates.md), with data/sample's files: TRAIN_LINES=60 of
# the 220 Hindi lines leave 160 held-out forget prompts and 60 MIA members; N_PROMPTS=220 takes
# every line of the other files (220 per xlang set, retain and romanized; the mixed and
# adversarial files have 110 and 60).
DEMO = Sizes(forget=160, xlang=220, family=220, retain=220, members=60, nonmembers=160,
             xlangs=("ur", "pa", "bn"), families=(("mixed", 110), ("adversarial", 60)))


def _proceed_rate(arm_profile, sizes: Sizes, reps: int) -> float:
    config = GateConfig(n_boot=400)
    wins = 0
    for rep in range(reps):
        rng = np.random.default_rng(rep)
        base = records("base", 0, BASE, sizes, rng)
        arm = records("arm", 1, arm_profile, sizes, rng)
        results = evaluate_gates(config, base, {"arm": {1: arm}})
        wins += verdicts(results, ALPHA)["arm"]["decision"] == PROCEED
    return wins / reps


def test_arm_equal_to_baseline_rarely_proceeds():
    assert _proceed_rate(BASE, DEMO, reps=20) <= ALPHA


def test_clearly_good_arm_proceeds_at_the_demo_sizes():
    assert _proceed_rate(GOOD, DEMO, reps=40) >= 0.8


def _exact_pass_rate(n: int, p: float, threshold: float, side: str) -> float:
    x = np.arange(n + 1)
    ok = [bounds.cp_bound(int(k), n, ALPHA, side) < threshold if side == bounds.LESS
          else bounds.cp_bound(int(k), n, ALPHA, side) > threshold for k in x]
    return float(binom.pmf(x, n, p)[ok].sum())


@pytest.mark.parametrize("n", [16, 59, 100, 160, 300])
@pytest.mark.parametrize("threshold, side", [(0.05, "less"), (0.10, "less"), (0.8, "greater")])
def test_proportion_gate_at_its_threshold_passes_at_most_alpha(n, threshold, side):
    assert _exact_pass_rate(n, threshold, threshold, side) <= ALPHA


@pytest.mark.parametrize("n, pb, ratio, side", [(40, 0.9, 0.9, "greater"),
                                                 (160, 0.97, 0.9, "greater"),
                                                 (60, 0.5, 0.5, "less")])
def test_ratio_gate_at_its_threshold_passes_at_most_alpha(n, pb, ratio, side):
    # Worst case for the pairing: arm and baseline independent (the bound ignores pairing).
    pa, x = pb * ratio, np.arange(n + 1)
    wa, wb = binom.pmf(x, n, pa), binom.pmf(x, n, pb)
    total = 0.0
    for xa in x[wa > 1e-12]:
        for xb in x[(wb > 1e-12) & (x > 0)]:
            value = bounds.ratio_bound(int(xa), n, int(xb), n, ALPHA, side)
            if (value > ratio) if side == "greater" else (value < ratio):
                total += wa[xa] * wb[xb]
    assert total <= ALPHA


def test_bca_ratio_of_means_at_its_threshold_passes_about_alpha():
    """Forget-mass style ratio with the true ratio exactly at 0.5: rejections ~ alpha."""
    rng, n, passes, reps = np.random.default_rng(7), 100, 0, 300
    for rep in range(reps):
        den = rng.gamma(4.0, 0.2, n)
        num = 0.5 * den * rng.lognormal(-0.02, 0.2, n)  # E[num] = 0.5 E[den]
        comp = Comparison(n, lambda idx, a=num, b=den: a[idx].mean(-1) / b[idx].mean(-1))
        res = bounds.bca(n, comp.statistic, 500, rep)
        passes += res.bound(ALPHA, bounds.LESS) < 0.5
    # Monte Carlo allowance: 2 SE of a 300-draw binomial at 0.05 is about 0.025.
    assert passes / reps <= ALPHA + 0.025


def test_zero_width_never_passes():
    flat = Comparison(30, lambda idx: np.ones(np.shape(idx)[:-1]))
    res = bounds.bca(30, flat.statistic, 200, 0)
    assert res.zero_width and res.pvalue(2.0, bounds.LESS) == 1.0
