"""Tests for mmie.lid: junk is ``und``, clean sentences get the right code, configs validate."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from mmie.lid import backends as lid_backends
from mmie.lid.detect import (
    LidConfig,
    clear_cache,
    degeneracy,
    detect,
    detect_one,
    script_of,
    script_shares,
)

SAMPLE_DIR = Path(__file__).parents[1] / "data" / "sample"

DEGENERATE = [
    "<strong>-</strong><strong>-</strong><strong>-",
    "-\n-<strong><em>-</em></strong>\n-",
    "1234 5678 90 12",
    "!!!! ???? ....",
    "the the the the the the the the the the",
    "हा हा हा हा हा हा हा हा हा हा हा हा",
    "",
]

CLEAN = {
    "en": ["The weather is lovely today, so we went for a walk.",
           "She has been reading that book for three weeks.",
           "Please send me the report before Friday afternoon.",
           "My brother works at a hospital in the city.",
           "We should plant more trees in the park."],
    "hi": ["आज मौसम बहुत अच्छा है।",
           "मुझे कल सुबह जल्दी उठना है।",
           "वह हर दिन स्कूल पैदल जाती है।",
           "हमारे गाँव में एक बड़ा तालाब है।",
           "क्या आप मेरी मदद कर सकते हैं?"],
    "ur": ["آج موسم بہت اچھا ہے۔",
           "مجھے کل صبح جلدی اٹھنا ہے۔",
           "وہ ہر روز اسکول پیدل جاتی ہے۔",
           "ہمارے گاؤں میں ایک بڑا تالاب ہے۔",
           "کیا آپ میری مدد کر سکتے ہیں؟"],
    "pa": ["ਅੱਜ ਮੌਸਮ ਬਹੁਤ ਵਧੀਆ ਹੈ।",
           "ਮੈਨੂੰ ਕੱਲ੍ਹ ਸਵੇਰੇ ਜਲਦੀ ਉੱਠਣਾ ਹੈ।",
           "ਉਹ ਹਰ ਰੋਜ਼ ਸਕੂਲ ਪੈਦਲ ਜਾਂਦੀ ਹੈ।",
           "ਸਾਡੇ ਪਿੰਡ ਵਿੱਚ ਇੱਕ ਵੱਡਾ ਤਲਾਅ ਹੈ।",
           "ਕੀ ਤੁਸੀਂ ਮੇਰੀ ਮਦਦ ਕਰ ਸਕਦੇ ਹੋ?"],
    "bn": ["আজ আবহাওয়া খুব সুন্দর।",
           "আমাকে কাল সকালে তাড়াতাড়ি উঠতে হবে।",
           "সে প্রতিদিন হেঁটে স্কুলে যায়।",
           "আমাদের গ্রামে একটি বড় পুকুর আছে।",
           "আপনি কি আমাকে সাহায্য করতে পারবেন?"],
    "hi-ur-Latn": ["mujhe kal subah jaldi uthna hai kyunki meri train saat baje ki hai",
                "yaar tum kab aa rahe ho, hum sab wait kar rahe hain",
                "aaj mausam bahut accha hai",
                "kya aap meri madad kar sakte hain?",
                "mera bhai dilli mein kaam karta hai"],
}


@pytest.mark.parametrize("text", DEGENERATE)
def test_degenerate_text_is_und_with_a_reason(text):
    result = detect_one(text)
    assert result.lang == "und"
    assert result.reason
    assert result.confidence == 0.0
    assert degeneracy(text).is_degenerate


@pytest.fixture
def fake_backends(monkeypatch):
    """Replace the detectors; cached results from real ones must not leak in or out."""
    def install(cld3, fasttext):
        monkeypatch.setitem(lid_backends.BACKENDS, "cld3", lambda p: cld3)
        monkeypatch.setitem(lid_backends.BACKENDS, "fasttext", lambda p: fasttext)
        clear_cache()
    yield install
    clear_cache()


def test_markup_counts_as_nonletters():
    # 14 tag characters and 3 letters: the tags are stripped but still count against it.
    junk = degeneracy("<b>ab</b> <i>c</i>", LidConfig(min_letters=0))
    assert junk.nonletter_share == pytest.approx(1 - 3 / 17)
    assert junk.is_degenerate and "non-letter" in junk.reason


def test_urls_count_as_nonletters():
    result = detect_one("see https://www.example.com/a/b/c/d now")
    assert result.lang == "und" and "non-letter" in result.reason


def test_backend_names_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="already registered"):
        lid_backends.register("cld3")(lambda p: None)
    with pytest.raises(ValueError, match="taken"):
        lid_backends.register("romanized")(lambda p: None)


@pytest.mark.parametrize("lang,text", [(k, t) for k, ts in CLEAN.items() for t in ts])
def test_clean_sentences_get_their_language(lang, text):
    result = detect_one(text)
    assert result.lang == lang, result
    assert 0.0 < result.confidence <= 1.0
    assert not degeneracy(text).is_degenerate


@pytest.mark.parametrize("text", [
    "So what do you want to do then?",
    "The main reason is that we need to go to the store before it closes.",
    "Are you coming to the party tonight with your sister?",
])
def test_english_is_not_romanized_hindi(text):
    assert detect_one(text).lang == "en"


def test_code_mixed_hindi_in_two_scripts_is_hindi():
    result = detect_one("Flight cancel हो गई तो airline ने hotel का arrangement कर दिया")
    assert (result.lang, result.script) == ("hi", "Latn")
    assert result.reason.startswith("code-mixed")


def test_a_few_quoted_foreign_words_do_not_make_text_code_mixed():
    result = detect_one("The Hindi word for water is पानी and the word for bread is रोटी.")
    assert result.lang == "en"
    assert not result.reason.startswith("code-mixed")
    assert detect_one("The Hindi word for water is पानी.", LidConfig(mixed_min_share=0.1)).lang \
        == "hi"


def test_romanized_list_alone_can_decide_without_cld3():
    config = LidConfig(backends=("fasttext",))
    result = detect_one("mujhe kal subah jaldi uthna hai kyunki meri train saat baje ki hai",
                        config)
    assert result.lang == "hi-ur-Latn"
    assert "romanized Hindustani" in result.reason
    assert "cld3" not in result.votes


def test_script_contradicting_detectors_give_und(fake_backends):
    # Gurmukhi letters that both detectors call German: nothing plausible wins the vote.
    fake_backends(("de", 0.99), ("de", 0.99))
    result = detect_one("ਅੱਜ ਮੌਸਮ ਬਹੁਤ ਵਧੀਆ ਹੈ")
    assert result.lang == "und"
    assert "low confidence" in result.reason


def test_disagreeing_detectors_give_und(fake_backends):
    fake_backends(("fr", 0.95), ("de", 0.9))
    result = detect_one("quelque chose irgendwas")
    assert result.lang == "und"
    assert "disagree" in result.reason


def test_deva_detectors_can_outvote_the_hindi_prior(fake_backends):
    fake_backends(("mr", 0.95), ("mr", 0.9))
    result = detect_one("माझे नाव राहुल आहे")
    assert result.lang == "mr"
    assert result.votes["script"] == ("hi", 1.0)
    fake_backends(("mr", 0.6), ("hi", 0.7))
    assert detect_one("माझे नाव राहुल आहे").lang == "hi"


def test_result_votes_are_read_only_and_serialisable():
    result = detect_one("The weather is lovely today, so we went for a walk.")
    with pytest.raises(TypeError):
        result.votes["cld3"] = ("xx", 1.0)
    as_dict = json.loads(json.dumps(result.to_dict()))
    assert as_dict["lang"] == "en" and as_dict["votes"]["cld3"][0] == "en"


def test_script_of_and_shares():
    assert script_of("नमस्ते दुनिया") == "Deva"
    assert script_of("سلام دنیا") == "Arab"
    assert script_of("ਸਤ ਸ੍ਰੀ ਅਕਾਲ") == "Guru"
    assert script_of("নমস্কার") == "Beng"
    assert script_of("Café olé") == "Latn"
    assert script_of("Привет") == "Other"
    assert script_of("123 !?") == "None"
    shares = script_shares("abc दो")
    assert shares == pytest.approx({"Latn": 0.6, "Deva": 0.4})
    assert script_shares("") == {}


def test_degeneracy_numbers_on_hand_made_strings():
    # tokens a b a b c: bigrams ab ba ab bc -> 3 distinct of 4; "a b" occurs twice.
    junk = degeneracy("a b a b c", LidConfig(min_letters=0))
    assert junk.distinct_1 == pytest.approx(3 / 5)
    assert junk.distinct_2 == pytest.approx(3 / 4)
    assert junk.longest_repeat == 2
    assert junk.nonletter_share == 0.0
    assert not junk.is_degenerate and junk.reason == ""


def test_longest_repeat_counts_overlapping_spans_and_flags_loops():
    loop = "I went to the shop and then " * 3
    junk = degeneracy(loop, LidConfig(min_distinct_2=0.0))
    assert junk.longest_repeat == 14  # the loop repeats from token 7 on, overlapping itself
    assert junk.is_degenerate and "occurs twice" in junk.reason
    assert degeneracy("one two three four", LidConfig()).longest_repeat == 0


def _brute_longest_repeat(tokens: list[str]) -> int:
    spans = [tuple(tokens[i:i + n]) for n in range(1, len(tokens)) for i in
             range(len(tokens) - n + 1)]
    repeated = [len(span) for span in set(spans) if spans.count(span) > 1]
    return max(repeated, default=0)


def test_longest_repeat_matches_brute_force_on_random_token_strings():
    rng = random.Random(0)
    for _ in range(100):
        tokens = [rng.choice("xyz") for _ in range(rng.randint(0, 14))]
        got = degeneracy(" ".join(tokens), LidConfig(min_letters=0)).longest_repeat
        assert got == _brute_longest_repeat(tokens), tokens


def test_short_repetition_is_allowed_below_repetition_min_tokens():
    assert degeneracy("ha ha ha ha").is_degenerate
    assert not degeneracy("ha ha ha ha", LidConfig(repetition_min_tokens=5)).is_degenerate


@pytest.mark.parametrize("kwargs,field", [
    ({"backends": ("cld3", "nope")}, "backends"),
    ({"backends": ()}, "backends"),
    ({"backends": ("cld3", "cld3")}, "backends"),
    ({"min_letters": -1}, "min_letters"),
    ({"max_nonletter_share": 1.5}, "max_nonletter_share"),
    ({"min_confidence": -0.1}, "min_confidence"),
    ({"min_margin": 2.0}, "min_margin"),
    ({"romanized_threshold": 1.1}, "romanized_threshold"),
    ({"repetition_min_tokens": 1}, "repetition_min_tokens"),
    ({"max_repeat": 0}, "max_repeat"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LidConfig(**kwargs)


def test_config_accepts_a_list_of_backends_and_stays_hashable():
    config = LidConfig(backends=["cld3", "script"])
    assert config.backends == ("cld3", "script")
    assert hash(config) == hash(LidConfig(backends=("cld3", "script")))


def test_detect_refuses_a_bare_string_and_non_strings():
    with pytest.raises(TypeError, match="detect_one"):
        detect("hello there")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        detect(["fine", None])


def test_batch_of_a_thousand_is_fast():
    texts = [f"{t} {i}" for i in range(200) for t in (
        "The weather is lovely today", "आज मौसम बहुत अच्छा है", "آج موسم بہت اچھا ہے",
        "ਅੱਜ ਮੌਸਮ ਬਹੁਤ ਵਧੀਆ ਹੈ", "আজ আবহাওয়া খুব সুন্দর")]
    detect(texts[:1])  # model loading is not what we time
    clear_cache()
    # CPU time of this process, so that other jobs on a shared machine do not fail the test.
    start = time.process_time()
    results = detect(texts)
    assert time.process_time() - start < 2.0
    assert len(results) == 1000


def _read_sample(name: str) -> list[str]:
    path = SAMPLE_DIR / f"{name}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not written yet")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _accuracy(texts: list[str], lang: str) -> tuple[float, list[tuple[str, str]]]:
    labels = [r.lang for r in detect(texts)]
    misses = [(t[:60], got) for t, got in zip(texts, labels, strict=True) if got != lang]
    return 1 - len(misses) / len(texts), misses[:5]


@pytest.mark.parametrize("lang", ["en", "hi", "ur", "pa", "bn"])
def test_lid_accuracy_on_sample_set(lang):
    accuracy, misses = _accuracy(_read_sample(lang), lang)
    assert accuracy >= 0.95, f"{lang}: accuracy {accuracy:.3f}; e.g. {misses}"


def test_lid_accuracy_on_romanized_sample_set():
    # in-sample: the word list was written next to this file (out of sample: test_lid_roman)
    accuracy, misses = _accuracy(_read_sample("hi_latn"), "hi-ur-Latn")
    assert accuracy >= 0.80, f"hi-ur-Latn: accuracy {accuracy:.3f}; e.g. {misses}"


def test_fluent_text_that_loops_keeps_its_language_but_is_degenerate():
    from mmie.lid.detect import degeneracy, detect_one

    text = "भी लोग घर पर नहीं सो रहे हैं। बारिश के पानी के पानी के पानी के पानी के पानी के पानी"
    assert detect_one(text).lang == "hi"
    assert degeneracy(text).is_degenerate
    assert detect_one("पानी के पानी के पानी के पानी के पानी के पानी").lang == "und"
