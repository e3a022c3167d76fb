"""`evaluate`: what a model (with interventions, if any) still says, in which language, at what
cost.

Pipeline: read every text set (errors before any model loads); load the model; with the
interventions attached (adapter, SAE gate, script scrub: :mod:`mmie.interventions`) continue
the prompts of every set, score held-out forget/retain texts (perplexity), forget-train vs
held-out forget texts (membership inference) and harvest activations for the language probe;
detach them and score every continuation with the base model (fluency; for the base arm the
log-probs recorded while generating greedily are those scores, so no second pass runs);
release the model; label each continuation with LID and write an ``eval`` artifact (format in
docs/internals.md).

Prompts are the first ``n_prompts`` texts of each file, never a seeded sample: arms evaluated
with different seeds must pair by ``(set, idx)`` on the same prompts. A prompt is the first
``prompt_frac`` of a sentence (:func:`mmie.data.split_prompt`); adversarial texts are
instructions and are used whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmie import eval_metrics as em
from mmie.activations import harvest
from mmie.artifacts import Artifact, load, save, sha256_file
from mmie.data import filter_texts, read_texts, split_prompt
from mmie.errors import ArtifactError
from mmie.generation import (
    Generation,
    GenerationSettings,
    TokenScores,
    continuation_items,
    generate,
    score,
    text_items,
)
from mmie.lid import degeneracy, detect
from mmie.models import LoadedModel, ModelSpec, loaded
from mmie.progress import SILENT, Progress


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one `evaluate` run.

    model: the base model. forget, retain: held-out texts of the language to forget and of the
        language to keep (prompts, perplexity, probe). xlang: (lang, file) protected related
        languages (leakage and collateral damage). romanized, mixed, adversarial: optional
        extra forget-prompt sets. forget_train: the texts unlearning saw (MIA members).
    layers: a ``layers`` artifact; its ``metrics['chosen']`` layers are probed.
    baseline: an ``eval`` artifact of the base model, for the retain perplexity ratio.
    adapter, sae, scrub: intervention artifacts; the SAE gate needs ``sae_gate``, with
        ``gate_strength`` overriding the artifact's strength.
    arm: name recorded for `gate`; None derives it (:func:`arm_name`).
    n_prompts: texts used per set (the first ones of each file).
    max_new_tokens, batch_size, temperature, top_p, seed: generation (greedy unless a
        temperature is given); seed also seeds the probe folds.
    repetition_penalty: 1.2 by default: greedy continuations of small models otherwise loop
        (Gemma 3 270M: 13 of 16 Hindi continuations of 48 tokens), and a loop counts as
        degenerate, not as a language, so the base rates would say little. Recorded in
        ``data``: the baseline and every arm must decode alike.
    forget_lang, retain_lang, replacement_lang: ISO codes; the replacement language is the one
        forget prompts are expected to be answered in after unlearning.
    protected: related languages whose use on forget prompts counts as substitution.
    prompt_frac: share of a sentence's words used as its prompt.
    max_length: tokens per text for perplexity, MIA and probe texts.
    mink_k: share of lowest-scoring tokens averaged by Min-K%++.
    field: JSON field or column holding the text.
    strict: a metric that cannot be computed is an error instead of a recorded gap.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    forget: str = ""
    retain: str = ""
    xlang: tuple[tuple[str, str], ...] = ()
    romanized: str | None = None
    mixed: str | None = None
    adversarial: str | None = None
    forget_train: str | None = None
    layers: str | None = None
    baseline: str | None = None
    adapter: str | None = None
    sae: str | None = None
    sae_gate: bool = False
    gate_strength: float | None = None
    scrub: str | None = None
    arm: str | None = None
    n_prompts: int = 16
    max_new_tokens: int = 48
    batch_size: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.2
    seed: int = 0
    forget_lang: str = "hi"
    retain_lang: str = "en"
    replacement_lang: str = "en"
    protected: tuple[str, ...] = ("ur", "pa", "bn")
    prompt_frac: float = 0.5
    max_length: int = 256
    mink_k: float = 0.2
    field: str = "text"
    strict: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "xlang", tuple(tuple(x) for x in self.xlang))
        object.__setattr__(self, "protected", tuple(self.protected))
        if not self.forget or not self.retain:
            raise ValueError("both forget and retain files are required")
        for name in ("n_prompts", "max_length"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")
        if not 0 < self.prompt_frac < 1:
            raise ValueError(f"prompt_frac must be in (0, 1), got {self.prompt_frac}")
        if not 0 < self.mink_k <= 1:
            raise ValueError(f"mink_k must be in (0, 1], got {self.mink_k}")
        self._check_langs()
        self._check_interventions()
        self.generation()  # validates the generation fields

    def _check_langs(self) -> None:
        langs = [lang for lang, _ in self.xlang]
        if len(set(langs)) != len(langs):
            raise ValueError(f"xlang languages repeat: {', '.join(langs)}")
        if self.forget_lang in {*langs, *self.protected, self.replacement_lang, self.retain_lang}:
            raise ValueError(f"forget language '{self.forget_lang}' is also listed as an xlang, "
                             "protected, replacement or retain language")

    def _check_interventions(self) -> None:
        if self.sae_gate != (self.sae is not None):
            raise ValueError("--sae and --sae-gate go together (the SAE is only used as a gate)")
        if self.gate_strength is not None and not self.sae_gate:
            raise ValueError("--gate-strength needs --sae-gate")
        if self.arm is not None and not self.arm.strip():
            raise ValueError("arm name is empty")

    @property
    def intervened(self) -> bool:
        return any(x is not None for x in (self.adapter, self.sae, self.scrub))

    def generation(self) -> GenerationSettings:
        # the unmodified model's greedy log-probs are its fluency scores: no second pass needed
        record = not self.intervened and self.temperature == 0
        return GenerationSettings(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                                  temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                                  repetition_penalty=self.repetition_penalty,
                                  max_prompt_tokens=self.max_length, record_logprobs=record)

    def to_dict(self) -> dict:
        return asdict(self)


# --- prompt sets ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptSet:
    """One set of prompts: its name in samples.jsonl, texts, prompts and own language."""

    name: str
    path: str
    own: str | None
    texts: list[str]
    prompts: list[str]


# Optional forget-prompt sets: config field -> (own language, whether the whole text is the
# prompt). Adversarial texts are instructions ("answer in Hindi: ..."), not sentences to cut.
EXTRA_SETS: dict[str, tuple[Callable[[EvalConfig], str | None], bool]] = {
    "romanized": (lambda c: c.forget_lang + em.ROMAN_SUFFIX, False),
    "mixed": (lambda c: None, False),
    "adversarial": (lambda c: None, True),
}


def _prompt_set(c: EvalConfig, name: str, path: str, own: str | None, whole: bool) -> PromptSet:
    texts = read_texts(path, c.field, limit=c.n_prompts)
    prompts = texts if whole else [split_prompt(t, c.prompt_frac)[0] for t in texts]
    return PromptSet(name, path, own, texts, prompts)


def read_sets(c: EvalConfig) -> list[PromptSet]:
    """Every prompt set, read and validated (DataError) before any model loads."""
    sets = [_prompt_set(c, "forget", c.forget, c.forget_lang, False),
            _prompt_set(c, "retain", c.retain, c.retain_lang, False)]
    sets += [_prompt_set(c, f"xlang:{lang}", path, lang, False) for lang, path in c.xlang]
    for name, (own, whole) in EXTRA_SETS.items():
        if getattr(c, name):
            sets.append(_prompt_set(c, name, getattr(c, name), own(c), whole))
    return sets


def _file_hash(path: str) -> str | None:
    return sha256_file(Path(path)) if Path(path).is_file() else None


def data_record(c: EvalConfig, sets: list[PromptSet]) -> dict:
    """What `gate` checks is identical between the baseline and every arm."""
    files = {s.name: _file_hash(s.path) for s in sets}
    if c.forget_train:
        files["forget_train"] = _file_hash(c.forget_train)
    return {"files": files, "n_prompts": c.n_prompts, "max_new_tokens": c.max_new_tokens,
            "forget_lang": c.forget_lang, "retain_lang": c.retain_lang,
            "replacement_lang": c.replacement_lang, "protected": list(c.protected),
            "prompt_frac": c.prompt_frac, "temperature": c.temperature, "top_p": c.top_p,
            "repetition_penalty": c.repetition_penalty}


# --- arms and parent artifacts ----------------------------------------------------------------

def arm_name(c: EvalConfig) -> str:
    """'base', or the adapter's method-objective, plus '+sae-gate' / '+scrub'."""
    if c.arm:
        return c.arm
    if c.adapter is None:
        name = "base"
    else:
        cfg = load(c.adapter, kind="adapter").config
        parts = [str(cfg[k]) for k in ("method", "objective") if cfg.get(k)]
        name = "-".join(parts) or Path(c.adapter).name
    return name + "+sae-gate" * c.sae_gate + "+scrub" * (c.scrub is not None)


