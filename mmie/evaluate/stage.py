"""`evaluate`: what a model (with interventions, if any) still says, in which language, at what
cost.

Pipeline: read every text set (errors before any model loads: :mod:`mmie.evaluate.config`); load
the model and run every model pass (:mod:`mmie.evaluate.passes`); release it; label each
continuation with LID, aggregate the metrics and write an ``eval`` artifact (format in
docs/internals.md).

Under ``torchrun`` / ``accelerate launch`` every process loads the model on its own device and
runs its share of the batches; the per-sample results are gathered, and rank 0 alone labels,
aggregates and writes, from the same merged records a single process would have: the artifact
is the one-process artifact. The other ranks wait and return what rank 0 wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mmie.core import profile, provenance
from mmie.core.artifacts import Artifact, load, save
from mmie.core.distributed import ensure_group, main_writes
from mmie.core.errors import ArtifactError
from mmie.core.progress import SILENT, Progress
from mmie.edits.neurons import arm_name as neurons_arm_name
from mmie.evaluate.config import (  # noqa: F401  (re-exported: the stage's public names)
    EXTRA_SETS,
    EvalConfig,
    PromptSet,
    data_record,
    read_members,
    read_mia_texts,
    read_sets,
)
from mmie.evaluate.mass import mass_langs, mass_metrics
from mmie.evaluate.passes import Measured, measure
from mmie.lid.detect import degeneracy, detect
from mmie.metrics import definitions as em
from mmie.metrics.fluency import FluencyReference, reference

# --- arms and parent artifacts ----------------------------------------------------------------

def _arm_artifact(c: EvalConfig) -> Artifact:
    """The ``--adapter`` artifact: an adapter, or a neurons mask / ablation (an arm too)."""
    artifact = load(c.adapter)
    if artifact.kind not in ("adapter", "neurons"):
        raise ArtifactError(f"{c.adapter}: --adapter takes an adapter or neurons artifact, "
                            f"found kind '{artifact.kind}'")
    return artifact


def arm_name(c: EvalConfig) -> str:
    """'base', the adapter's method-objective or 'neurons-x<scale>', plus '+sae-gate' /
    '+scrub'."""
    if c.arm:
        return c.arm
    if c.adapter is None:
        name = "base"
    elif (art := _arm_artifact(c)).kind == "neurons":
        name = neurons_arm_name(art, c.neuron_scale)
    else:
        parts = [str(art.config[k]) for k in ("method", "objective") if art.config.get(k)]
        name = "-".join(parts) or Path(c.adapter).name
    return name + "+sae-gate" * c.sae_gate + "+scrub" * (c.scrub is not None)


def replicate_seed(c: EvalConfig) -> int:
    """The seed `gate` groups by: the adapter's training seed, else the evaluation seed."""
    if c.adapter is None:
        return c.seed
    return int(_arm_artifact(c).config.get("seed", c.seed))


def parent_paths(c: EvalConfig) -> list[Path]:
    return [Path(p) for p in (c.adapter, c.sae, c.scrub, c.layers, c.baseline) if p]


# --- records and metrics (model released) ----------------------------------------------------

@dataclass
class Records:
    """The JSONL records of the artifact, plus each generation's degeneracy measures.

    samples / degeneracies: per prompt set. ppl: ppl.jsonl rows. mia: mia.jsonl rows, or
    None when no forget-train texts were given. mass: mass.jsonl rows (:mod:`mmie.evaluate.mass`).
    fluency: the reference ``fluent`` was judged against (:mod:`mmie.metrics.fluency`).
    """

    samples: dict[str, list[dict]]
    degeneracies: dict[str, list]
    ppl: list[dict]
    mia: list[dict] | None
    mass: list[dict]
    fluency: FluencyReference

    def files(self) -> dict[str, str]:
        rows = [r for recs in self.samples.values() for r in recs]
        return {"samples.jsonl": jsonl(rows), "ppl.jsonl": jsonl(self.ppl),
                "mia.jsonl": jsonl(self.mia or []), "mass.jsonl": jsonl(self.mass)}


def fluency_reference(c: EvalConfig, samples: dict[str, list[dict]],
                      baseline: Artifact | None) -> FluencyReference:
    """The base model's retain continuations: the baseline's when it has them under this
    definition, else this run's (see :mod:`mmie.metrics.fluency`); degenerate ones left out."""
    rows, source = samples["retain"], "this run's retain continuations"
    if baseline is not None and baseline.config.get("data", {}).get("fluency") == "unconditional":
        rows = [r for r in baseline.read_jsonl("samples.jsonl") if r["set"] == "retain"]
        source = "baseline's retain continuations"
    return reference([r["fluency_nll"] for r in rows if not r["degenerate"]],
                     c.fluency_tolerance, source)


