"""Checkpoints chosen on validation, never on test: the settings, the texts and the rule.

While an edit trains, every ``every`` steps (and at step 0, before the first update, and
after the last step) the validation split is scored with forward-only measures under the
current edit (:mod:`mmie.unlearn.valscore`):

* ``forget_mass``: mean probability mass on the forget language's tokens at the held-out
  continuation positions after each validation forget prompt (teacher-forced, one forward
  pass per text; :mod:`mmie.lid.mass`, after Marchisio et al. 2024, "Understanding and
  Mitigating Language Confusion in LLMs");
* ``own_mass[lang]``: each protected language's mass on its own tokens after its own prompts;
* ``retain_nll``: token-mean NLL of the validation retain texts (perplexity = exp of it).

**The rule** (:func:`choose`). A checkpoint (step > 0) *qualifies* when its retain perplexity
ratio to step 0 is at most ``max_ppl_ratio`` (1.05) and every protected language keeps at
least ``min_retention`` (0.90) of its step-0 own-language mass. The chosen checkpoint is the
qualifying one with the lowest forget mass (ties: the earliest step). Step 0 is the
unedited model (LoRA and ReFT edits start as the identity), the reference the ratios are
taken to, and never a candidate. When no checkpoint qualifies the run says so
(``qualified: false`` in the manifest) and keeps the ``fallback`` adapter: ``last`` (default:
what training without validation would have saved, so the artifact still shows what the
objective did, flagged as failing the rule) or ``step0`` (the identity edit: an arm that
changes nothing rather than one that breaks the protected languages).

A measure that is missing fails the rule: a protected language whose token set is empty (a
byte-level tokenizer with no whole-letter tokens, like the tiny test models') has no
measurable mass, so no checkpoint qualifies and the fallback is kept, flagged.

Validation texts must be new to training: a validation text whose content hash equals a
training forget or retain text's is refused (:func:`check_disjoint`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mmie.core.data import read_texts, text_hash
from mmie.core.errors import DataError

FALLBACKS = ("last", "step0")


@dataclass(frozen=True)
class ValidationConfig:
    """Validation split of an `unlearn` run and the checkpoint rule (module docstring).

    forget: held-out texts of the forget language (prompts + continuations).
    retain: held-out texts whose perplexity must not rise (e.g. English).
    protect: (lang, file) held-out texts of each protected language.
    every: steps between validations (step 0 and the last step are always scored).
    forget_lang: the forget language's code (labels its token set).
    max_ppl_ratio, min_retention: the rule's thresholds.
    fallback: ``last`` or ``step0``: the adapter kept when no checkpoint qualifies.
    prompt_frac: share of a text's words used as its prompt.
    max_samples: use at most this many texts per validation file (None: all).
    """

    forget: str
    retain: str
    protect: tuple[tuple[str, str], ...] = ()
    every: int = 10
    forget_lang: str = "hi"
    max_ppl_ratio: float = 1.05
    min_retention: float = 0.90
    fallback: str = "last"
    prompt_frac: float = 0.5
    max_samples: int | None = None

    def __post_init__(self) -> None:
        protect = self.protect.items() if isinstance(self.protect, dict) else self.protect
        object.__setattr__(self, "protect", tuple(tuple(p) for p in protect))
        if not self.forget or not self.retain:
            raise ValueError("validation needs a forget file (--val-forget) and a retain file "
                             "(--val-retain)")
        langs = [lang for lang, _ in self.protect]
        if len(set(langs)) != len(langs) or self.forget_lang in langs:
            raise ValueError(f"--val-protect languages must be distinct and not the forget "
                             f"language '{self.forget_lang}', got {', '.join(langs)}")
        if self.every < 1:
            raise ValueError(f"val-every must be >= 1, got {self.every}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"val-fallback must be one of {', '.join(FALLBACKS)}, "
                             f"got '{self.fallback}'")
        if not self.max_ppl_ratio >= 1 or not 0 <= self.min_retention <= 1:
            raise ValueError("max_ppl_ratio must be >= 1 and min_retention in [0, 1]")
        if not 0 < self.prompt_frac < 1:
            raise ValueError(f"prompt_frac must be in (0, 1), got {self.prompt_frac}")

    def paths(self) -> list[str]:
        return [self.forget, self.retain, *(p for _, p in self.protect)]

    def rule(self) -> str:
        return (f"lowest forget mass among checkpoints (step > 0) whose retain perplexity "
                f"ratio to step 0 is <= {self.max_ppl_ratio} and whose every protected "
                f"language keeps >= {self.min_retention} of its step-0 own-language mass; "
                f"ties: the earliest step; none qualifies: the {self.fallback} adapter")


@dataclass(frozen=True)
class ValTexts:
    """The validation texts, read and checked before any model loads."""

    forget: list[str]
    retain: list[str]
    protect: dict[str, list[str]]


def read_validation(c: ValidationConfig, field: str) -> ValTexts:
    read = lambda p: read_texts(p, field=field, limit=c.max_samples)  # noqa: E731
    return ValTexts(read(c.forget), read(c.retain), {lang: read(p) for lang, p in c.protect})


def check_disjoint(c: ValidationConfig, val: ValTexts, train: Sequence[str]) -> None:
    """Refuse a validation file that shares any text with the training forget/retain texts."""
    seen = {text_hash(t) for t in train}
    named = [(c.forget, val.forget), (c.retain, val.retain),
             *((p, val.protect[lang]) for lang, p in c.protect)]
    for path, texts in named:
        shared = [i for i, t in enumerate(texts) if text_hash(t) in seen]
        if shared:
            raise DataError(f"validation file {path}: {len(shared)} of {len(texts)} texts are "
                            f"also training texts (first: text {shared[0] + 1}, "
                            f"'{texts[shared[0]][:60]}'); validation must be held out")


# --- the rule (pure) ------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    """The checkpoint kept: its step, whether it met the rule, and why it was kept."""

    step: int
    qualified: bool
    reason: str


def judge(record: dict, base: dict, c: ValidationConfig) -> dict:
    """``record``'s retain perplexity ratio and per-language retention relative to ``base``
    (step 0), and whether it qualifies; a measure that is missing fails the rule."""
    ratio = None
    if record.get("retain_nll") is not None and base.get("retain_nll") is not None:
        ratio = math.exp(record["retain_nll"] - base["retain_nll"])
    retention = {}
    for lang, base_mass in (base.get("own_mass") or {}).items():
        now = (record.get("own_mass") or {}).get(lang)
        retention[lang] = now / base_mass if now is not None and base_mass else None
    ok = ratio is not None and ratio <= c.max_ppl_ratio and record.get("forget_mass") is not None \
        and all(r is not None and r >= c.min_retention for r in retention.values())
    return {"retain_ppl_ratio": ratio, "retention": retention, "qualified": bool(ok)}


def choose(records: Sequence[dict], c: ValidationConfig) -> Choice:
    """The checkpoint the rule keeps (module docstring); ``records[0]`` must be step 0."""
    if not records or records[0]["step"] != 0:
        raise ValueError("a validation curve starts with the step-0 record")
    base = records[0]
    good = [r for r in records[1:] if judge(r, base, c)["qualified"]]
    if good:
        best = min(good, key=lambda r: (r["forget_mass"], r["step"]))
        return Choice(best["step"], True, f"lowest forget mass of {len(good)} qualifying "
                                          f"checkpoint(s)")
    step = records[-1]["step"] if c.fallback == "last" else 0
    return Choice(step, False, f"no checkpoint of {len(records) - 1} met the rule; kept the "
                               f"{c.fallback} adapter (step {step})")

