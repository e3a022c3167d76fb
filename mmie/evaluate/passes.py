"""`evaluate`'s model pass: everything that needs the model, with the model loaded once.

With the interventions attached (adapter, SAE gate, script scrub: :mod:`mmie.edits.interventions`)
the prompts of every set are continued, held-out forget/retain texts scored (perplexity),
forget-train texts scored against held-out forget texts (membership inference) and
activations pooled for the language probe, and the held-out continuation of every prompt fed
teacher-forced once for the language-mass measure (:mod:`mmie.evaluate.mass`); then the
interventions are detached and every continuation is scored by the base model after BOS alone
(fluency, :mod:`mmie.metrics.fluency`); then the model is released.

Under a launcher every pass shares its length-sorted batches among the processes and gathers
the per-sample results (:mod:`mmie.core.sharded`), so every process ends with the same
:class:`Measured` as a one-process run, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmie.core.activations import harvest
from mmie.core.artifacts import load
from mmie.core.body_precision import body_precision
from mmie.core.distributed import World, world
from mmie.core.errors import ArtifactError
from mmie.core.generation import Generation, TokenScores, generate, score, text_items
from mmie.core.head_precision import head_precision
from mmie.core.models import LoadedModel, loaded
from mmie.core.progress import SILENT, Progress
from mmie.core.sharded import length_batches, map_batches
from mmie.evaluate.basecache import cached_scores
from mmie.evaluate.config import EvalConfig, PromptSet
from mmie.evaluate.mass import mass_items, mass_rows, scored_sets, set_langs
from mmie.lid.mass import LangData, MassScores, TokenSet, build_token_sets, mass_scores
from mmie.metrics.fluency import fluency_items


@dataclass
class Measured:
    """Everything computed with the model loaded; plain CPU data only."""

    generations: dict[str, list[Generation]]
    ppl: dict[str, list[TokenScores]]
    mia: tuple[list[TokenScores], list[TokenScores]] | None
    pooled: tuple[dict, dict] | None
    fluency: dict[str, list[TokenScores]]
    applied: dict
    identity: object
    mass: list[dict] = field(default_factory=list)
    token_sets: dict[str, TokenSet] = field(default_factory=dict)


def chosen_layers(c: EvalConfig, lm: LoadedModel) -> list[int] | None:
    if c.layers is None:
        return None
    chosen = load(c.layers, kind="layers", model=lm.identity).metrics.get("chosen")
    if isinstance(chosen, dict):
        chosen = chosen.get("value")
    if not chosen:
        raise ArtifactError(f"{c.layers}: layers artifact has no chosen layers")
    return [int(x) for x in chosen]


@contextmanager
def interventions(lm: LoadedModel, c: EvalConfig) -> Iterator[dict]:
    """The one call site of :mod:`mmie.edits.interventions`; nothing attached for the base arm."""
    if not c.intervened:
        yield {}
        return
    from mmie.edits.interventions import attached  # layer 3; only needed when an arm is evaluated

    path = lambda p: Path(p) if p else None  # noqa: E731
    with attached(lm, adapter=path(c.adapter), sae=path(c.sae),
                  sae_gate_strength=c.gate_strength, scrub=path(c.scrub),
                  neuron_scale=c.neuron_scale) as applied:
        yield dict(applied or {})


def pooled_states(lm: LoadedModel, texts: Sequence[str], layers: list[int], c: EvalConfig,
                  here: World, progress: Progress, desc: str) -> dict[int, torch.Tensor]:
    """Mean-pooled states per layer, ``[len(texts), d]``, batched as :func:`harvest` batches
    (length-sorted) but one harvest per batch, so the batches can be shared among processes."""
    plan = length_batches([len(it.ids) for it in text_items(lm, texts, c.max_length)],
                          c.batch_size)

    def run(_: int, chunk: list[int]) -> list[dict[int, torch.Tensor]]:
        got = harvest(lm, [texts[i] for i in chunk], layers, max_length=c.max_length,
                      batch_size=len(chunk), token_sample=0, seed=c.seed).pooled
        # clone: a row view would pickle (and gather) the whole batch's storage
        return [{layer: rows[k].clone() for layer, rows in got.items()}
                for k in range(len(chunk))]

    rows = map_batches(plan, run, len(texts), here=here, progress=progress, desc=desc)
    return {layer: torch.stack([row[layer] for row in rows]) for layer in rows[0]}


def _mass(lm: LoadedModel, c: EvalConfig, sets: list[PromptSet],
          token_sets: dict[str, TokenSet], here: World, progress: Progress) -> list[dict]:
    """mass.jsonl rows of every set with continuations, all sets in one batched pass; each
    position's distribution is summed once per language with a token set."""
    jobs = [(s, set_langs(c, s), mass_items(lm.tokenizer, s, c)) for s in scored_sets(sets)]
    langs = list(token_sets)
    items = [it for _, _, its in jobs for _, it in its]
    got = mass_scores(lm, items, [token_sets[lang].ids for lang in langs],
                      batch_size=c.batch_size, progress=progress, desc="language mass",
                      here=here) if items else []
    rows, done = [], 0
    for s, columns, its in jobs:
        mine = [MassScores(g.n_tokens, tuple(
            g.mass[langs.index(lang)] if lang in token_sets else None for lang in columns))
            for g in got[done:done + len(its)]]
        done += len(its)
        rows += mass_rows(s.name, [i for i, _ in its], mine, columns, token_sets)
    return rows


