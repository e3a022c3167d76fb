"""Hand-computed checks of the gates made passable at ~60 prompts: the paired kept share
(``xlang_retention``), the prompt-family "not informative" rule, and ``forget_generalization``."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import brentq

from mmie.core import bounds
from mmie.gate.metrics import GATES, EvalRecords, MissingInput, Proportion
from mmie.gate.stage import FAIL, NOT_INFORMATIVE, PASS, Settings, default_rules, judge

ALPHA = 0.05


def _samples(arm: str, set_name: str, field: str, flags) -> EvalRecords:
    rows = {(set_name, i): {"set": set_name, "idx": i, field: f} for i, f in enumerate(flags)}
    return EvalRecords(f"<{arm}>", arm, 0, {}, rows)


def _judge(gate: str, name: str, arm: EvalRecords, base: EvalRecords, xset=None, n_boot=2000):
    spec = GATES[gate]
    return judge(Settings(ALPHA, n_boot, 0), spec, default_rules()[gate], name, xset, "arm",
                 {1: arm}, base)


# --- xlang_retention: the kept share --------------------------------------------------------

def test_kept_share_counts_only_the_baselines_own_language_prompts():
    base = _samples("base", "xlang:ur", "is_own", [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, None])
    arm = _samples("arm", "xlang:ur", "is_own", [1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1])
    found = GATES["xlang_retention"].extract(arm, base, "xlang:ur", None)
    # the null pair is skipped; the arm's new own answer (idx 8) does not count
    assert found == Proportion(7, 8, "kept 7 of 8 baseline own-language answers; arm own rate "
                                     "8/10")
    # exact lower bound of 7 of 8: the p with P(X >= 7 | 8, p) = alpha, i.e. 8p^7 - 7p^8
    low = brentq(lambda p: 8 * p ** 7 - 7 * p ** 8 - ALPHA, 0.1, 0.999)
    assert bounds.cp_bound(7, 8, ALPHA, bounds.GREATER) == pytest.approx(low, rel=1e-9)


@pytest.mark.parametrize("n, decision, insufficient", [(29, PASS, False), (28, FAIL, True)])
def test_an_arm_keeping_every_answer_passes_from_29(n, decision, insufficient):
    # n of n: the exact lower bound is alpha^(1/n); 0.05^(1/29) = 0.9019 > 0.9 > 0.05^(1/28)
    flags = [1] * n + [0] * 3
    res = _judge("xlang_retention", "xlang_retention:ur", _samples("arm", "xlang:ur", "is_own",
                 flags), _samples("base", "xlang:ur", "is_own", flags), "xlang:ur")
    assert res.decision == decision and res.insufficient is insufficient
    assert res.n == n and res.ci["low"] == pytest.approx(ALPHA ** (1 / n))
    assert f"kept {n} of {n} baseline own-language answers; arm own rate {n}/{n + 3}" in (
        res.reason)


def test_identical_arm_at_60_prompts_now_passes():
    # 57 of 60 own answers on both sides: the old ratio bound was 0.87 (FAIL)
    flags = [1] * 57 + [0] * 3
    base, arm = (_samples(w, "xlang:ur", "is_own", flags) for w in ("base", "arm"))
    assert bounds.ratio_bound(57, 60, 57, 60, ALPHA, bounds.GREATER) < 0.9
    res = _judge("xlang_retention", "xlang_retention:ur", arm, base, "xlang:ur")
    assert res.decision == PASS and res.ci["low"] == pytest.approx(ALPHA ** (1 / 57))


def test_a_baseline_without_own_language_answers_is_not_computable():
    base = _samples("base", "xlang:ur", "is_own", [0] * 10)
    arm = _samples("arm", "xlang:ur", "is_own", [1] * 10)
    with pytest.raises(MissingInput, match="nothing to keep"):
        GATES["xlang_retention"].extract(arm, base, "xlang:ur", None)


# --- prompt families: not informative when a perfect arm cannot pass -------------------------

def _family(xa: int, xb: int, n: int = 60):
    arm = _samples("arm", "adversarial", "is_forget", [1] * xa + [0] * (n - xa))
    base = _samples("base", "adversarial", "is_forget", [1] * xb + [0] * (n - xb))
    return _judge("adversarial_forget", "adversarial_forget", arm, base)


def test_family_gate_no_perfect_arm_could_pass_is_not_informative():
    res = _family(0, 12)  # baseline 0.2, at the floor: the floor alone lets it decide
    assert bounds.ratio_bound(0, 60, 12, 60, ALPHA, bounds.LESS) == pytest.approx(0.5529, abs=1e-4)
    assert res.decision == NOT_INFORMATIVE and res.decisive is False
    assert res.reason == ("not informative: at n=60 with the baseline at 12/60, even an arm "
                          "with no forget-language answer could not pass (upper bound 0.553 "
                          ">= 0.5); shown, not decisive")
    assert res.estimate == 0.0 and res.ci["high"] == pytest.approx(0.5529, abs=1e-4)


def test_family_gate_stays_decisive_when_a_good_arm_can_pass():
    res = _family(0, 40)  # 0.0596 / 0.533: upper bound 0.112
    assert res.decision == PASS and res.decisive
    assert res.ci["high"] == pytest.approx(bounds.ratio_bound(0, 60, 40, 60, ALPHA, "less"))
    assert _family(30, 40).decision == FAIL  # and a bad one fails


def test_family_gate_keeps_the_floor_and_leaves_small_n_to_insufficient_evidence():
    assert "< floor 0.2" in _family(0, 6).reason  # 0.1 < floor: the point-estimate rule
    small = _family(0, 3, n=8)  # 8 < min_n 10: the evaluation is too small, which FAILs
    assert small.decision == FAIL and small.insufficient and small.decisive


# --- forget_generalization ----------------------------------------------------------------

def _mia(arm: str, losses, members) -> EvalRecords:
    rows = [{"idx": i, "member": m, "loss": v} for i, (v, m) in enumerate(zip(losses, members))]
    return EvalRecords(f"<{arm}>", arm, 0, {}, {}, mia=rows[::-1])  # order must not matter


MEMBERS = [1, 1, 1, 1, 0, 0]


def test_forget_generalization_is_the_ratio_of_mean_loss_rises():
    base = _mia("base", [3.0, 2.0, 4.0, 3.0, 3.0, 2.5], MEMBERS)
    arm = _mia("arm", [4.0, 4.0, 7.0, 5.0, 4.0, 4.5], MEMBERS)  # rises 1 2 3 2 | 1 2
    ev = GATES["forget_generalization"].extract(arm, base, None, None)
    assert list(ev.strata) == [0, 0, 1, 1, 1, 1] and ev.n == 6  # sorted by (member, idx)
    assert float(ev.statistic(np.arange(6))) == pytest.approx(1.5 / 2.0)
    # a jackknife row drops a position (here member idx 0): each text's class travels with it
    assert float(ev.statistic(np.array([0, 1, 3, 4, 5]))) == pytest.approx(1.5 / (7 / 3))


def test_forget_generalization_needs_a_loss_rise_on_the_trained_texts():
    base = _mia("base", [3.0] * 6, MEMBERS)
    arm = _mia("arm", [3.04, 3.04, 3.04, 3.04, 4.0, 4.0], MEMBERS)
    with pytest.raises(MissingInput, match="did not raise the loss on the forget-train texts"):
        GATES["forget_generalization"].extract(arm, base, None, None)


# --- xlang_leakage: leakage the arm introduced -------------------------------------------------

def test_leakage_counts_only_what_the_arm_introduced():
    base = _samples("base", "xlang:bn", "is_forget", [1, 1, 0, 0, 0, 0])
    arm = _samples("arm", "xlang:bn", "is_forget", [1, 0, 1, 0, 0, 0])
    found = GATES["xlang_leakage"].extract(arm, base, "xlang:bn", None)
    assert found == Proportion(1, 6, "introduced 1 of 6; arm rate 2/6, baseline 2/6")


def test_leakage_an_arm_identical_to_a_leaky_baseline_passes_at_60():
    flags = [1, 1] + [0] * 58  # the measured case: 2 of 60 undetermined on both sides
    base, arm = (_samples(w, "xlang:bn", "is_forget", flags) for w in ("base", "arm"))
    assert bounds.cp_bound(2, 60, ALPHA, bounds.LESS) > 0.1  # the absolute rate would fail
    res = _judge("xlang_leakage", "xlang_leakage:bn", arm, base, "xlang:bn")
    assert res.decision == PASS and res.ci["high"] == pytest.approx(1 - ALPHA ** (1 / 60))


def _leak(arm: str, flags: np.ndarray) -> EvalRecords:
    rows = {("xlang:bn", i): {"set": "xlang:bn", "idx": i, "is_forget": int(f)}
            for i, f in enumerate(flags)}
    return EvalRecords(f"<{arm}>", arm, 0, {}, rows)


@pytest.mark.parametrize("introduced, low, high", [(0.0, 0.95, 1.0), (0.15, 0.0, 0.1)])
def test_leakage_pass_rate_by_simulation(introduced, low, high):
    """Baseline leaks on 5% of 60 prompts; the arm keeps those and leaks anew on each other
    prompt with probability ``introduced`` (at the threshold's far side, 0.15, it must rarely
    pass; an arm adding nothing must nearly always pass)."""
    rng, wins = np.random.default_rng(3), 0
    for rep in range(200):
        base = rng.random(60) < 0.05
        arm = base | (rng.random(60) < introduced)
        res = judge(Settings(ALPHA, 200, rep), GATES["xlang_leakage"],
                    default_rules()["xlang_leakage"], "xlang_leakage:bn", "xlang:bn", "arm",
                    {1: _leak("arm", arm)}, _leak("base", base))
        wins += res.decision == PASS
    assert low <= wins / 200 <= high
