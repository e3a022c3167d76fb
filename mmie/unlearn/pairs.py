"""Alternatives and prompt-continuation rows, for objectives that score text after the forget
prompt (``redirect``, ``dpo``: :class:`mmie.unlearn.objectives.Needs` ``alternative`` and
``continuation``).

Every forget text ``x`` is cut on a word boundary into a prompt ``p`` (its first half,
:func:`mmie.core.data.split_prompt`) and the rest ``y``. An alternative row is ``p`` followed by
``" " + a`` (``a``: the alternative of ``x``); a continuation row is ``p`` followed by
``" " + y``. Both tokenize the prompt the same way (with the tokenizer's special tokens), so a
DPO pair shares its prompt tokens exactly, and both score only the tokens after the prompt
(``start``: the index of the first scored token). A prompt longer than half of ``max_length``
keeps its last tokens (after BOS), the part the continuation follows; the continuation is cut
at ``max_length``.

Alternatives: ``--alternative FILE``, line-aligned with ``--forget`` (the same number of lines; a
line empty in either file drops that pair). Without it the fallback is the texts of the **first
retain set**, cycled to the forget set's length: list the language that should replace the
forgotten one (English) first. They are not translations of the forget texts, only fluent text
of the wanted language after each forget prompt. Either way the artifact's config records the
source, the count and the sha256 of the texts used, and of the file (``alternative_inputs``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmie.core.artifacts import sha256_file
from mmie.core.data import TextSource, read_raw, split_prompt
from mmie.core.errors import DataError
from mmie.core.models import LoadedModel
from mmie.unlearn.data import encode
from mmie.unlearn.objectives import Needs

FALLBACK = "first-retain-set"


@dataclass(frozen=True)
class Alternatives:
    texts: list[str]  # one per forget text, in order
    record: dict      # source, path, n, sha256 of the texts: for the manifest


def read_aligned(forget: str, alternative: str, field: str,
                 limit: int | None) -> tuple[list[str], list[str]]:
    """Forget texts and their alternatives, line by line; a length mismatch is a DataError."""
    left, right = read_raw(TextSource(forget, field)), read_raw(TextSource(alternative, field))
    if len(left) != len(right):
        raise DataError(f"--alternative {alternative} has {len(right)} lines but --forget "
                        f"{forget} has {len(left)}; they must be line-aligned (one "
                        "alternative per forget text)")
    rows = [(f.strip(), a.strip()) for f, a in zip(left, right, strict=True)
            if f.strip() and a.strip()]
    if not rows:
        raise DataError(f"no line is non-empty in both {forget} and {alternative}")
    rows = rows[:limit] if limit else rows
    return [f for f, _ in rows], [a for _, a in rows]


def texts_sha256(texts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


def choose(given: list[str] | None, path: str | None, retain: list[list[str]],
           n_forget: int) -> Alternatives:
    """The file's alternatives, or the documented fallback (module docstring)."""
    if given is not None:
        digest = sha256_file(Path(path)) if Path(path).is_file() else None  # None: a dataset
        texts, source = given, {"source": "file", "path": path, "file_sha256": digest}
    else:
        first = retain[0]
        texts = [first[i % len(first)] for i in range(n_forget)]
        source = {"source": FALLBACK, "path": None}
    return Alternatives(texts, {**source, "n": len(texts), "sha256": texts_sha256(texts)})


def continuation_row(lm: LoadedModel, prompt: str, continuation: str,
                     max_length: int) -> tuple[list[int], int] | None:
    """``(ids, start)`` of the prompt followed by the continuation, or None when nothing of the
    continuation fits (or there is none)."""
    if not continuation:
        return None
    head = lm.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    cap = max(1, max_length // 2)
    if len(head) > cap:
        bos = lm.tokenizer.bos_token_id
        keep = head[:1] if bos is not None and head[0] == bos else []
        head = keep + head[len(head) - (cap - len(keep)):]
    tail = lm.tokenizer(" " + continuation, add_special_tokens=False)["input_ids"]
    ids = (list(head) + list(tail))[:max_length]
    return (ids, len(head)) if head and len(ids) > len(head) else None


@dataclass
class Rows:
    """Token rows of the forget texts kept for training, and what goes with each."""

    forget: list[list[int]]
    forget_starts: list[int] | None = None   # None: the whole text is scored
    alternative: list[list[int]] | None = None
    alternative_starts: list[int] | None = None
    dropped: int = 0  # forget texts left out (nothing to score)

    def starts(self, which: Sequence[int]) -> list[int] | None:
        return None if self.forget_starts is None else [self.forget_starts[i] for i in which]


def build_rows(lm: LoadedModel, texts: list[str], alternatives: list[str] | None, needs: Needs,
               max_length: int, what: str) -> Rows:
    """The rows ``needs`` asks for, keeping a forget text only when every one of its rows has
    a token to score (so alternatives stay aligned with their forget texts)."""
    cut = [split_prompt(t) for t in texts]
    if needs.continuation:
        forget = [continuation_row(lm, p, rest, max_length) for p, rest in cut]
    else:
        forget = [(row, 1) if len(row) >= 2 else None for row in encode(lm, texts, max_length)]
    alt = [continuation_row(lm, p, a, max_length)
           for (p, _), a in zip(cut, alternatives, strict=True)] if needs.alternative else None
    keep = [i for i, row in enumerate(forget) if row and (alt is None or alt[i])]
    if not keep:
        raise DataError(f"{what}: no text gives a row with a token to score; nothing to train on")
    return Rows([forget[i][0] for i in keep],
                [forget[i][1] for i in keep] if needs.continuation else None,
                None if alt is None else [alt[i][0] for i in keep],
                None if alt is None else [alt[i][1] for i in keep], len(texts) - len(keep))
