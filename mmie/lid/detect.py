"""Language identification that says ``und`` for text that is not language.

``detect(texts)`` labels each text with an ISO 639-1 code (``hi``, ``en``, ``ur``, ``pa``,
``bn``, ...; detectors' 639-3 codes where no 639-1 code exists), ``hi-ur-Latn`` for romanized
Hindustani (Hindi or Urdu: :mod:`mmie.lid.roman`), or ``und``. Evaluation counts generations
by these labels, so a wrong language is worse than an honest ``und``: CLD3 alone calls
``<strong>-</strong><strong>-`` English.

The rule, in order:

1. **Not language**: HTML tags, entities and URLs are stripped and counted as non-letters.
   The text is ``und`` when it is empty, has fewer than ``min_letters`` letters, its non-space
   characters are mostly non-letters (``max_nonletter_share``), or it is heavy repetition with
   little distinct content: fewer than ``min_unique_tokens`` distinct tokens, or token
   distinct-1 below ``min_distinct_1`` (for texts of at least ``repetition_min_tokens`` tokens).
   Milder repetition (a fluent clause that then loops) keeps its language: the model still
   writes that language, and :func:`degeneracy` reports the loop separately, with the stricter
   distinct-2 and repeated-span tests. Detectors see the text with repeats collapsed.
2. **Script**: the dominant Unicode script of the letters (:func:`script_of`) picks a
   :class:`~mmie.lid.backends.ScriptRule`. Code-mixing: when Latin dominates but at least
   ``mixed_min_share`` of the words are Devanagari, Arabic, Gurmukhi or Bengali, the Latin
   words are taken for loans, and the rule and the backends work on the other script's words
   alone (``result.script`` still reports the dominant script).
3. **Romanized Hindustani** (Latin script only): ``hi-ur-Latn`` by the rule of
   :mod:`mmie.lid.roman` (CLD3's ``hi-Latn`` or a list of common romanized words, unless
   English function words are as frequent or another language's mean vote reaches
   ``romanized_veto``).
4. **Vote**: each backend (CLD3, fastText and the script analysis, which votes Guru -> pa,
   Beng -> bn, Deva -> hi with the script's letter share and abstains for Latin and Arabic)
   gives ``(lang, prob)``; a language's score is the mean of its probabilities over the backends
   that voted. Only languages written in the script can win, so Gurmukhi text is ``pa`` when the
   detectors agree or are unsure, Devanagari is ``mr``/``ne`` only when the detectors outvote
   the script's ``hi``, and Arabic-script ``ur`` vs ``fa``/``ar`` is the detectors' call. A
   winner scoring below ``min_confidence`` (detectors disagreeing, or confidently naming a
   language the script cannot carry) gives ``und``, and so does a winner within ``min_margin``
   of the runner-up.

Results are cached per (text, config) in a bounded LRU; the detector models load once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from mmie.core import profile
from mmie.lid.backends import (
    BACKENDS,
    ROMANIZED,
    SCRIPT_RULES,
    Prepared,
    Vote,
    code_mixed_focus,
    prepare,
    romanized_share,
    script_of,
    script_shares,
)
from mmie.lid.roman import romanized_decision

__all__ = ["Degeneracy", "LidConfig", "LidResult", "clear_cache", "degeneracy", "detect",
           "detect_one", "script_of", "script_shares"]

UND = "und"
_CACHE_SIZE = 16384


def _check_share(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"LidConfig.{name} must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class LidConfig:
    """How :func:`detect` and :func:`degeneracy` decide.

    Attributes:
        backends: registered backends that vote (see ``mmie.lid.backends.BACKENDS``).
        min_letters: fewer letters (combining marks included) than this is ``und`` (and
            degenerate). 1: a one-word answer ("हाँ") is language.
        min_letters_vote: text shorter than this in a script without a prior language
            (Latin, Arabic) is ``und`` but not degenerate: detectors guess at random on "ok".
        max_nonletter_share: above this share of non-letters among non-space characters
            (markup counted as non-letters) the text is ``und``.
        min_distinct_2: below this ratio of distinct to total token bigrams the text is
            repetitive.
        repetition_min_tokens: texts with fewer tokens skip the distinct-2 test ("ha ha").
        max_repeat: a span of this many tokens occurring twice (overlaps allowed) is
            repetitive when it is also at least ``max_repeat_share`` of the text's tokens:
            fluent model output often repeats a clause once, which is not junk.
        max_repeat_share: see ``max_repeat``.
        min_unique_tokens: language ID needs at least this many distinct tokens in a text of
            ``repetition_min_tokens`` or more ("the the the" is ``und``).
        min_distinct_1: below this ratio of distinct to total tokens the text is ``und``.
        min_confidence: the winning language needs at least this mean vote; else ``und``.
        min_margin: the winner must beat the runner-up by this much; else ``und``.
        mixed_min_share: Latin-script text with at least this share of its words in Deva,
            Arab, Guru or Beng is code-mixed, and the backends see only those words.
        romanized_threshold: share of words in the romanized-Hindi list that makes Latin
            text ``hi-ur-Latn``.
        romanized_veto: a mean vote for another language at or above this overrides the
            romanized-Hindi list (Spanish "ya se fue" is not Hindi).
    """

    backends: tuple[str, ...] = ("cld3", "fasttext", "script")
    min_letters: int = 1
    min_letters_vote: int = 3
    max_nonletter_share: float = 0.5
    min_distinct_2: float = 0.5
    repetition_min_tokens: int = 4
    max_repeat: int = 8
    max_repeat_share: float = 0.4
    min_unique_tokens: int = 3
    min_distinct_1: float = 0.2
    min_confidence: float = 0.35
    min_margin: float = 0.1
    mixed_min_share: float = 0.25
    romanized_threshold: float = 0.3
    romanized_veto: float = 0.8

    def __post_init__(self) -> None:
        object.__setattr__(self, "backends", tuple(self.backends))
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends or len(set(self.backends)) != len(self.backends):
            raise ValueError(f"LidConfig.backends must be distinct names from "
                             f"{sorted(BACKENDS)}, got {self.backends!r}")
        for name in ("max_nonletter_share", "max_repeat_share", "min_distinct_2",
                     "min_distinct_1", "min_confidence", "min_margin", "mixed_min_share",
                     "romanized_threshold",
                     "romanized_veto"):
            _check_share(name, getattr(self, name))
        for name in ("min_letters", "min_letters_vote"):
            if getattr(self, name) < 0:
                raise ValueError(f"LidConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.min_unique_tokens < 1:
            raise ValueError(f"LidConfig.min_unique_tokens must be >= 1, got "
                             f"{self.min_unique_tokens}")
        if self.repetition_min_tokens < 2:
            raise ValueError("LidConfig.repetition_min_tokens must be >= 2 (a bigram needs "
                             f"two tokens), got {self.repetition_min_tokens}")
        if self.max_repeat < 1:
            raise ValueError(f"LidConfig.max_repeat must be >= 1, got {self.max_repeat}")


@dataclass(frozen=True)
class Degeneracy:
    """How much a text looks like junk rather than language.

    Attributes:
        nonletter_share: non-letters among non-space characters, markup included (1.0 when
            the text has no non-space characters).
        distinct_1: distinct tokens / tokens (1.0 for no tokens: nothing repeats).
        distinct_2: distinct token bigrams / bigrams (1.0 for fewer than two tokens).
        longest_repeat: length in tokens of the longest span occurring at least twice.
        is_degenerate: whether any test in :class:`LidConfig` fired.
        reason: the first test that fired, or ``""``.
    """

    nonletter_share: float
    distinct_1: float
    distinct_2: float
    longest_repeat: int
    is_degenerate: bool
    reason: str


@dataclass(frozen=True)
class LidResult:
    """One text's language.

    Attributes:
        lang: ISO 639-1 code, ``hi-ur-Latn`` or ``und``.
        script: dominant script of the letters (Deva, Arab, Guru, Beng, Latn, Other, None).
        confidence: the winning mean vote in [0, 1]; 0.0 for degenerate text.
        votes: backend name -> (lang, prob) for the backends that voted, plus ``romanized``
            -> ("hi-Latn", share of romanized-Hindi words) for Latin text. Read-only.
        reason: why the text is ``und`` or how the language was decided.
    """

    lang: str
    script: str
    confidence: float
    votes: Mapping[str, Vote]
    reason: str

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (votes as lists)."""
        return {"lang": self.lang, "script": self.script, "confidence": self.confidence,
                "votes": {k: list(v) for k, v in self.votes.items()}, "reason": self.reason}


