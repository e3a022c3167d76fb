"""Steering recovery: does one direction added back at one layer bring the forget language back?

The direction is the difference of the mean pooled block outputs of forget-language and
replacement-language training texts (a difference-of-means steering vector, as in contrastive
activation addition, Rimsky et al. 2024 "Steering Llama 2 via contrastive activation addition";
issue #19 cites Xiang et al. 2026 for one such direction recovering 50-90% of cross-lingually
"unlearned" knowledge). It is computed on the model as given (arm applied, as an attacker who
only has the deployed model would), then ``scale * direction`` is added to the block's output at
every position while prompts are continued. The forget-language rate of the continuations
(:func:`mmie.lid.detect`) with and without the addition is the measure: a rate that comes back
means the language was hidden behind a direction, not removed.

`mmie steer` (:func:`run`) measures it for the base model and an arm in one model load: the
direction is estimated on each as deployed, from training texts only (prompts that are also
training texts are refused), added at each chosen block and scale in turn, and every held-out
prompt is continued greedily as `evaluate` does. Per run: the forget-language rate with an exact
95% interval; for the arm, the recovery fraction ``(arm(k) - arm(0)) / (base(0) - arm(0))`` with
a bootstrap interval paired over prompts (1 = steering gives back the base model's rate).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mmie.core.activations import harvest
from mmie.core.artifacts import Artifact, save, sha256_file
from mmie.core.bounds import LESS, cp_bound
from mmie.core.data import read_texts
from mmie.core.errors import ArtifactError, DataError
from mmie.core.generation import EVAL_REPETITION_PENALTY, GenerationSettings, generate
from mmie.core.head_precision import HEAD_DTYPES, head_precision
from mmie.core.hooks import edit_blocks
from mmie.core.models import LoadedModel, ModelSpec, loaded
from mmie.core.progress import SILENT, Progress
from mmie.depth.arms import ArmSpec, applied
from mmie.depth.recovery import Sums, recovery_interval
from mmie.edits.adapters import check_layers
from mmie.lid.detect import detect


def steering_direction(lm: LoadedModel, forget: Sequence[str], other: Sequence[str],
                       layer: int, *, max_length: int = 128,
                       batch_size: int = 8) -> torch.Tensor:
    """Mean pooled output of block ``layer`` on ``forget`` minus that on ``other`` ([d])."""
    if not forget or not other:
        raise DataError("a steering direction needs forget and replacement texts")
    check_layers(lm, [layer])
    kw = dict(max_length=max_length, batch_size=batch_size, token_sample=0)
    means = [harvest(lm, list(texts), [layer], **kw).pooled[layer].mean(0)
             for texts in (forget, other)]
    return means[0] - means[1]


@contextmanager
def steered(lm: LoadedModel, layer: int, vector: torch.Tensor,
            scale: float = 1.0) -> Iterator[None]:
    """Inside, block ``layer``'s output is ``h + scale * vector`` at every position."""
    added = vector.detach() * scale

    def add(hidden: torch.Tensor) -> torch.Tensor:
        return hidden + added.to(hidden.device, hidden.dtype)

    with edit_blocks(lm.blocks, {layer: add}):
        yield


def forget_rate(texts: Sequence[str], forget_lang: str) -> float:
    """Share of ``texts`` whose detected language is ``forget_lang``."""
    if not texts:
        raise DataError("no texts to detect the language of")
    return sum(r.lang == forget_lang for r in detect(list(texts))) / len(texts)


@dataclass(frozen=True)
class SteeringConfig:
    """forget_train, replacement_train: texts the direction is estimated from (training data).
    prompts: prompts continued with and without the direction. scales: 0 = without.
    """

    forget_train: tuple[str, ...]
    replacement_train: tuple[str, ...]
    prompts: tuple[str, ...]
    layer: int
    scales: tuple[float, ...] = (0.0, 1.0, 2.0)
    forget_lang: str = "hi"
    arm: ArmSpec = ArmSpec()
    settings: GenerationSettings = GenerationSettings(max_new_tokens=32)
    max_length: int = 128

    def __post_init__(self) -> None:
        if not self.forget_train or not self.replacement_train or not self.prompts:
            raise ValueError("forget and replacement training texts and prompts are required")
        if self.layer < 0 or not self.scales:
            raise ValueError("layer must be >= 0 and at least one scale is required")


