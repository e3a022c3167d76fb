"""Scoring the validation split under the current edit, and keeping the chosen checkpoint.

:class:`Scorer` prepares the validation items once (token sets, prompt/continuation splits,
retain texts) and measures them under the edit in forward passes only: no generation, no
gradient. :class:`Keeper` is the training loop's validation hook: it scores step 0 and every
``every`` steps, keeps a copy of the adapter weights of the best qualifying checkpoint so far
(and of step 0 when that is the fallback), and at the end puts the chosen weights back so the
artifact saves them. The rule is :func:`mmie.unlearn.validation.choose`.

Items the edit provably leaves as the base model has them (:meth:`Adapter.unchanged`: for a
gated LoRA, texts on which its language gate never fires) are scored at the first measurement
only and their results reused: for ``glora`` that is most of the protected and retain texts.

Under a launcher every process scores the whole split on its own (no collective; the
processes hold identical weights, so they agree on the choice).
"""

from __future__ import annotations

import io
import json
import math
import statistics
import time

import torch

from mmie.core.data import split_prompt
from mmie.core.errors import DataError
from mmie.core.generation import ScoreItem, score, text_items
from mmie.core.provenance import file_hashes
from mmie.lid.mass import LangData, build_token_sets, continuation_start, mass_scores
from mmie.unlearn.validation import ValidationConfig, ValTexts, choose, judge


def _mean(values) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(kept) if kept else None


class Scorer:
    """The validation split, tokenized once; :meth:`measure` scores it under an edit."""

    def __init__(self, lm, c: ValidationConfig, texts: ValTexts, max_length: int,
                 batch_size: int) -> None:
        self.lm, self.batch_size = lm, batch_size
        self.langs = [c.forget_lang, *texts.protect]
        sources = {c.forget_lang: texts.forget, **texts.protect}
        sets = build_token_sets(lm.tokenizer, {lang: LangData(tuple(t))
                                               for lang, t in sources.items()})
        if c.forget_lang not in sets:
            raise DataError(f"{c.forget}: no script found for the forget language's token set")
        self.token_sets = {lang: s.summary() for lang, s in sets.items()}
        self.id_sets = [sets[lang].ids if lang in sets else () for lang in self.langs]
        self.items: list[ScoreItem] = []
        self.owner: list[int] = []  # column of each item's own language (0: forget)
        for k, lang in enumerate(self.langs):
            for text in sources[lang]:
                prompt, rest = split_prompt(text, c.prompt_frac)
                found = continuation_start(lm.tokenizer, prompt, rest, max_length) if rest \
                    else None
                if found is not None:
                    self.items.append(ScoreItem(*found))
                    self.owner.append(k)
        if 0 not in self.owner:
            raise DataError(f"{c.forget}: no validation text leaves a continuation after its "
                            f"prompt within {max_length} tokens")
        self.retain = text_items(lm, texts.retain, max_length)
        self.cache: dict = {}  # kind -> (unchanged flags, first measurement's results)

    def _scored(self, adapter, fn, items: list, kind: str) -> list:
        """``fn(items)`` under the edit, reusing the first results of unchanged items."""
        if kind not in self.cache:
            unchanged = getattr(adapter, "unchanged", None)  # an Adapter has it; a stub may not
            fixed = unchanged([it.ids for it in items]) if unchanged else [False] * len(items)
            with torch.no_grad(), adapter.edits():
                got = fn(items)
            self.cache[kind] = (fixed, got)
            return got
        fixed, first = self.cache[kind]
        live = [i for i, f in enumerate(fixed) if not f]
        with torch.no_grad(), adapter.edits():
            fresh = fn([items[i] for i in live]) if live else []
        got = list(first)
        for i, value in zip(live, fresh, strict=True):
            got[i] = value
        return got

    def _column(self, owner: int, column: int, masses) -> float | None:
        return _mean(m.mass[column] for m, k in zip(masses, self.owner, strict=True)
                     if k == owner)

    def measure(self, adapter) -> dict:
        """Forget mass, own mass per protected language, forget-language leakage after each
        protected language's prompts, and the retain texts' token-mean NLL."""
        start = time.perf_counter()
        masses = self._scored(adapter, lambda its: mass_scores(
            self.lm, its, self.id_sets, batch_size=self.batch_size), self.items, "mass")
        scores = self._scored(adapter, lambda its: score(
            self.lm, its, batch_size=self.batch_size), self.retain, "retain")
        protected = list(enumerate(self.langs))[1:]
        tokens = sum(s.n_tokens for s in scores)
        return {"forget_mass": self._column(0, 0, masses),
                "own_mass": {lang: self._column(k, k, masses) for k, lang in protected},
                "leakage": {lang: self._column(k, 0, masses) for k, lang in protected},
                "retain_nll": sum(s.nll_sum for s in scores) / tokens if tokens else None,
                "seconds": time.perf_counter() - start}