def _distinct(tokens: tuple[str, ...], n: int) -> float:
    grams = [tokens[i:i + n] for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


_HASH_MOD = (1 << 61) - 1
_HASH_BASE = 1_000_003


def _repeats(ids: list[int], n: int) -> bool:
    """Whether some span of ``n`` tokens occurs twice; a rolling hash keeps it O(len)."""
    drop = pow(_HASH_BASE, n, _HASH_MOD)
    starts: dict[int, list[int]] = {}
    h = 0
    for i, token in enumerate(ids):
        h = (h * _HASH_BASE + token - (ids[i - n] * drop if i >= n else 0)) % _HASH_MOD
        start = i - n + 1
        if start < 0:
            continue
        # Equal hashes are compared span by span, so a collision cannot invent a repeat.
        if any(ids[j:j + n] == ids[start:i + 1] for j in starts.get(h, ())):
            return True
        starts.setdefault(h, []).append(start)
    return False


def _longest_repeat(tokens: tuple[str, ...]) -> int:
    index = {t: k for k, t in enumerate(dict.fromkeys(tokens))}
    ids = [index[t] for t in tokens]
    # A repeated span of length n contains repeated spans of every shorter length, so the
    # predicate is monotone and binary search finds the longest.
    lo, hi = 0, max(0, len(tokens) - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _repeats(ids, mid) else (lo, mid - 1)
    return lo


def _nonletter_share(prepared: Prepared) -> float:
    visible = sum(1 for ch in prepared.clean if not ch.isspace()) + prepared.markup_chars
    return 1.0 - prepared.letters / visible if visible else 1.0


_JunkCheck = Callable[[Prepared, Degeneracy, LidConfig], "str | None"]


def _empty(p: Prepared, d: Degeneracy, c: LidConfig) -> str | None:
    return "empty text" if not p.clean and not p.markup_chars else None


def _few_letters(p: Prepared, d: Degeneracy, c: LidConfig) -> str | None:
    return f"{p.letters} letters < min_letters {c.min_letters}" if p.letters < c.min_letters \
        else None


def _mostly_nonletters(p: Prepared, d: Degeneracy, c: LidConfig) -> str | None:
    if d.nonletter_share > c.max_nonletter_share:
        return (f"non-letter share {d.nonletter_share:.2f} > max_nonletter_share "
                f"{c.max_nonletter_share} (markup, digits, punctuation)")
    return None


def _low_distinct(p: Prepared, d: Degeneracy, c: LidConfig) -> str | None:
    if len(p.tokens) >= c.repetition_min_tokens and d.distinct_2 < c.min_distinct_2:
        return f"repetitive: distinct-2 {d.distinct_2:.2f} < min_distinct_2 {c.min_distinct_2}"
    return None


def _long_repeat(p: Prepared, d: Degeneracy, c: LidConfig) -> str | None:
    share = d.longest_repeat / max(1, len(p.tokens))
    if d.longest_repeat >= c.max_repeat and share >= c.max_repeat_share:
        return f"repetitive: a {d.longest_repeat}-token span occurs twice (max_repeat " \
               f"{c.max_repeat}, {share:.0%} of the text)"
    return None


def _few_unique(p: Prepared, d: Degeneracy, c: LidConfig) -> str | None:
    if len(p.tokens) < c.repetition_min_tokens:
        return None
    unique = len(set(p.tokens))
    if unique < c.min_unique_tokens:
        return f"repetitive: {unique} distinct tokens < min_unique_tokens {c.min_unique_tokens}"
    if d.distinct_1 < c.min_distinct_1:
        return f"repetitive: distinct-1 {d.distinct_1:.2f} < min_distinct_1 {c.min_distinct_1}"
    return None


# What makes text "not language" (``und``), and the stricter set that makes it degenerate.
_NOT_LANGUAGE: tuple[_JunkCheck, ...] = (_empty, _few_letters, _mostly_nonletters, _few_unique)
_CHECKS: tuple[_JunkCheck, ...] = (*_NOT_LANGUAGE, _low_distinct, _long_repeat)


def _degeneracy(prepared: Prepared, config: LidConfig,
                checks: tuple[_JunkCheck, ...] = _CHECKS) -> Degeneracy:
    tokens = prepared.tokens
    stats = Degeneracy(_nonletter_share(prepared), _distinct(tokens, 1), _distinct(tokens, 2),
                       _longest_repeat(tokens), False, "")
    for check in checks:
        reason = check(prepared, stats, config)
        if reason:
            return Degeneracy(stats.nonletter_share, stats.distinct_1, stats.distinct_2,
                              stats.longest_repeat, True, reason)
    return stats


def degeneracy(text: str, config: LidConfig = LidConfig()) -> Degeneracy:
    """Junk measures of ``text`` and whether ``config`` calls it degenerate."""
    return _degeneracy(prepare(text), config)


_Decision = tuple[str, float, str]


_ScriptCheck = Callable[[dict[str, Vote], dict[str, float], LidConfig, tuple[str, ...]],
                        "_Decision | None"]

# Script-specific decisions taken before the vote.
_SCRIPT_CHECKS: dict[str, _ScriptCheck] = {"Latn": romanized_decision}


def _scores(script: str, votes: dict[str, Vote], config: LidConfig) -> dict[str, float]:
    """Mean vote per language written in ``script``, over the backends that voted."""
    voted = [votes[b] for b in config.backends if b in votes]
    langs = SCRIPT_RULES[script].langs
    scores: dict[str, float] = {}
    for lang, prob in voted:
        if langs is None or lang in langs:
            scores[lang] = scores.get(lang, 0.0) + prob / len(voted)
    return scores


def _vote(script: str, scores: dict[str, float], config: LidConfig) -> _Decision:
    if not scores:
        return UND, 0.0, f"no backend names a language written in {script}"
    ranked = sorted(scores, key=scores.__getitem__, reverse=True)
    lang, best = ranked[0], scores[ranked[0]]
    if best < config.min_confidence:
        return UND, best, (f"low confidence: best is {lang} at {best:.2f} < "
                           f"min_confidence {config.min_confidence}")
    runner_up = scores[ranked[1]] if len(ranked) > 1 else 0.0
    if best - runner_up < config.min_margin:
        return UND, best, (f"backends disagree: {lang} {best:.2f} vs {ranked[1]} "
                           f"{runner_up:.2f} (min_margin {config.min_margin})")
    return lang, best, f"{script} text; {lang} wins the vote at {best:.2f}"


def _collect_votes(prepared: Prepared, config: LidConfig) -> dict[str, Vote]:
    votes = {}
    for name in config.backends:
        vote = BACKENDS[name](prepared)
        if vote is not None:
            votes[name] = vote
    if prepared.script == "Latn":
        votes[ROMANIZED] = ("hi-Latn", romanized_share(prepared))
    return votes


def _collapse_repeats(tokens: tuple[str, ...]) -> str:
    """The text with each token kept once, in order: loops no longer sway the detectors."""
    return " ".join(dict.fromkeys(tokens))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _detect_cached(text: str, config: LidConfig) -> LidResult:
    prepared = prepare(text)
    junk = _degeneracy(prepared, config, _NOT_LANGUAGE)
    if junk.is_degenerate:
        return LidResult(UND, prepared.script, 0.0, MappingProxyType({}), junk.reason)
    if _degeneracy(prepared, config).is_degenerate:  # a loop: let detectors see it once
        prepared = prepare(_collapse_repeats(prepared.tokens))
    focus = code_mixed_focus(prepared, config.mixed_min_share)
    target, note = (focus[0], f"code-mixed, {focus[2]:.0%} of words in {focus[1]}: ") \
        if focus else (prepared, "")
    if target.letters < config.min_letters_vote and SCRIPT_RULES[target.script].prior is None:
        return LidResult(UND, prepared.script, 0.0, MappingProxyType({}),
                         f"{target.letters} letters of {target.script} text: too short to tell")
    votes = _collect_votes(target, config)
    scores = _scores(target.script, votes, config)
    check = _SCRIPT_CHECKS.get(target.script)
    decision = check(votes, scores, config, target.tokens) if check else None
    lang, confidence, reason = decision or _vote(target.script, scores, config)
    return LidResult(lang, prepared.script, round(min(1.0, confidence), 4),
                     MappingProxyType(votes), note + reason)


@profile.phase("lid")
def detect(texts: Sequence[str], config: LidConfig = LidConfig()) -> list[LidResult]:
    """Language of each text (see the module docstring for the rule)."""
    if isinstance(texts, str):
        raise TypeError("detect() takes a sequence of texts; use detect_one() for one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
    return [_detect_cached(text, config) for text in texts]


def detect_one(text: str, config: LidConfig = LidConfig()) -> LidResult:
    """Language of one text."""
    return detect([text], config)[0]


def clear_cache() -> None:
    """Forget cached results (after registering or replacing a backend)."""
    _detect_cached.cache_clear()
