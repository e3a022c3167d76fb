"""`mmie data check`: what is in a text file before a run spends time on it."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmie.core.data import TextSource, read_raw


@dataclass(frozen=True)
class CheckConfig:
    """Settings of `mmie data check`.

    files: the files to check.
    field: JSON field / table column holding the text.
    model: when set, token-length statistics use this model's tokenizer.
    max_length: token budget whose truncation share is reported (with ``model``).
    lid: run language ID over every text (slower on large files).
    """

    files: tuple[str, ...]
    field: str = "text"
    model: str | None = None
    max_length: int = 128
    lid: bool = True

    def __post_init__(self) -> None:
        if not self.files:
            raise ValueError("no files to check")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")


def _shares(counter: Counter, total: int) -> dict[str, float]:
    return {k: round(v / total, 4) for k, v in counter.most_common()} if total else {}


def _script_mix(texts: Sequence[str]) -> dict[str, float]:
    from mmie.lid.detect import script_of

    return _shares(Counter(script_of(t) for t in texts), len(texts))


def _lid_mix(texts: Sequence[str]) -> dict[str, float]:
    from mmie.lid.detect import detect

    return _shares(Counter(r.lang for r in detect(texts)), len(texts))


def _token_stats(texts: Sequence[str], tokenizer, max_length: int) -> dict:
    lengths = [len(ids) for ids in tokenizer(list(texts))["input_ids"]]
    ordered = sorted(lengths)
    return {"tokens_mean": round(statistics.fmean(lengths), 2),
            "tokens_median": ordered[len(ordered) // 2],
            "tokens_max": ordered[-1], "truncated_share": round(
                sum(n > max_length for n in lengths) / len(lengths), 4)}


def check_file(path: str, config: CheckConfig, tokenizer=None) -> dict:
    raw = read_raw(TextSource(path, config.field))
    texts = [t.strip() for t in raw if t.strip()]
    dupes = sum(c - 1 for c in Counter(texts).values() if c > 1)
    report = {"file": path, "lines": len(raw), "texts": len(texts),
              "empty": len(raw) - len(texts), "duplicates": dupes}
    if texts:
        report["scripts"] = _script_mix(texts)
        if config.lid:
            report["languages"] = _lid_mix(texts)
        if tokenizer is not None:
            report.update(_token_stats(texts, tokenizer, config.max_length))
    return report


def _overlaps(config: CheckConfig) -> list[dict]:
    # a list, not a dict keyed by path: the same file given twice overlaps itself entirely
    sets = [(p, {t.strip() for t in read_raw(TextSource(p, config.field)) if t.strip()})
            for p in config.files]
    return [{"a": a, "b": b, "shared": len(x & y)}
            for i, (a, x) in enumerate(sets) for b, y in sets[i + 1:]]


def problems(report: dict) -> list[str]:
    """What makes a file unusable by every stage (they refuse a set with no text)."""
    return [f"{f['file']}: no non-empty texts ({f['lines']} lines)"
            for f in report["files"] if not f["texts"]]


def run(config: CheckConfig) -> dict:
    """Per-file statistics and pairwise overlaps (texts present in both files)."""
    tokenizer = None
    if config.model:
        from mmie.core.models import ModelSpec, loaded

        with loaded(ModelSpec(name=config.model, device="cpu")) as lm:
            tokenizer = lm.tokenizer
    files = [check_file(str(Path(p)), config, tokenizer) for p in config.files]
    return {"files": files, "overlap": _overlaps(config)}
