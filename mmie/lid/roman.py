"""Romanized Hindustani in :mod:`mmie.lid.detect`: when Latin-script text is Hindi or Urdu written
in Latin letters, and what it is labelled.

**Label.** Casual romanized Hindi and romanized Urdu share their grammar words, spellings and
most everyday vocabulary ("Mera naam Ali hai aur main Lahore mein rehta hoon" is both), and no
detector mmie ships tells them apart (CLD3 knows ``hi-Latn`` but not ``ur-Latn``, so it calls
romanized Urdu ``hi-Latn`` too). Romanized Hindustani is therefore labelled
:data:`HINDUSTANI_LATN` (``hi-ur-Latn``), never ``hi-Latn``: the label names both languages it
may be. :func:`languages_of` reads it back, and `evaluate` counts it as the forget language on
forget prompts (conservative: ambiguous text is never forgetting success) and as neither
language's own text on the other's prompts.

**Rule** (Latin script only): the text is romanized Hindustani when

* CLD3 says ``hi-Latn`` with at least ``min_confidence``, or at least ``romanized_threshold``
  of its words are in :data:`mmie.lid.backends.ROMANIZED_HINDI` and no other language's mean
  vote reaches ``romanized_veto``; and
* fewer of its words are common English function words (:data:`ENGLISH_FUNCTION_WORDS`) than
  are common romanized-Hindustani words: "Par for the course, ya know" has two words that are
  also Hindustani ("par", "ya") but three English ones, and stays English.

The English list is the most frequent English function words, written from general knowledge
of English, not fitted to any test file; homographs with Hindustani ("main", "me", "to", "hi")
are in neither list. Out-of-sample precision and recall, on texts that were not looked at
while writing either list, are in docs/lid.md (``bench/lid_romanized.py`` recomputes them).
"""

from __future__ import annotations

HINDUSTANI_LATN = "hi-ur-Latn"
_LATN = "-Latn"

ENGLISH_FUNCTION_WORDS = frozenset("""
the a an of and or but if then than that this these those there here what which who whom whose
when where why how for with from into onto about above below over under after before between
through during without within against among around at by on off out up down is are was were
be been being am have has had having do does did doing will would shall should can could may
might must it its i you your yours he him his she her hers we our ours they them their
theirs my mine not no nor only own same so too very just also all any both each few more most
other some such again once know like get got make made go going say said one two
""".split())


def languages_of(label: str) -> frozenset[str]:
    """Languages a label may stand for: ``hi-ur-Latn`` -> {hi, ur}; ``hi-Latn`` -> {hi};
    ``en`` -> {en}."""
    return frozenset(label.removesuffix(_LATN).split("-"))


def covers(label: str, lang: str) -> bool:
    """Whether ``label`` may be text in ``lang`` (``hi-Latn`` is covered by ``hi-ur-Latn``;
    a romanized label never covers a native-script one, nor the reverse)."""
    if label == lang:
        return True
    if label.endswith(_LATN) != lang.endswith(_LATN):
        return False
    return lang.removesuffix(_LATN) in languages_of(label) and len(languages_of(lang)) == 1


def english_share(tokens: tuple[str, ...]) -> float:
    """Share of alphabetic word tokens that are common English function words."""
    words = [w for w in tokens if w.isalpha()]
    return sum(w in ENGLISH_FUNCTION_WORDS for w in words) / len(words) if words else 0.0


def romanized_decision(votes: dict, scores: dict[str, float], config,
                       tokens: tuple[str, ...]) -> tuple[str, float, str] | None:
    """``(HINDUSTANI_LATN, confidence, reason)`` when the rule above holds, else None."""
    cld3_lang, cld3_prob = votes.get("cld3", ("und", 0.0))
    share = votes["romanized"][1]
    by_cld3 = cld3_prob if cld3_lang == "hi-Latn" and cld3_prob >= config.min_confidence else 0.0
    # CLD3 alone is often sure of nonsense on short romanized Hindi ("ghar kab aaoge" is 0.999
    # Afrikaans), so only the backends' mean vote can veto the word list.
    vetoed = any(score >= config.romanized_veto for lang, score in scores.items()
                 if lang != "hi-Latn")
    by_list = share if share >= config.romanized_threshold and not vetoed else 0.0
    english = english_share(tokens)
    if (not by_cld3 and not by_list) or (english and english >= share):
        return None
    reasons = [f"CLD3 says hi-Latn ({by_cld3:.2f})"] * bool(by_cld3) + \
        [f"{share:.0%} of words are common romanized Hindustani"] * bool(by_list)
    reasons.append(f"{english:.0%} English function words; Hindi and Urdu not told apart")
    return HINDUSTANI_LATN, max(by_cld3, by_list), "; ".join(reasons)