def replicate_seed(c: EvalConfig) -> int:
    """The seed `gate` groups by: the adapter's training seed, else the evaluation seed."""
    if c.adapter is None:
        return c.seed
    return int(load(c.adapter, kind="adapter").config.get("seed", c.seed))


def parent_paths(c: EvalConfig) -> list[Path]:
    return [Path(p) for p in (c.adapter, c.sae, c.scrub, c.layers, c.baseline) if p]


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
    """The single call site of :mod:`mmie.interventions`; nothing attached for the base arm."""
    if not c.intervened:
        yield {}
        return
    from mmie.interventions import attached  # layer 3; only needed when an arm is evaluated

    path = lambda p: Path(p) if p else None  # noqa: E731
    with attached(lm, adapter=path(c.adapter), sae=path(c.sae),
                  sae_gate_strength=c.gate_strength, scrub=path(c.scrub)) as applied:
        yield dict(applied or {})


# --- the model pass ---------------------------------------------------------------------------

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


def _with_interventions(lm: LoadedModel, c: EvalConfig, sets: list[PromptSet],
                        members: list[str] | None, progress: Progress) -> Measured:
    layers = chosen_layers(c, lm)
    settings = c.generation()
    kw = dict(batch_size=c.batch_size, progress=progress)
    texts = {s.name: s.texts for s in sets}
    with interventions(lm, c) as applied:
        gens = {s.name: generate(lm, s.prompts, settings, progress=progress,
                                 desc=f"generate {s.name}") for s in sets}
        ppl = {name: score(lm, text_items(lm, texts[name], c.max_length), desc=f"ppl {name}",
                           **kw) for name in ("retain", "forget")}
        mia = None if members is None else (
            score(lm, text_items(lm, members, c.max_length), desc="mia members", **kw),
            ppl["forget"])
        pooled = None if layers is None else tuple(
            harvest(lm, texts[name], layers, max_length=c.max_length, batch_size=c.batch_size,
                    token_sample=0, seed=c.seed, progress=progress, desc=f"probe {name}").pooled
            for name in ("forget", "retain"))
    return Measured(gens, ppl, mia, pooled, {}, applied, lm.identity)


