"""`evaluate`'s language-mass measure (:mod:`mmie.lid.mass`): which languages get token sets,
which texts are scored, and the mass.jsonl rows and ``mass.<set>.*`` metrics.

Per prompt set (not the adversarial one: its prompts are whole instructions, with no held-out
continuation) every text whose prompt leaves a continuation is scored once, under the arm:

* ``forget_mass``: mass on the forget language's tokens (leakage on protected sets, the
  forget language's survival on forget sets);
* ``own_mass``: mass on the set's own language (null for sets without one, or whose language
  has no token set);
* ``replacement_mass``: mass on the replacement language (default en).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mmie.core.data import read_texts, split_prompt
from mmie.evaluate.config import EXTRA_SETS, EvalConfig, PromptSet
from mmie.lid.mass import LangData, MassScores, TokenSet, continuation_start
from mmie.metrics.definitions import Metric, mean

KINDS = ("forget", "own", "replacement")


def _texts(c: EvalConfig, *paths: str | None) -> tuple[str, ...]:
    return tuple(t for p in paths if p for t in read_texts(p, c.field))


def mass_langs(c: EvalConfig) -> dict[str, LangData]:
    """Every language a token set is built for, with all the texts given for it (whole files,
    not only the first ``n_prompts``): the token sets describe languages, not prompts."""
    langs = {c.forget_lang: LangData(_texts(c, c.forget, c.forget_train)),
             c.retain_lang: LangData(_texts(c, c.retain))}
    langs |= {lang: LangData(_texts(c, path)) for lang, path in c.xlang}
    if c.romanized:
        langs[EXTRA_SETS["romanized"][0](c)] = LangData(_texts(c, c.romanized), "Latn")
    langs.setdefault(c.replacement_lang, LangData())
    return langs


def scored_sets(sets: Sequence[PromptSet]) -> list[PromptSet]:
    """Sets with held-out continuations (the adversarial set is used whole)."""
    return [s for s in sets if s.name != "adversarial"]


def mass_items(tokenizer, s: PromptSet, c: EvalConfig) -> list[tuple[int, object]]:
    """``(idx, ScoreItem)`` for each text of ``s`` with a continuation after its prompt."""
    from mmie.core.generation import ScoreItem

    out = []
    for idx, (text, prompt) in enumerate(zip(s.texts, s.prompts, strict=True)):
        rest = split_prompt(text, c.prompt_frac)[1]
        found = continuation_start(tokenizer, prompt, rest, c.max_length) if rest else None
        if found is not None:
            out.append((idx, ScoreItem(*found)))
    return out


def set_langs(c: EvalConfig, s: PromptSet) -> tuple[str, str | None, str]:
    """The (forget, own, replacement) languages of one set's mass columns."""
    return c.forget_lang, s.own, c.replacement_lang


def mass_rows(name: str, idxs: Sequence[int], scores: Sequence[MassScores],
              columns: Sequence[str | None], token_sets: Mapping[str, TokenSet]) -> list[dict]:
    """mass.jsonl rows of one set; ``columns`` are the (forget, own, replacement) languages
    in the order of ``scores[i].mass``; a language without a token set gives null."""
    rows = []
    for idx, got in zip(idxs, scores, strict=True):
        row = {"set": name, "idx": idx, "n_tokens": got.n_tokens}
        for kind, lang, value in zip(KINDS, columns, got.mass, strict=True):
            row[f"{kind}_mass"] = value if lang in token_sets else None
        rows.append(row)
    return rows


def mass_metrics(rows: Sequence[dict]) -> dict[str, Metric]:
    """``mass.<set>.<kind>``: mean over the set's texts; missing when the column is null."""
    out: dict[str, Metric] = {}
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == name]
        for kind in KINDS:
            out[f"mass.{name}.{kind}"] = mean((r[f"{kind}_mass"] for r in mine),
                                              f"{kind}-language token set for '{name}'")
    return out
