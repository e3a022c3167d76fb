"""Reading text sets: JSONL, plain text, TSV/CSV and HF datasets, validated before any model loads.

Errors name the file and line. An empty set (also after a filter) is an error, so no stage ever
loops on an empty iterator or reports a metric over nothing.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmie.core.errors import DataError

csv.field_size_limit(1 << 24)


@dataclass(frozen=True)
class TextSource:
    """One text set on disk.

    path: .jsonl/.json-lines, .txt, .tsv, .csv file, or a HF dataset folder / name.
    field: JSON field (JSONL) or column (TSV/CSV, HF) holding the text.
    """

    path: str
    field: str = "text"

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("empty data path")
        if not self.field:
            raise ValueError("empty text field name")


def _decode_lines(path: Path) -> list[str]:
    # a UTF-8 byte-order mark (as some Windows editors write) is no text: dropped, not refused
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    lines = raw.split(b"\n")
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid UTF-8 ({exc.reason} at byte "
                            f"{exc.start})") from exc
    if out and out[-1] == "":
        out.pop()
    return out


def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    for number, line in enumerate(_decode_lines(path), start=1):
        if not line.strip():
            texts.append("")  # kept as an empty record, so counts and line alignment hold
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or field not in record:
            raise DataError(f"{path}:{number}: no field '{field}' (use --field to choose)")
        if not isinstance(record[field], str):
            raise DataError(f"{path}:{number}: field '{field}' is not a string")
        texts.append(record[field])
    return texts


def _read_txt(path: Path, field: str) -> list[str]:
    del field
    return _decode_lines(path)


def _read_table(path: Path, field: str) -> list[str]:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    rows = csv.DictReader(_decode_lines(path), delimiter=delimiter)
    if rows.fieldnames is None or field not in rows.fieldnames:
        raise DataError(f"{path}: no column '{field}' (columns: "
                        f"{', '.join(rows.fieldnames or [])}); use --field to choose")
    return [row[field] or "" for row in rows]


def _read_hf(path: Path, field: str) -> list[str]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError("reading HF datasets needs the 'datasets' package") from exc
    try:
        data = (datasets.load_from_disk(str(path)) if path.exists()
                else datasets.load_dataset(str(path), split="train"))
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        raise DataError(f"cannot load HF dataset '{path}': {exc}") from exc
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    if field not in data.column_names:
        raise DataError(f"HF dataset '{path}': no column '{field}' "
                        f"(columns: {', '.join(data.column_names)})")
    return list(data[field])


READERS: dict[str, Callable[[Path, str], list[str]]] = {
    ".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".txt": _read_txt, ".text": _read_txt,
    ".tsv": _read_table, ".csv": _read_table,
}


def read_raw(source: TextSource) -> list[str]:
    """Every line/record of a source, empty ones included (line alignment is kept)."""
    path = Path(source.path).expanduser()
    reader = READERS.get(path.suffix.lower())
    if reader is not None:
        if path.is_dir():
            raise DataError(f"{path} is a folder, not a {path.suffix} file")
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        return reader(path, source.field)
    if path.is_dir() or (not path.exists() and "/" in source.path):
        return _read_hf(path, source.field)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    raise DataError(f"{path}: unknown format '{path.suffix}' (use .jsonl, .txt, .tsv or .csv)")


def read_texts(path: str | Path, field: str = "text", limit: int | None = None) -> list[str]:
    """Non-empty texts of a file, stripped, at most ``limit``; an empty set is an error."""
    texts = [t.strip() for t in read_raw(TextSource(str(path), field)) if t.strip()]
    if not texts:
        raise DataError(f"{path}: no non-empty texts")
    return texts[:limit] if limit else texts


def pack_texts(texts: Sequence[str], k: int) -> list[str]:
    """Each run of ``k`` consecutive texts joined by a newline (a sliding window: ``n - k + 1``
    texts; all of them joined when there are fewer than ``k``); ``k = 1`` returns the texts."""
    if k < 1:
        raise ValueError(f"pack must be >= 1, got {k}")
    if k == 1:
        return list(texts)
    if len(texts) <= k:
        return ["\n".join(texts)]
    return ["\n".join(texts[i:i + k]) for i in range(len(texts) - k + 1)]


def read_parallel(paths: Sequence[str | Path], field: str = "text",
                  limit: int | None = None) -> list[tuple[str, ...]]:
    """Line-aligned files read together; a line empty in any file drops the whole row."""
    columns = [read_raw(TextSource(str(p), field)) for p in paths]
    lengths = {len(c) for c in columns}
    if len(lengths) != 1:
        counts = ", ".join(f"{p}: {len(c)}" for p, c in zip(paths, columns))
        raise DataError(f"files are not line-aligned (different lengths: {counts})")
    rows = [tuple(t.strip() for t in row) for row in zip(*columns) if all(t.strip() for t in row)]
    if not rows:
        raise DataError(f"no row is non-empty in all of: {', '.join(map(str, paths))}")
    return rows[:limit] if limit else rows


def filter_texts(texts: Sequence[str], keep: Callable[[str], bool], source: str,
                 description: str) -> list[str]:
    """Apply a filter; an empty result is an error naming the file, filter and counts."""
    kept = [t for t in texts if keep(t)]
    if not kept:
        raise DataError(f"{source}: 0 of {len(texts)} texts left after filter '{description}'")
    return kept


def sample(texts: Sequence[str], n: int | None, seed: int) -> list[str]:
    """A seeded subset of at most ``n`` texts, in their original order."""
    if n is None or n >= len(texts):
        return list(texts)
    keep = sorted(random.Random(seed).sample(range(len(texts)), n))
    return [texts[i] for i in keep]


def split_prompt(text: str, frac: float = 0.5, min_words: int = 2) -> tuple[str, str]:
    """Split a sentence on a word boundary into (prompt, reference continuation)."""
    words = text.split()
    if len(words) <= min_words:
        return text, ""
    cut = min(max(min_words, round(len(words) * frac)), len(words) - 1)
    return " ".join(words[:cut]), " ".join(words[cut:])


def batched(items: Sequence, size: int):
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]


def text_hash(text: str) -> str:
    """Content hash of one text, NFC-normalised with whitespace runs collapsed (a re-wrapped or
    re-encoded copy is the same text): how held-out, validation and attack texts are checked
    against the texts a model was trained or evaluated on."""
    import hashlib
    import unicodedata

    canonical = " ".join(unicodedata.normalize("NFC", text).split())
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