@profile.phase("records_lid")
def build_records(c: EvalConfig, sets: list[PromptSet], got: Measured,
                  baseline: Artifact | None = None) -> Records:
    """LID and degeneracy of every continuation; a degenerate one never counts as a language."""
    samples, degs = {}, {}
    for s in sets:
        gens = got.generations[s.name]
        lids, junk = detect([g.text for g in gens]), [degeneracy(g.text) for g in gens]
        samples[s.name] = [
            em.sample_record(s.name, i, s.prompts[i], g.text, lids[i], junk[i],
                             got.fluency[s.name][i].mean_nll, c.forget_lang, s.own)
            for i, g in enumerate(gens)]
        degs[s.name] = junk
    ref = fluency_reference(c, samples, baseline)
    for recs in samples.values():
        em.mark_fluent(recs, ref)
    mia = None if got.mia is None else em.mia_records(*got.mia, k=c.mink_k)
    return Records(samples, degs, em.ppl_records(got.ppl), mia, got.mass, ref)


def _language_metrics(book: em.MetricBook, c: EvalConfig, sets: list[PromptSet],
                      rec: Records) -> None:
    for s in sets:
        book.put_all(f"{s.name}.", em.set_metrics(rec.samples[s.name], rec.degeneracies[s.name],
                                                  s.own))
    book.put_all("", em.replacement_metrics(rec.samples, c.forget_lang, c.protected,
                                            c.replacement_lang))


def _ppl_ratio(c: EvalConfig, book: em.MetricBook, data: dict, baseline: Artifact | None):
    if baseline is None:
        return book.skip("retain_ppl_ratio", "no --baseline given")
    theirs = baseline.config.get("data", {})
    same = all(theirs.get(k) == data.get(k) for k in ("n_prompts", "body_dtype")) and \
        theirs.get("files", {}).get("retain") == data["files"]["retain"]
    base = (baseline.metrics.get("retain_nll") or {}).get("value")
    ours, n = book.value("retain_nll"), book.metrics["retain_nll"].n
    book.put("retain_ppl_ratio",
             em.Metric.absent("the baseline was evaluated on other retain texts or with "
                              "another --body-dtype", n) if not same
             else em.Metric(float(em.ppl_ratio(ours, base)), n) if None not in (ours, base)
             else em.Metric.absent("retain perplexity missing here or in the baseline", n))


def _skip_all(book: em.MetricBook, names: tuple[str, ...], reason: str) -> None:
    for name in names:
        book.skip(name, reason)


@profile.phase("statistics")
def build_metrics(c: EvalConfig, sets: list[PromptSet], got: Measured, rec: Records,
                  baseline: Artifact | None) -> dict:
    """Every manifest metric, ``{name: {"value", "n", "missing"?}}``."""
    book = em.MetricBook(c.strict)
    _language_metrics(book, c, sets, rec)
    book.put_all("", em.ppl_metrics(rec.ppl))
    book.put_all("", mass_metrics(rec.mass))
    _ppl_ratio(c, book, data_record(c, sets), baseline)
    if rec.mia is None:
        _skip_all(book, ("mia_auc_loss", "mia_auc_mink_pp"), "no --forget-train given")
    else:
        book.put_all("", em.mia_metrics(rec.mia))
    if got.pooled is None:
        _skip_all(book, ("probe_auc",), "no --layers given")
    else:
        book.put_all("", em.probe_metrics(*got.pooled, seed=c.seed))
    return book.to_dict()


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def token_sets_json(token_sets: dict) -> str:
    """Every token set's ids, so that a measure can be recomputed or audited."""
    return json.dumps({k: {**v.summary(), "ids": list(v.ids)} for k, v in token_sets.items()})


# --- run --------------------------------------------------------------------------------------

def _baseline(c: EvalConfig) -> Artifact | None:
    baseline = None if c.baseline is None else load(c.baseline, kind="eval")
    provenance.check_eval_baseline(baseline, adapter=c.adapter)
    return baseline


@profile.phase("evaluate")
def run(config: EvalConfig, out: Path | str, *, force: bool = False,
        progress: Progress = SILENT) -> Artifact:
    """Evaluate as ``config`` says; write and return the ``eval`` artifact at ``out``.

    Under a launcher every process calls it alike (see the module docstring).
    """
    out = Path(out)
    provenance.writing(config, out, force=force)
    ensure_group()
    sets = read_sets(config)
    mia_texts, langs = read_mia_texts(config), mass_langs(config)
    arm, baseline = arm_name(config), _baseline(config)
    if config.layers:
        load(config.layers, kind="layers")  # a bad artifact fails before the model loads
    got = measure(config, sets, mia_texts, progress, langs)
    provenance.check_eval_baseline(baseline, got.identity)

    def write() -> Artifact:
        records = build_records(config, sets, got, baseline)
        metrics = build_metrics(config, sets, got, records, baseline)
        settings = {**config.to_dict(), "arm": arm, "seed": replicate_seed(config),
                    "eval_seed": config.seed,
                    "data": data_record(config, sets), "interventions": got.applied,
                    "token_sets": {k: v.summary() for k, v in got.token_sets.items()},
                    "fluency": records.fluency.to_dict()}
        files = {**records.files(), "token_sets.json": token_sets_json(got.token_sets),
                 "rates.png": em.chart_png(metrics, [s.name for s in sets], arm)}
        return save(out, "eval", tensors={}, config=settings, model=got.identity,
                    parents=parent_paths(config), metrics=metrics, files=files, force=force)

    return main_writes(write, lambda: load(out, kind="eval"), str(out))