def steering_rates(lm: LoadedModel, c: SteeringConfig,
                   progress: Progress = SILENT) -> list[dict]:
    """``[{scale, forget_rate, n}]`` on ``lm`` as it is (wrap in an arm to measure an arm)."""
    direction = steering_direction(lm, c.forget_train, c.replacement_train, c.layer,
                                   max_length=c.max_length)
    rows = []
    for scale in c.scales:
        ctx = steered(lm, c.layer, direction, scale) if scale else nullcontext()
        with ctx:
            gens = generate(lm, list(c.prompts), c.settings, progress=progress,
                            desc=f"steer x{scale:g}")
        rows.append({"scale": float(scale), "n": len(gens),
                     "forget_rate": forget_rate([g.text for g in gens], c.forget_lang)})
    return rows


def steering_recovery(c: SteeringConfig, model, progress: Progress = SILENT) -> dict:
    """Load ``model`` (a ModelSpec), apply the arm, and measure :func:`steering_rates`."""
    with loaded(model) as lm, applied(lm, c.arm) as record:
        rows = steering_rates(lm, c, progress)
    return {"arm": record["arm"], "layer": c.layer, "rates": rows}


# --------------------------------------------------------------------------- `mmie steer`
@dataclass(frozen=True)
class SteerRunConfig:
    """Settings of `mmie steer` (files, not texts; the artifact records their hashes).

    forget_train, replacement_train: training texts the direction is estimated from (never
        the prompts). prompts: forget-language prompts to continue (held-out test texts).
    layers: blocks a direction is added at, one at a time. scales: multiples of the direction
        (0 is always measured: the unsteered rate).
    n_prompts, max_samples: prompts used; texts per training set.
    max_new_tokens, repetition_penalty, head_dtype: generation as in `evaluate`.
    n_boot: bootstrap resamples of the recovery fraction (paired over prompts).
    """

    forget_train: str
    replacement_train: str
    prompts: str
    layers: tuple[int, ...]
    scales: tuple[float, ...] = (1.0, 2.0)
    forget_lang: str = "hi"
    arm: ArmSpec = ArmSpec()
    model: ModelSpec = ModelSpec()
    field: str = "text"
    n_prompts: int = 60
    max_samples: int | None = 200
    max_new_tokens: int = 32
    repetition_penalty: float = EVAL_REPETITION_PENALTY
    head_dtype: str = "fp32"
    max_length: int = 128
    n_boot: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales if s != 0))
        if not self.layers or min(self.layers) < 0 or not self.scales:
            raise ValueError("at least one block >= 0 and one non-zero scale are required")
        if self.n_prompts < 2 or self.max_new_tokens < 1 or self.n_boot < 1:
            raise ValueError("n-prompts >= 2, max-new-tokens >= 1 and n-boot >= 1 are required")
        if self.head_dtype not in HEAD_DTYPES:
            raise ValueError(f"head dtype must be one of {sorted(HEAD_DTYPES)}")


def _texts(c: SteerRunConfig) -> dict[str, list[str]]:
    sets = {"forget_train": read_texts(c.forget_train, c.field, c.max_samples),
            "replacement_train": read_texts(c.replacement_train, c.field, c.max_samples),
            "prompts": read_texts(c.prompts, c.field, c.n_prompts)}
    if len(sets["prompts"]) < 2 or not sets["forget_train"] or not sets["replacement_train"]:
        raise DataError("steer needs >= 2 prompts and non-empty training sets")
    if overlap := set(sets["prompts"]) & set(sets["forget_train"]):
        raise DataError(f"{len(overlap)} prompts are also direction-training texts: the "
                        "direction must come from training data, the prompts from held-out text")
    return sets


