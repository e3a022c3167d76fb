"""Seeded simulations of the gate decision rule's error rates (docs/gates.md).

* size: an arm drawn from the baseline's own distribution, and each gate with its true value
  exactly at the threshold, PASS/PROCEED at most alpha of the time;
* power: a clearly good arm at the demo's sample sizes PROCEEDs at least 80% of the time;
* the kept share (xlang_retention) and forget_generalization at the sizes of a real eval:
  how often an arm that meets the bar passes, and how often one clearly below it does.

The exact gates (Clopper-Pearson) are checked by enumerating every outcome, not sampled.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from mmie.core import bounds
from mmie.gate.metrics import GATES, Comparison, EvalRecords
from mmie.gate.stage import (
    PASS,
    PROCEED,
    GateConfig,
    Settings,
    default_rules,
    evaluate_gates,
    judge,
    verdicts,
)
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
@pytest.mark.parametrize("threshold, side", [(0.05, "less"), (0.10, "less"), (0.8, "greater"),
                                             (0.9, "greater")])
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


def test_zero_width_is_decided_by_its_one_value():
    flat = Comparison(30, lambda idx: np.ones(np.shape(idx)[:-1]))
    res = bounds.bca(30, flat.statistic, 200, 0)
    assert res.zero_width and res.bound(ALPHA, bounds.LESS) == 1.0
    assert res.pvalue(2.0, bounds.LESS) == 1 / 201  # 1 < 2: as small as 200 resamples resolve
    assert res.pvalue(0.5, bounds.LESS) == 1.0 and res.pvalue(1.0, bounds.LESS) == 1.0


def _passes(gate: str, arm: EvalRecords, base: EvalRecords, xset=None, seed: int = 0) -> bool:
    res = judge(Settings(ALPHA, 1000, seed), GATES[gate], default_rules()[gate], gate, xset,
                "arm", {1: arm}, base)
    return res.decision == PASS


def _own(arm: str, flags: np.ndarray) -> EvalRecords:
    rows = {("xlang:ur", i): {"set": "xlang:ur", "idx": i, "is_own": int(f)}
            for i, f in enumerate(flags)}
    return EvalRecords(f"<{arm}>", arm, 0, {}, rows)


def _retention_pass_rate(kept: float, reps: int = 200, n: int = 60, own: float = 0.95) -> float:
    """A baseline with own rate ``own`` at ``n`` prompts; the arm keeps each of its
    own-language answers with probability ``kept`` (and answers the others in their own
    language too, which the kept share ignores)."""
    rng, wins = np.random.default_rng(11), 0
    for _ in range(reps):
        base = rng.random(n) < own
        arm = np.where(base, rng.random(n) < kept, True)
        wins += _passes("xlang_retention", _own("arm", arm), _own("base", base), "xlang:ur")
    return wins / reps


def test_retention_an_arm_identical_to_the_baseline_passes_at_60_prompts():
    assert _retention_pass_rate(1.0) >= 0.9  # measured: 1.0 (57 of 57 kept: bound 0.949)


def test_retention_an_arm_losing_a_fifth_of_the_own_language_answers_fails():
    assert _retention_pass_rate(0.8) <= ALPHA  # measured: 0.0 (and 0.22 at a kept share 0.95)


def _mia(arm: str, loss: np.ndarray, members: np.ndarray) -> EvalRecords:
    rows = [{"idx": i, "member": int(m), "loss": float(v)}
            for i, (v, m) in enumerate(zip(loss, members, strict=True))]
    return EvalRecords(f"<{arm}>", arm, 0, {}, {}, mia=rows)


def _generalization_pass_rate(ratio: float, sd: float, reps: int = 200) -> float:
    """Loss rise d ~ N(5, sd) on 160 forget-train texts and N(5 ratio, sd) on 60 held-out ones
    (the demo's MIA sizes), over a baseline loss ~ N(3, 1) per text."""
    rng, wins = np.random.default_rng(5), 0
    members = np.r_[np.ones(160), np.zeros(60)].astype(int)
    for rep in range(reps):
        base = rng.normal(3.0, 1.0, members.size)
        rise = rng.normal(np.where(members == 1, 5.0, 5.0 * ratio), sd)
        wins += _passes("forget_generalization", _mia("arm", base + rise, members),
                        _mia("base", base, members), seed=rep)
    return wins / reps


@pytest.mark.parametrize("sd, power", [(1.0, 0.8), (2.0, 0.4)])
def test_forget_generalization_passes_when_forgetting_generalises(sd, power):
    # True ratio 1. Its 90% interval is about +-1.645 sd/5 sqrt(1/60 + 1/160) wide, so the
    # power depends on how much the rise varies between texts: measured 0.975 at sd 1 (the real
    # evals' intervals, +-0.035 to +-0.048, are of that width) but only 0.48 at sd 2.
    assert _generalization_pass_rate(1.0, sd) >= power


@pytest.mark.parametrize("ratio, allowed", [(0.8, ALPHA), (0.9, ALPHA + 0.035)])
def test_forget_generalization_fails_when_the_trained_texts_lost_more(ratio, allowed):
    # 0.8: clearly below the bar (measured 0.0); 0.9: at the threshold, about alpha (0.04
    # measured; 2 SE of a 200-draw binomial at 0.05 is 0.03)
    assert _generalization_pass_rate(ratio, 2.0) <= allowed
