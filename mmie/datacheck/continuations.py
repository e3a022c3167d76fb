"""`mmie data continue`: retain texts on the model's own continuations ("on-policy").

Single-sentence retain texts never show the retain loss what the model writes after a
sentence ends: a redirect-trained LoRA kept Bengali's teacher-forced mass but switched Bengali
answers to English there. KL to the frozen model on the base model's own continuations of
protected-language prompts puts those positions under the retain loss: measured on the default
model, Bengali answers kept 52 of 57 (28 of 57 with single sentences), Punjabi 54 of 58.

Each input text is cut as evaluate and unlearn cut prompts (:func:`mmie.core.data.split_prompt`)
and its prompt continued greedily; a line is kept when its continuation is in ``lang`` and not
degenerate, labelled as evaluate labels generations (:mod:`mmie.metrics.definitions`). Written:
``out`` (jsonl, ``{"text": prompt + " " + continuation}``) and ``<out>.json`` (what made it).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mmie.core.artifacts import sha256_file
from mmie.core.data import read_texts, split_prompt
from mmie.core.errors import DataError
from mmie.core.generation import EVAL_REPETITION_PENALTY, GenerationSettings, generate
from mmie.core.head_precision import HEAD_DTYPES, head_precision
from mmie.core.models import ModelSpec, loaded
from mmie.core.progress import SILENT, Progress
from mmie.metrics.definitions import DEGENERATE, is_own, label_of

OTHER_LANGUAGE = "other_language"


@dataclass(frozen=True)
class ContinueConfig:
    """Settings of `mmie data continue`.

    input: text file whose texts are cut into prompts.
    lang: the language a continuation must be in to be kept (a LID label, e.g. ``bn``).
    model: the model that continues the prompts (its greedy continuations).
    max_new_tokens: new tokens per prompt (48, as evaluate generates).
    repetition_penalty: 1.2, as evaluate generates: without it the default model's greedy
        continuations loop (measured: 108 of 130 Bengali ones degenerate at 1.0).
    head_dtype: ``fp32`` or ``bf16``: LM-head matmul precision while generating
        (:mod:`mmie.core.head_precision`; greedy continuations are the fp32 ones).
    batch_size: prompts per generate call.
    max_samples: continue only the first N texts (None: all).
    field: JSON field or column holding the text.
    keep_all: keep every continuation, whatever its language or form (smoke runs on tiny
        random-weight models, whose output no language ID recognises).
    """

    input: str
    lang: str
    model: ModelSpec
    max_new_tokens: int = 48
    repetition_penalty: float = EVAL_REPETITION_PENALTY
    head_dtype: str = "fp32"
    batch_size: int = 64
    max_samples: int | None = None
    field: str = "text"
    keep_all: bool = False

    def __post_init__(self) -> None:
        if not self.lang.strip():
            raise ValueError("lang must name a language, e.g. bn")
        if self.head_dtype not in HEAD_DTYPES:
            raise ValueError(f"head dtype must be one of {', '.join(HEAD_DTYPES)}, got "
                             f"{self.head_dtype!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")
        self.generation()  # validates max_new_tokens and batch_size

    def generation(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                                  repetition_penalty=self.repetition_penalty)


def sidecar_of(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def labels(texts: Sequence[str]) -> list[str]:
    """Evaluate's label of each continuation: ``degenerate``, else its LID language."""
    from mmie.lid.detect import degeneracy, detect

    return [label_of(lid.lang, degeneracy(t).is_degenerate)
            for t, lid in zip(texts, detect(texts), strict=True)]


def _drop_reason(label: str, lang: str) -> str | None:
    if label == DEGENERATE:
        return DEGENERATE
    return None if is_own(label, lang) else OTHER_LANGUAGE


def _check_out(config: ContinueConfig, out: Path, force: bool) -> None:
    # checked before the model loads: a refusal after minutes of generating helps no one
    if out.resolve() == Path(config.input).expanduser().resolve():
        raise DataError(f"{out} is the input file; choose another --out")
    taken = [p for p in (out, sidecar_of(out)) if p.exists()]
    if taken and not force:
        raise DataError(f"{taken[0]} exists; pass --force to replace it")


def _write(path: Path, text: str) -> None:
    # written whole, then renamed: a crash never leaves half a file named like a finished one
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run(config: ContinueConfig, out: Path, force: bool = False,
        progress: Progress = SILENT) -> dict:
    """Continue every text's prompt, keep the ``lang`` ones, write ``out`` and its sidecar;
    returns the sidecar's content."""
    return run_many([(config, Path(out))], force, progress)[0]


def run_many(jobs: Sequence[tuple[ContinueConfig, Path]], force: bool = False,
             progress: Progress = SILENT) -> list[dict]:
    """:func:`run` for each ``(config, out)``, the model loaded once: each file is continued
    on its own (the same batches, so the same continuations as one run per file). The jobs
    must share the model and head precision; every output is checked before the model loads."""
    if not jobs:
        raise ValueError("no file to continue")
    first = jobs[0][0]
    if any((c.model, c.head_dtype) != (first.model, first.head_dtype) for c, _ in jobs):
        raise ValueError("every file must be continued by the same model and head dtype")
    for config, out in jobs:
        _check_out(config, Path(out), force)
    if len({Path(out).resolve() for _, out in jobs}) < len(jobs):
        raise DataError("two files would be written to the same --out")
    prompts = [[split_prompt(t)[0] for t in read_texts(c.input, c.field, limit=c.max_samples)]
               for c, _ in jobs]
    with loaded(first.model) as lm, head_precision(first.head_dtype):
        gens = [generate(lm, p, c.generation(), progress=progress,
                         desc=f"continue {Path(c.input).name}")
                for p, (c, _) in zip(prompts, jobs, strict=True)]
        identity = lm.identity.to_dict()
    # every file's refusal (nothing in its language) comes before any file is written
    done = [_kept(c, Path(out), p, g, identity)
            for (c, out), p, g in zip(jobs, prompts, gens, strict=True)]
    for (_, out), (kept, report) in zip(jobs, done, strict=True):
        _write_out(Path(out), kept, report)
    return [report for _, report in done]


def _kept(config: ContinueConfig, out: Path, prompts: list[str], gens: list,
          identity: dict) -> tuple[list[str], dict]:
    """The lines to keep and the sidecar's content; DataError when none is in the language."""
    found = labels([g.text for g in gens])
    reasons = [None if config.keep_all else _drop_reason(label, config.lang) for label in found]
    if not any(r is None for r in reasons):
        raise DataError(f"{config.input}: none of {len(prompts)} continuations is in "
                        f"'{config.lang}' (labels: {dict(Counter(found).most_common(5))})")
    # joined as evaluate and unlearn join a prompt and its rest (mmie.lid.mass.continuation_start)
    kept = [f"{p} {g.text.strip()}" for p, g, r in zip(prompts, gens, reasons, strict=True)
            if r is None]
    report = {"model": identity, "input": {"path": config.input,
                                           "sha256": sha256_file(Path(config.input))},
              "settings": {k: v for k, v in asdict(config).items()
                           if k not in ("input", "model")},
              "counts": {"in": len(prompts), "kept": len(kept),
                         "dropped": {k: reasons.count(k) for k in (DEGENERATE, OTHER_LANGUAGE)},
                         "labels": dict(Counter(found).most_common())},
              "out": str(out)}
    return kept, report


def _write_out(out: Path, kept: list[str], report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(out, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in kept))
    _write(sidecar_of(out), json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False)
           + "\n")
