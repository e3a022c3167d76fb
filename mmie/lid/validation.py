"""Out-of-sample check of romanized-Hindustani detection (:mod:`mmie.lid.roman`).

The word lists of the rule were written next to ``data/sample``; measured there they say little.
This scores the rule on text that was not looked at while writing them:

* positives: NTREX-128 Hindi news lines 1000-1996, turned into casual romanization by
  :func:`casual_romanization` (whose spelling rules were written on lines 0-999 only), and the
  UD Hindi-PUD scholarly transliteration (IAST-like, with diacritics);
* negatives: the English lines of both corpora (same rows).

Precision and recall of the ``hi-ur-Latn`` label (``hi-Latn`` counts too) over positives and
negatives pooled; both corpora live outside the project (``../shared/data``, see its README).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TUNING_ROWS = range(0, 1000)     # NTREX rows the romanizer's rules were written on
SCORING_ROWS = range(1000, 1997)  # NTREX rows that are scored

_DEVA = re.compile(r"[\u0900-\u097F]")
_CONSONANT_END = re.compile(r"[\u0915-\u0939\u0958-\u095F]$")


def casual_romanization(text: str) -> str:
    """Devanagari Hindi as it is typed in chats: OPTITRANS, lower case, anusvara as ``n``, no
    length marks, and the inherent vowel dropped after a word-final consonant (``घर`` ->
    ``ghar``, not ``ghara``). Words without Devanagari are kept as they are."""
    from indic_transliteration import sanscript

    def word(w: str) -> str:
        if not _DEVA.search(w):
            return w
        core = w.rstrip("।,.!?;:'\"’”)")
        tail = w[len(core):].replace("।", ".")
        out = sanscript.transliterate(core, sanscript.DEVANAGARI, sanscript.OPTITRANS)
        out = re.sub(r"[~^.]", "", out.replace("M", "n")).lower()
        if _CONSONANT_END.search(core) and out.endswith("a"):
            out = out[:-1]
        return out + tail

    return " ".join(word(w) for w in text.split())


@dataclass(frozen=True)
class Pool:
    """Texts of one source and whether they are romanized Hindustani."""

    name: str
    texts: tuple[str, ...]
    positive: bool


def ntrex_pools(root: Path, rows: range = SCORING_ROWS) -> list[Pool]:
    def lines(name: str) -> list[str]:
        all_lines = (root / "ntrex128" / name).read_text(encoding="utf-8").splitlines()
        return [all_lines[i].strip() for i in rows if i < len(all_lines) and all_lines[i].strip()]

    return [Pool("ntrex hin, casual romanization",
                 tuple(casual_romanization(t) for t in lines("hin.txt")), True),
            Pool("ntrex eng", tuple(lines("eng.txt")), False)]


def pud_pools(root: Path) -> list[Pool]:
    with (root / "ud-pud" / "hin_eng.tsv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [Pool("ud-pud hin_translit (IAST)", tuple(r["hin_translit"] for r in rows), True),
            Pool("ud-pud eng", tuple(r["eng"] for r in rows), False)]


@dataclass(frozen=True)
class Score:
    """Counts of the romanized-Hindustani label over pooled positives and negatives."""

    tp: int
    fn: int
    fp: int
    tn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")


def is_romanized_label(lang: str) -> bool:
    return lang in ("hi-Latn", "hi-ur-Latn")


def score_pools(pools: Sequence[Pool], limit: int | None = None) -> dict[str, Score]:
    """Per pool and ``all``: the label's counts (``limit`` texts per pool, for a quick run)."""
    from mmie.lid.detect import detect

    out, total = {}, [0, 0, 0, 0]
    for pool in pools:
        labels = [is_romanized_label(r.lang) for r in detect(list(pool.texts[:limit]))]
        hit, miss = sum(labels), len(labels) - sum(labels)
        counts = (hit, miss, 0, 0) if pool.positive else (0, 0, hit, miss)
        out[pool.name] = Score(*counts)
        total = [a + b for a, b in zip(total, counts, strict=True)]
    out["all"] = Score(*total)
    return out