def measure(c: EvalConfig, sets: list[PromptSet], members: list[str] | None,
            progress: Progress = SILENT) -> Measured:
    """Load the model, run every model-dependent step, release the model."""
    with loaded(c.model) as lm:
        got = _with_interventions(lm, c, sets, members, progress)
        # fluency is judged by the base model: interventions are detached by now
        got.fluency = {name: _fluency(lm, c, gens, progress, name)
                       for name, gens in got.generations.items()}
    return got


def _fluency(lm: LoadedModel, c: EvalConfig, gens: list[Generation], progress: Progress,
             name: str) -> list[TokenScores]:
    if all(g.logprobs is not None for g in gens):  # recorded while the base model generated
        return [TokenScores(g.logprobs, ()) for g in gens]
    return score(lm, continuation_items(gens), batch_size=c.batch_size, progress=progress,
                 desc=f"fluency {name}")


# --- records and metrics (model released) ----------------------------------------------------

@dataclass
class Records:
    """The JSONL records of the artifact, plus each generation's degeneracy measures.

    samples / degeneracies: per prompt set. ppl: ppl.jsonl rows. mia: mia.jsonl rows, or
    None when no forget-train texts were given.
    """

    samples: dict[str, list[dict]]
    degeneracies: dict[str, list]
    ppl: list[dict]
    mia: list[dict] | None

    def files(self) -> dict[str, str]:
        rows = [r for recs in self.samples.values() for r in recs]
        return {"samples.jsonl": jsonl(rows), "ppl.jsonl": jsonl(self.ppl),
                "mia.jsonl": jsonl(self.mia or [])}


