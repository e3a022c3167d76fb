"""`evaluate`'s settings and its prompt sets: everything read and checked before a model loads.

Prompts are the first ``n_prompts`` texts of each file, never a seeded sample: arms evaluated
with different seeds must pair by ``(set, idx)`` on the same prompts. A prompt is the first
``prompt_frac`` of a sentence (:func:`mmie.core.data.split_prompt`); adversarial texts are
instructions and are used whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from mmie.core.body_precision import BODY_DTYPES
from mmie.core.data import filter_texts, read_texts, split_prompt
from mmie.core.generation import EVAL_REPETITION_PENALTY, GenerationSettings
from mmie.core.head_precision import HEAD_DTYPES
from mmie.core.models import ModelSpec
from mmie.core.provenance import file_hash
from mmie.metrics.definitions import ROMAN_SUFFIX


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
        ``gate_strength`` overriding the artifact's strength. ``adapter`` may be a ``neurons``
        mask or ablation artifact (its neurons scaled by ``neuron_scale``; default the
        artifact's scale, 0 for a mask: :func:`mmie.edits.neurons.arm_scale`).
    arm: name recorded for `gate`; None derives it (:func:`arm_name`).
    n_prompts: texts used per set (the first ones of each file).
    max_new_tokens, batch_size, temperature, top_p, seed: generation (greedy unless a
        temperature is given); seed also seeds the probe folds. batch_size (64) also batches
        the scoring passes; on CPU 64 prompts per batch decode about 2x faster per prompt than
        16 (the body's matmuls fill the cores; ``bench/bench_decode.py``), same tokens.
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
    fluency_tolerance: nats per token above the retain reference's median fluency NLL that a
        continuation may score and still be ``fluent`` (:mod:`mmie.metrics.fluency`).
    head_dtype: ``fp32`` or ``bf16``: precision of the LM-head matmul while generating and
        scoring (:mod:`mmie.core.head_precision`): bf16 keeps each row's largest logits, the
        scored labels and every sum fp32, so greedy continuations are the fp32 ones and
        log-probabilities move by under 0.004 nats; fp32 is the plain path, bit for bit.
    body_dtype: ``fp32`` or ``bf16``: precision of the decoder body's linear layers
        (:mod:`mmie.core.body_precision`). bf16 is much faster on CPUs with AMX / AVX-512
        BF16 but changes some greedy continuations, so it is recorded in ``data`` (the
        baseline and every arm must use the same) and is off by default.
    engine: greedy decoding by mmie's loop where it applies (``auto``: the same tokens as
        transformers' ``generate``, faster on CPU) or always by ``generate``
        (``transformers``); see :class:`mmie.core.generation.GenerationSettings`.
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
    neuron_scale: float | None = None
    arm: str | None = None
    n_prompts: int = 16
    max_new_tokens: int = 48
    batch_size: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = EVAL_REPETITION_PENALTY
    seed: int = 0
    forget_lang: str = "hi"
    retain_lang: str = "en"
    replacement_lang: str = "en"
    protected: tuple[str, ...] = ("ur", "pa", "bn")
    prompt_frac: float = 0.5
    max_length: int = 256
    mink_k: float = 0.2
    fluency_tolerance: float = 1.0
    head_dtype: str = "fp32"
    body_dtype: str = "fp32"
    engine: str = "auto"
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
        if not self.fluency_tolerance >= 0:
            raise ValueError(f"fluency_tolerance must be >= 0, got {self.fluency_tolerance}")
        if self.head_dtype not in HEAD_DTYPES:
            raise ValueError(f"head dtype must be one of {', '.join(HEAD_DTYPES)}, got "
                             f"{self.head_dtype!r}")
        if self.body_dtype not in BODY_DTYPES:
            raise ValueError(f"body dtype must be one of {', '.join(BODY_DTYPES)}, got "
                             f"{self.body_dtype!r}")
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
        if self.neuron_scale is not None and (self.adapter is None
                                              or not math.isfinite(self.neuron_scale)):
            raise ValueError("--neuron-scale must be finite and needs a neurons artifact as "
                             f"--adapter (got {self.neuron_scale}, adapter {self.adapter})")

    @property
    def intervened(self) -> bool:
        return any(x is not None for x in (self.adapter, self.sae, self.scrub))

    def generation(self) -> GenerationSettings:
        # fluency is scored without the prompt (mmie.metrics.fluency), so the log-probs recorded
        # while generating are not it: none are recorded
        return GenerationSettings(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                                  temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                                  repetition_penalty=self.repetition_penalty,
                                  max_prompt_tokens=self.max_length, engine=self.engine)

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
    "romanized": (lambda c: c.forget_lang + ROMAN_SUFFIX, False),
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


def data_record(c: EvalConfig, sets: list[PromptSet]) -> dict:
    """What `gate` checks is identical between the baseline and every arm."""
    files = {s.name: file_hash(s.path) for s in sets}
    if c.forget_train:
        files["forget_train"] = file_hash(c.forget_train)
    return {"files": files, "n_prompts": c.n_prompts, "max_new_tokens": c.max_new_tokens,
            "forget_lang": c.forget_lang, "retain_lang": c.retain_lang,
            "replacement_lang": c.replacement_lang, "protected": list(c.protected),
            "prompt_frac": c.prompt_frac, "temperature": c.temperature, "top_p": c.top_p,
            "repetition_penalty": c.repetition_penalty, "max_length": c.max_length,
            "fluency": "unconditional",
            # bf16 body matmuls change continuations; absent (fp32) keeps older records equal
            **({"body_dtype": c.body_dtype} if c.body_dtype != "fp32" else {})}


def read_members(c: EvalConfig, held_out: list[str]) -> list[str]:
    """MIA members: every forget-train text, minus any that is also a held-out text."""
    texts, held = read_texts(c.forget_train, c.field), set(held_out)
    return filter_texts(texts, lambda t: t not in held, c.forget_train,
                        "not also in the held-out forget texts")


def read_mia_texts(c: EvalConfig) -> tuple[list[str], list[str]] | None:
    """(members, non-members) of the membership-inference attack, in file order: every
    forget-train text and every held-out forget text (not only the first ``n_prompts``: the
    attack is forward-only and its AUC needs texts). None without ``forget_train``."""
    if not c.forget_train:
        return None
    held = read_texts(c.forget, c.field)
    return read_members(c, held), held
