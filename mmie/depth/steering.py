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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from mmie.core.activations import harvest
from mmie.core.errors import DataError
from mmie.core.generation import GenerationSettings, generate
from mmie.core.hooks import edit_blocks
from mmie.core.models import LoadedModel, loaded
from mmie.core.progress import SILENT, Progress
from mmie.depth.arms import ArmSpec, applied
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