def build_records(c: EvalConfig, sets: list[PromptSet], got: Measured) -> Records:
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
    mia = None if got.mia is None else em.mia_records(*got.mia, k=c.mink_k)
    return Records(samples, degs, em.ppl_records(got.ppl), mia)


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
    same = all(theirs.get(k) == data[k] for k in ("n_prompts",)) and \
        theirs.get("files", {}).get("retain") == data["files"]["retain"]
    base = (baseline.metrics.get("retain_ppl") or {}).get("value")
    ours, n = book.value("retain_ppl"), book.metrics["retain_ppl"].n
    book.put("retain_ppl_ratio",
             em.Metric.absent("the baseline was evaluated on other retain texts", n) if not same
             else em.Metric(ours / base, n) if ours and base
             else em.Metric.absent("retain perplexity missing here or in the baseline", n))


def _skip_all(book: em.MetricBook, names: tuple[str, ...], reason: str) -> None:
    for name in names:
        book.skip(name, reason)


def build_metrics(c: EvalConfig, sets: list[PromptSet], got: Measured, rec: Records,
                  baseline: Artifact | None) -> dict:
    """Every manifest metric, ``{name: {"value", "n", "missing"?}}``."""
    book = em.MetricBook(c.strict)
    _language_metrics(book, c, sets, rec)
    book.put_all("", em.ppl_metrics(rec.ppl))
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


# --- run --------------------------------------------------------------------------------------

def _check_out(out: Path, force: bool) -> None:
    # save() checks again; failing here spares a whole evaluation before the refusal.
    if out.exists() and not force:
        raise ArtifactError(f"{out} already exists; pass --force to replace it")


def _baseline(c: EvalConfig) -> Artifact | None:
    return None if c.baseline is None else load(c.baseline, kind="eval")


def read_members(c: EvalConfig, held_out: list[str]) -> list[str]:
    """MIA members: forget-train texts, minus any that is also a held-out (non-member) text."""
    texts, held = read_texts(c.forget_train, c.field, limit=c.n_prompts), set(held_out)
    return filter_texts(texts, lambda t: t not in held, c.forget_train,
                        "not also in the held-out forget texts")


def run(config: EvalConfig, out: Path | str, *, force: bool = False,
        progress: Progress = SILENT) -> Artifact:
    """Evaluate as ``config`` says; write and return the ``eval`` artifact at ``out``."""
    out = Path(out)
    _check_out(out, force)
    sets = read_sets(config)
    members = read_members(config, sets[0].texts) if config.forget_train else None
    arm, baseline = arm_name(config), _baseline(config)
    if config.layers:
        load(config.layers, kind="layers")  # a bad artifact fails before the model loads
    got = measure(config, sets, members, progress)
    records = build_records(config, sets, got)
    metrics = build_metrics(config, sets, got, records, baseline)
    settings = {**config.to_dict(), "arm": arm, "seed": replicate_seed(config),
                "eval_seed": config.seed,
                "data": data_record(config, sets), "interventions": got.applied}
    files = {**records.files(), "rates.png": em.chart_png(metrics, [s.name for s in sets], arm)}
    return save(out, "eval", tensors={}, config=settings, model=got.identity,
                parents=parent_paths(config), metrics=metrics, files=files, force=force)
