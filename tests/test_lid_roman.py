"""Romanized Hindustani: labelled hi-ur-Latn, English stays English, and out-of-sample
precision/recall on ../shared/data (skipped when that folder is absent)."""

from __future__ import annotations

import pytest

from mmie.lid.detect import detect_one
from mmie.lid.roman import HINDUSTANI_LATN, covers, english_share, languages_of
from mmie.lid.validation import casual_romanization, ntrex_pools, pud_pools, score_pools

from .conftest import SHARED


def test_romanized_urdu_is_hindustani_not_hindi():
    result = detect_one("Mera naam Ali hai aur main Lahore mein rehta hoon")
    assert result.lang == HINDUSTANI_LATN == "hi-ur-Latn"
    assert "not told apart" in result.reason


@pytest.mark.parametrize("text", ["Par for the course, ya know",
                                  "I have to go to the bank, ya know, before it shuts"])
def test_english_with_hindustani_homographs_is_not_romanized(text):
    assert detect_one(text).lang not in ("hi-Latn", HINDUSTANI_LATN)


def test_english_share_counts_function_words_only():
    assert english_share(("par", "for", "the", "course", "ya", "know")) == pytest.approx(0.5)
    assert english_share(("mera", "naam", "ali", "hai")) == 0.0
    assert english_share(()) == 0.0


def test_label_languages_and_coverage():
    assert languages_of("hi-ur-Latn") == {"hi", "ur"}
    assert languages_of("hi") == {"hi"}
    assert covers("hi-ur-Latn", "hi-Latn") and covers("hi-ur-Latn", "ur-Latn")
    assert not covers("hi-ur-Latn", "hi") and not covers("hi", "hi-Latn")
    assert not covers("hi-Latn", "hi-ur-Latn")      # a sure label never covers a doubtful one


@pytest.mark.parametrize("text,lang", [("हाँ", "hi"), ("हा", "hi"), ("है", "hi"), ("ਹਾਂ", "pa")])
def test_a_one_word_answer_in_an_indic_script_is_a_language(text, lang):
    assert detect_one(text).lang == lang


def test_short_latin_text_is_und_without_being_junk():
    from mmie.lid.detect import degeneracy

    result = detect_one("ok")
    assert result.lang == "und" and "too short" in result.reason
    assert not degeneracy("ok").is_degenerate


def test_casual_romanization_drops_the_final_inherent_vowel():
    assert casual_romanization("घर") == "ghar"
    assert casual_romanization("मैं घर जा रहा हूँ।") == "main ghar ja raha hun."
    assert casual_romanization("AM का") == "AM ka"


needs_data = pytest.mark.skipif(not (SHARED / "ntrex128").is_dir()
                                or not (SHARED / "ud-pud").is_dir(),
                                reason="../shared/data not present")


@needs_data
def test_out_of_sample_casual_romanized_hindi_is_found_and_english_is_not():
    scores = score_pools(ntrex_pools(SHARED, range(1000, 1300)))
    assert scores["ntrex hin, casual romanization"].recall >= 0.9
    assert scores["ntrex eng"].fp == 0


@needs_data
def test_out_of_sample_scholarly_transliteration_precision():
    scores = score_pools(pud_pools(SHARED), limit=300)
    assert scores["ud-pud eng"].fp == 0
    assert scores["all"].precision == 1.0