def _with_interventions(lm: LoadedModel, c: EvalConfig, sets: list[PromptSet],
                        mia_texts: tuple[list[str], list[str]] | None,
                        token_sets: dict[str, TokenSet], here: World,
                        progress: Progress) -> Measured:
    layers = chosen_layers(c, lm)
    settings = c.generation()
    kw = dict(batch_size=c.batch_size, progress=progress, here=here)
    texts = {s.name: s.texts for s in sets}
    # MIA non-members are every held-out forget text; the first n_prompts of them are the
    # forget set's texts, so one scoring pass serves both
    held = mia_texts[1] if mia_texts else texts["forget"]
    with interventions(lm, c) as applied:
        gens = {s.name: generate(lm, s.prompts, settings, progress=progress, here=here,
                                 desc=f"generate {s.name}") for s in sets}
        # z-scores (Min-K%++) only where MIA reads them: the members and the held-out forget texts
        forget_all = score(lm, text_items(lm, held, c.max_length), desc="ppl forget",
                           z=mia_texts is not None, **kw)
        ppl = {"retain": score(lm, text_items(lm, texts["retain"], c.max_length),
                               desc="ppl retain", z=False, **kw),
               "forget": forget_all[:len(texts["forget"])]}
        mia = None if mia_texts is None else (
            score(lm, text_items(lm, mia_texts[0], c.max_length), desc="mia members", **kw),
            forget_all)
        mass = _mass(lm, c, sets, token_sets, here, progress)
        pooled = None if layers is None else tuple(
            pooled_states(lm, texts[name], layers, c, here, progress, f"probe {name}")
            for name in ("forget", "retain"))
    return Measured(gens, ppl, mia, pooled, {}, applied, lm.identity, mass, token_sets)


def _fluency(lm: LoadedModel, c: EvalConfig, gens: list[Generation], here: World,
             progress: Progress, name: str) -> list[TokenScores]:
    items = fluency_items(lm, gens)
    key = {"batch_size": c.batch_size, "z": False}
    if c.head_dtype != "fp32":  # bf16 scores differ in the last digits; fp32 keeps its old key
        key["head_dtype"] = c.head_dtype
    if c.body_dtype != "fp32":
        key["body_dtype"] = c.body_dtype
    return cached_scores(lm, items, key, lambda: score(
        lm, items, batch_size=c.batch_size, progress=progress, desc=f"fluency {name}",
        here=here, z=False))


def measure(c: EvalConfig, sets: list[PromptSet], mia_texts: tuple[list[str], list[str]] | None,
            progress: Progress = SILENT, langs: dict[str, LangData] | None = None) -> Measured:
    """Load the model, run every model-dependent step, release the model.

    ``mia_texts``: (members, non-members), or None. ``langs``: the languages that get token
    sets (:func:`mmie.evaluate.mass.mass_langs`); none given, no mass is measured.
    Under a launcher every process must call it alike; each computes its share of the batches
    and all return the same, complete result.
    """
    here = world()
    # every pass computes the LM head at c.head_dtype (mmie.core.head_precision) and the
    # body's linear layers at c.body_dtype, entered before any adapter is attached, so that
    # an adapter's own layers stay fp32 (mmie.core.body_precision)
    with loaded(c.model) as lm, head_precision(c.head_dtype), \
            body_precision(lm.model, c.body_dtype):
        token_sets = build_token_sets(lm.tokenizer, langs) if langs else {}
        got = _with_interventions(lm, c, sets, mia_texts, token_sets, here, progress)
        # fluency is judged by the base model: interventions are detached by now
        got.fluency = {name: _fluency(lm, c, gens, here, progress, name)
                       for name, gens in got.generations.items()}
    return got