def _snapshot(adapter) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in adapter.trainable().items()}


class Keeper:
    """The validation hook: ``keeper(step)`` scores and remembers; :meth:`finish` restores
    the chosen weights and returns the manifest record and the curve file."""

    def __init__(self, c: ValidationConfig, scorer: Scorer, adapter) -> None:
        self.c, self.scorer, self.adapter = c, scorer, adapter
        self.records: list[dict] = []
        self.kept: dict[int, dict[str, torch.Tensor]] = {}
        self.best: dict | None = None

    def __call__(self, step: int) -> None:
        record = {"step": step, **self.scorer.measure(self.adapter)}
        base = self.records[0] if self.records else record
        record.update(judge(record, base, self.c))
        record["qualified"] = step > 0 and record["qualified"]  # step 0 is the reference
        self.records.append(record)
        if step == 0 and self.c.fallback == "step0":
            self.kept[0] = _snapshot(self.adapter)
        if record["qualified"] and (self.best is None
                                    or record["forget_mass"] < self.best["forget_mass"]):
            if self.best is not None:  # never step 0: the reference is no candidate
                self.kept.pop(self.best["step"], None)
            self.best, self.kept[step] = record, _snapshot(self.adapter)

    def finish(self) -> tuple[dict, dict[str, str]]:
        choice = choose(self.records, self.c)
        if choice.step != self.records[-1]["step"]:
            self.adapter.load_trainable(self.kept[choice.step])
        metrics = {"rule": self.c.rule(), "chosen_step": choice.step,
                   "qualified": choice.qualified, "reason": choice.reason,
                   "chosen": next(r for r in self.records if r["step"] == choice.step),
                   "curve": self.records, "every": self.c.every,
                   "data": file_hashes(self.c.paths()), "token_sets": self.scorer.token_sets}
        rows = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
        return metrics, {"validation.jsonl": rows,
                         "validation.png": plot_png(self.records, choice.step, self.c)}


def plot_png(records: list[dict], chosen: int, c: ValidationConfig) -> bytes:
    """The validation curve: forget mass and each protected language's retention (left),
    the retain perplexity ratio (right), the thresholds dotted, the kept step dashed."""
    from matplotlib.figure import Figure

    steps = [r["step"] for r in records]
    nan = lambda v: math.nan if v is None else v  # noqa: E731  (a gap in the line)
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(steps, [nan(r["forget_mass"]) for r in records], marker="o", label="forget mass")
    for lang in records[0].get("retention") or {}:
        left.plot(steps, [nan((r.get("retention") or {}).get(lang)) for r in records],
                  marker=".", label=f"{lang} own-mass retention")
    left.axhline(c.min_retention, color="grey", linestyle=":")
    right.plot(steps, [nan(r["retain_ppl_ratio"]) for r in records], marker="o",
               color="tab:red")
    right.axhline(c.max_ppl_ratio, color="grey", linestyle=":")
    for ax, title in ((left, "validation masses"), (right, "retain perplexity ratio")):
        ax.axvline(chosen, color="black", linestyle="--", linewidth=0.8)
        ax.set(title=title, xlabel="step")
    left.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def start(c: ValidationConfig, lm, adapter, texts: ValTexts, max_length: int,
          batch_size: int, sharded: bool) -> Keeper:
    """The hook of one run (refused under FSDP: its sharded weights are not copied here)."""
    if sharded:
        raise ValueError("validation-chosen checkpoints are not supported under FSDP; run "
                         "with DDP (configs/accelerate/ddp.yaml) or one process")
    return Keeper(c, Scorer(lm, c, texts, max_length, batch_size), adapter)
