"""Pure evaluation metrics: exact values on hand-made records, degenerate text never a language."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from mmie.core.errors import MetricError
from mmie.lid.detect import degeneracy, detect
from mmie.metrics import definitions as em
from mmie.metrics.fluency import FluencyReference, is_fluent, reference


def _lid(lang, script="Latn", confidence=0.9):
    return SimpleNamespace(lang=lang, script=script, confidence=confidence)


def _junk(is_degenerate=False, **values):
    base = dict(nonletter_share=0.0, distinct_1=1.0, distinct_2=1.0, longest_repeat=0)
    return SimpleNamespace(is_degenerate=is_degenerate, **(base | values))


def _record(lang, own="en", degenerate=False, fluency=1.0, set_name="retain", idx=0):
    return em.sample_record(set_name, idx, "p", "g", _lid(lang), _junk(degenerate), fluency,
                            "hi", own)


def test_sample_record_has_exactly_the_contract_fields():
    rec = _record("en")
    assert set(rec) == {"set", "idx", "prompt", "generation", "lang", "script", "confidence",
                        "is_forget", "is_own", "degenerate", "und", "fluency_nll"}
    em.mark_fluent([rec], reference([1.0], 0.0, "test"))
    assert rec["fluent"] == 1
    assert (rec["lang"], rec["is_own"], rec["is_forget"], rec["degenerate"]) == ("en", 1, 0, 0)


def test_romanized_hindi_counts_as_the_forget_language():
    assert _record("hi-Latn", own="hi-Latn")["is_forget"] == 1
    assert _record("hi")["is_forget"] == 1
    assert _record("ur")["is_forget"] == 0


def test_degeneracy_flag_overrides_a_language_label():
    rec = _record("hi", own="hi", degenerate=True)
    assert (rec["lang"], rec["is_forget"], rec["is_own"], rec["degenerate"], rec["und"]) == \
        ("und", 0, 0, 1, 0)


@pytest.mark.parametrize("text", ["<strong>-</strong><strong>-", "the the the the the the the",
                                  "1234 5678 9012 3456", "हम हम हम हम हम हम हम हम"])
def test_real_degenerate_text_is_never_a_language(text):
    lid, junk = detect([text])[0], degeneracy(text)
    rec = em.sample_record("forget", 0, "p", text, lid, junk, None, "hi", "hi")
    assert rec["degenerate"] == 1
    assert rec["lang"] == "und"
    assert rec["is_forget"] == 0 and rec["is_own"] == 0


def test_set_metrics_rates_are_exact():
    records = [_record("en", fluency=1.0), _record("en", fluency=3.0), _record("hi", fluency=2.0),
               _record("en", degenerate=True, fluency=None), _record("und", fluency=4.0)]
    junk = [_junk(distinct_2=1.0), _junk(distinct_2=0.5), _junk(distinct_2=0.0),
            _junk(distinct_2=0.5), _junk(distinct_2=1.0)]
    em.mark_fluent(records, reference([1.0, 3.0], 0.5, "test"))   # threshold 2.5
    got = em.set_metrics(records, junk, "en")
    assert got["forget_rate"] == em.Metric(2 / 5, 5)          # und counts as Hindi: conservative
    assert got["forget_rate_known"] == em.Metric(1 / 4, 4)    # und left out
    assert got["own_rate"] == em.Metric(2 / 5, 5)
    assert got["degenerate_rate"] == em.Metric(1 / 5, 5)      # und is not degenerate
    assert got["und_rate"] == em.Metric(1 / 5, 5)
    assert got["fluent_rate"] == em.Metric(2 / 5, 5)          # en 1.0 and hi 2.0
    assert got["fluency_nll"] == em.Metric(2.5, 4)   # the null one is left out
    assert got["distinct_2"] == em.Metric(0.6, 5)


def test_set_without_own_language_has_no_own_rate():
    records = [_record("en", own=None), _record("hi", own=None)]
    got = em.set_metrics(records, [_junk(), _junk()], None)
    assert "own_rate" not in got
    assert records[0]["is_own"] is None


def test_rate_skips_not_applicable_and_reports_empty_as_missing():
    assert em.rate([1, 0, None, 1]) == em.Metric(2 / 3, 3)
    empty = em.rate([None])
    assert empty.value is None and empty.missing


def test_distribution_and_substitution_exact():
    labels = ["en", "en", "ur", "pa", "degenerate", "hi", "ur-Latn", "fr"]
    dist = em.distribution(labels)
    assert list(dist) == sorted(set(labels))
    assert dist["en"].value == 2 / 8 and dist["degenerate"].value == 1 / 8
    sub = em.substitution(labels, ["ur", "pa", "bn"], "en")
    assert sub["protected"] == em.Metric(3 / 8, 8)    # ur, pa, ur-Latn
    assert sub["replacement"] == em.Metric(2 / 8, 8)
    assert em.substitution(["degenerate", "hi"], ["ur"], "en")["protected"] == em.Metric(0.0, 2)


def test_perplexity_is_token_weighted_exp_mean_nll():
    rows = [{"set": "retain", "idx": 0, "nll_sum": 10.0, "n_tokens": 4},
            {"set": "retain", "idx": 1, "nll_sum": 2.0, "n_tokens": 1},
            {"set": "forget", "idx": 0, "nll_sum": 3.0, "n_tokens": 3}]
    got = em.ppl_metrics(rows)
    assert got["retain_nll"].value == pytest.approx(12 / 5)   # not mean(2.5, 2.0)
    assert got["retain_ppl"].value == pytest.approx(math.exp(12 / 5))
    assert got["forget_ppl"] == em.Metric(pytest.approx(math.e), 1)


def test_perplexity_without_tokens_is_missing():
    got = em.ppl_metrics([{"set": "retain", "idx": 0, "nll_sum": 0.0, "n_tokens": 0}])
    assert got["retain_ppl"].value is None and "no scored tokens" in got["retain_ppl"].missing


def test_membership_auc_chance_and_perfect():
    same = [0.1, 0.5, 0.9, 0.3]
    assert em.membership_auc(same, list(same)) == 0.5
    assert em.membership_auc([5.0, 6.0, 7.0], [1.0, 2.0]) == 1.0
    assert em.membership_auc([1.0, 2.0], [5.0, 6.0]) == 0.0
    with pytest.raises(MetricError):
        em.membership_auc([], [1.0])
    with pytest.raises(MetricError):
        em.membership_auc([float("nan")], [1.0])


def test_mia_metrics_use_minus_loss_as_the_member_score():
    rows = [{"idx": 0, "member": 1, "loss": 1.0, "mink_pp": 2.0},
            {"idx": 1, "member": 1, "loss": 1.5, "mink_pp": 3.0},
            {"idx": 2, "member": 0, "loss": 4.0, "mink_pp": -1.0},
            {"idx": 3, "member": 0, "loss": 5.0, "mink_pp": None}]
    got = em.mia_metrics(rows)
    assert got["mia_auc_loss"] == em.Metric(1.0, 4)
    assert got["mia_auc_mink_pp"] == em.Metric(1.0, 3)


def test_min_k_pp_averages_the_lowest_share():
    assert em.min_k_pp([5.0, -3.0, 0.0, 2.0, -1.0], k=0.4) == -2.0
    assert em.min_k_pp([4.0], k=0.2) == 4.0            # at least one token is kept
    with pytest.raises(MetricError):
        em.min_k_pp([], 0.2)


def test_metric_book_strict_raises_but_skip_never_does():
    book = em.MetricBook(strict=True)
    book.skip("mia_auc_loss", "no --forget-train given")
    book.put("ok", em.Metric(1.0, 3))
    with pytest.raises(MetricError, match="'bad'"):
        book.compute("bad", lambda: em.min_k_pp([], 0.2), 0)
    lenient = em.MetricBook()
    lenient.compute("bad", lambda: em.min_k_pp([], 0.2), 0)
    assert lenient.to_dict()["bad"] == {"value": None, "n": 0,
                                        "missing": "Min-K%++ of a text with no scored tokens"}
    assert book.to_dict()["ok"] == {"value": 1.0, "n": 3}


def test_probe_metrics_separable_and_too_small():
    rng = np.random.default_rng(0)
    forget = {3: rng.normal(2.0, 1.0, (20, 4))}
    retain = {3: rng.normal(-2.0, 1.0, (20, 4))}
    got = em.probe_metrics(forget, retain, seed=0)
    assert got["probe_auc.layer3"].value > 0.95
    assert got["probe_auc"].value == got["probe_auc.layer3"].value
    tiny = em.probe_metrics({1: forget[3][:1]}, {1: retain[3][:1]})
    assert tiny["probe_auc"].value is None and tiny["probe_auc.layer1"].missing


def test_chart_is_a_png():
    metrics = {"forget.forget_rate": {"value": 0.5, "n": 2}, "retain.own_rate": {"value": 1.0,
                                                                                "n": 2}}
    assert em.chart_png(metrics, ["forget", "retain"], "base").startswith(b"\x89PNG")


def test_und_is_apart_from_degenerate_and_never_forgetting_success():
    rec = _record("und", own="hi", set_name="forget")
    assert (rec["lang"], rec["und"], rec["degenerate"]) == ("und", 1, 0)
    assert rec["is_forget"] == 1 and rec["is_own"] == 0      # doubt counts against the arm
    junk = _record("und", own="hi", degenerate=True)
    assert (junk["und"], junk["degenerate"], junk["is_forget"]) == (0, 1, 0)


def test_romanized_hindustani_counts_as_hindi_on_forget_prompts_not_as_urdu_own():
    assert _record("hi-ur-Latn", own="hi-Latn")["is_forget"] == 1
    assert _record("hi-ur-Latn", own="hi-Latn")["is_own"] == 1
    assert _record("hi-ur-Latn", own="ur")["is_own"] == 0     # Urdu prompts want Urdu script
    assert _record("ur-Latn", own="ur")["is_forget"] == 0


def test_short_hindi_answer_is_hindi_not_und():
    lid, junk = detect(["हाँ"])[0], degeneracy("हाँ")
    rec = em.sample_record("forget", 0, "p", "हाँ", lid, junk, 1.0, "hi", "hi")
    assert (rec["lang"], rec["und"], rec["degenerate"], rec["is_forget"]) == ("hi", 0, 0, 1)


@pytest.mark.parametrize("nll,degenerate,expected", [
    (2.0, False, True), (3.0, False, True), (3.01, False, False), (1.0, True, False),
    (None, False, False)])
def test_fluent_is_within_tolerance_of_the_reference_median(nll, degenerate, expected):
    ref = reference([1.0, 2.0, 9.0, None], tolerance=1.0, source="test")  # median 2.0
    assert (ref.median, ref.threshold, ref.n) == (2.0, 3.0, 3)
    assert is_fluent(nll, degenerate, ref) is expected


def test_no_reference_means_nothing_is_fluent():
    ref = reference([None], 1.0, "test")
    assert ref.threshold is None and not is_fluent(0.1, False, ref)
    assert isinstance(ref, FluencyReference) and ref.to_dict()["source"] == "test"