def _condition(lm: LoadedModel, c: SteerRunConfig, sets: dict[str, list[str]],
               progress: Progress, tag: str) -> dict[str, list[dict]]:
    """``{"0": rows, "<layer>x<scale>": rows}``: one generation per prompt each, LID-labelled."""
    settings = GenerationSettings(max_new_tokens=c.max_new_tokens,
                                  repetition_penalty=c.repetition_penalty, seed=c.seed)
    runs = {"0": nullcontext()}
    for layer in c.layers:
        direction = steering_direction(lm, sets["forget_train"], sets["replacement_train"],
                                       layer, max_length=c.max_length)
        runs.update({f"{layer}x{s:g}": steered(lm, layer, direction, s) for s in c.scales})
    out = {}
    for key, ctx in runs.items():
        with ctx:
            gens = generate(lm, sets["prompts"], settings, progress=progress,
                            desc=f"{tag} {key}")
        langs = detect([g.text for g in gens])
        out[key] = [{"text": g.text, "lang": r.lang, "forget": r.lang == c.forget_lang}
                    for g, r in zip(gens, langs, strict=True)]
    return out


def measure_steering(c: SteerRunConfig, progress: Progress = SILENT):
    """Continuations of every prompt, unsteered and steered, for base (and arm), one load."""
    sets = _texts(c)
    with loaded(c.model) as lm, head_precision(c.head_dtype):
        check_layers(lm, list(c.layers))
        got = {"base": _condition(lm, c, sets, progress, "base")}
        record: dict = {}
        if not c.arm.is_base:
            with applied(lm, c.arm) as record:
                got["arm"] = _condition(lm, c, sets, progress, "arm")
        return sets, got, record, lm.identity


def _rate(rows: list[dict]) -> dict:
    x, n = sum(r["forget"] for r in rows), len(rows)
    return {"x": x, "n": n, "rate": x / n, "low": cp_bound(x, n, 0.025, "greater"),
            "high": cp_bound(x, n, 0.025, LESS)}


def _sums(rows: list[dict]) -> Sums:
    return Sums.of([float(r["forget"]) for r in rows], [1.0] * len(rows))


def _no_negative_zero(cell: dict) -> dict:
    """0/-x is -0.0: shown as "-0.00", it reads as a (tiny) negative recovery; it is none."""
    return {k: v + 0.0 if isinstance(v, float) else v for k, v in cell.items()}


def summarise(got: dict[str, dict[str, list[dict]]], c: SteerRunConfig) -> dict:
    """Forget rate (exact 95% interval) per condition and run; for the arm, the recovery
    fraction ``(arm(k) - arm(0)) / (base(0) - arm(0))`` of each steered run, paired over
    prompts (:func:`mmie.depth.recovery.recovery_interval`)."""
    out: dict = {cond: {key: _rate(rows) for key, rows in runs.items()}
                 for cond, runs in got.items()}
    if "arm" in got:
        before, base = _sums(got["arm"]["0"]), _sums(got["base"]["0"])
        out["recovery"] = {key: _no_negative_zero(recovery_interval(
            before, _sums(rows), base, n_boot=c.n_boot, seed=c.seed))
            for key, rows in got["arm"].items() if key != "0"}
    return out


def _samples(sets: dict[str, list[str]], got: dict) -> str:
    rows = [{"condition": cond, "run": key, "idx": i, "prompt": sets["prompts"][i], **row}
            for cond, runs in got.items() for key, rs in runs.items() for i, row in enumerate(rs)]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def run(config: SteerRunConfig, out: Path | str, *, force: bool = False,
        progress: Progress = SILENT) -> Artifact:
    """Measure, save and return the ``steering`` artifact (see the module docstring)."""
    if Path(out).exists() and not force:
        raise ArtifactError(f"{out} already exists; pass --force to replace it")
    sets, got, record, identity = measure_steering(config, progress)
    metrics = {"arm_name": record.get("arm", "base"), "layers": list(config.layers),
               "scales": list(config.scales), "forget_lang": config.forget_lang,
               **summarise(got, config),
               "data": {name: {"path": str(getattr(config, name)), "n": len(texts),
                               "sha256": sha256_file(Path(getattr(config, name)))
                               if Path(getattr(config, name)).is_file() else None}
                        for name, texts in sets.items()}}
    settings = {**asdict(config), "applied": {k: v for k, v in record.items() if k != "arm"}}
    parents = [Path(p) for p in (config.arm.adapter, config.arm.sae, config.arm.scrub,
                                 config.arm.neurons) if p]
    return save(out, "steering", tensors={}, config=settings, model=identity, parents=parents,
                metrics=metrics, files={"samples.jsonl": _samples(sets, got)}, force=force)
