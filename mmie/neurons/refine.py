"""`neurons refine`: keep a selected neuron only if ablating it hurts the forget language more
than every protected language, measured.

Selections from activation statistics (LAPE, even ``--exclusive``) say where a neuron *fires*,
not what it *does*: issue #20 measured LAPE's Hindi neurons raising the NLL of Urdu, Punjabi and
Bengali by as much as Hindi's when ablated. Here every selected neuron ``j`` is ablated on its
own (its activation set to 0 by a pre-hook on the down projection, as in :func:`ablated`) and
the mean next-token NLL of a fixed sample of texts per language is measured against the
unablated model:

    effect_l(j) = NLL_l(model without j) - NLL_l(model)

``j`` is kept when ``effect_forget(j) > min_effect`` and, for every protected language ``p``,
``effect_p(j) <= max_ratio * effect_forget(j)``: ablating it costs the forget language at least
``1 / max_ratio`` times what it costs any protected one. The texts are fixed (the first
``n_texts`` of each file), so the rule is deterministic; use texts that no later evaluation
reports on. Cost: ``1 + selected`` forward passes per language over those texts.

The result is a ``neurons`` mask artifact (role ``mask``, ``refined`` true) whose parent is the
input mask; its tensor file ``effects`` holds ``layer{i}.<language>`` per selected neuron of the
input mask, so the rule can be re-applied with other thresholds without the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mmie.core.artifacts import Artifact, save, sha256_file
from mmie.core.data import read_texts
from mmie.core.errors import DataError
from mmie.core.hooks import HookSpec, hooked
from mmie.core.models import ModelSpec, loaded
from mmie.core.progress import SILENT, Progress
from mmie.edits.neurons import load_mask, mask_counts, mask_mlps, mask_tensors
from mmie.neurons.finetune import nll

EFFECTS_STEM = "effects"


@dataclass(frozen=True)
class RefineConfig:
    """Settings of `neurons refine`.

    neurons: the input mask artifact (e.g. ``select --lape --exclusive``).
    forget: (name, file) of the forget language. protect: (name, file) per protected language.
    n_texts, max_length, batch_size: texts per language (the first ones), tokens per text.
    max_ratio: a protected language may lose at most this share of the forget language's loss.
    min_effect: nats the forget language must lose for a neuron to count at all.
    """

    neurons: str
    forget: tuple[str, str]
    protect: tuple[tuple[str, str], ...]
    model: ModelSpec = field(default_factory=ModelSpec)
    field: str = "text"
    n_texts: int = 16
    max_length: int = 64
    batch_size: int = 8
    max_ratio: float = 0.5
    min_effect: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "forget", tuple(self.forget))
        object.__setattr__(self, "protect", tuple(tuple(p) for p in self.protect))
        names = [self.forget[0], *(n for n, _ in self.protect)]
        if not self.protect or len(set(names)) != len(names):
            raise ValueError("refine needs at least one protected language, names distinct "
                             f"from each other and from the forget language: {names}")
        if self.n_texts < 1 or self.max_length < 2 or self.batch_size < 1:
            raise ValueError("n-texts >= 1, max-length >= 2 and batch-size >= 1 are required")
        if not self.max_ratio >= 0 or not self.min_effect >= 0:
            raise ValueError("max-ratio and min-effect must be >= 0")


def keep_rule(effects: dict[str, Tensor], forget: str, max_ratio: float,
              min_effect: float) -> Tensor:
    """Bool per neuron: the module docstring's rule on measured effects."""
    own = effects[forget]
    keep = own > min_effect
    for name, value in effects.items():
        if name != forget:
            keep &= value <= max_ratio * own
    return keep


def _mean_nll(lm, texts: list[str], c: RefineConfig) -> float:
    total = 0.0
    for start in range(0, len(texts), c.batch_size):
        chunk = texts[start:start + c.batch_size]
        total += float(nll(lm, chunk, c.max_length)) * len(chunk)
    return total / len(texts)


def _zero(index: int) -> Callable:
    def hook(module, args):
        x = args[0].clone()
        x[..., index] = 0
        return (x, *args[1:])

    return hook


def measure_effects(lm, masks: dict[int, Tensor], sets: dict[str, list[str]], c: RefineConfig,
                    where: str, progress: Progress = SILENT) -> dict[int, dict[str, Tensor]]:
    """``{layer: {language: effect per selected neuron}}`` (in the mask's order)."""
    mlps = mask_mlps(lm, masks, where)
    with torch.no_grad():
        clean = {name: _mean_nll(lm, texts, c) for name, texts in sets.items()}
        out: dict[int, dict[str, Tensor]] = {}
        total = sum(int(m.sum()) for m in masks.values())
        with progress.task("ablate each neuron", total=total) as task:
            for layer, mask in sorted(masks.items()):
                ids = mask.nonzero().flatten().tolist()
                cells = {name: torch.zeros(len(ids)) for name in sets}
                for k, j in enumerate(ids):
                    with hooked([HookSpec(mlps[layer].down, _zero(j), pre=True)]):
                        for name, texts in sets.items():
                            cells[name][k] = _mean_nll(lm, texts, c) - clean[name]
                    task.advance()
                out[layer] = cells
    return out


def _refined(masks: dict[int, Tensor], effects: dict[int, dict[str, Tensor]],
             c: RefineConfig) -> dict[int, Tensor]:
    refined = {}
    for layer, mask in masks.items():
        new = torch.zeros_like(mask)
        if layer in effects and mask.any():
            keep = keep_rule(effects[layer], c.forget[0], c.max_ratio, c.min_effect)
            new[mask.nonzero().flatten()[keep]] = True
        refined[layer] = new
    return refined


def _sets(c: RefineConfig) -> dict[str, list[str]]:
    sets = {}
    for name, path in (c.forget, *c.protect):
        sets[name] = read_texts(path, c.field, c.n_texts)
        if not sets[name]:
            raise DataError(f"{path}: no text for language {name}")
    return sets


def run_refine(c: RefineConfig, out: Path | str, *, force: bool = False,
               progress: Progress = SILENT) -> Artifact:
    """Measure every selected neuron's effect, apply the rule, save the refined mask."""
    sets = _sets(c)
    with loaded(c.model) as lm:
        parent, masks = load_mask(c.neurons, lm.identity)
        effects = measure_effects(lm, masks, sets, c, str(parent.path), progress)
        identity = lm.identity
    refined = _refined(masks, effects, c)
    tensors = {**mask_tensors(refined),
               EFFECTS_STEM: {f"layer{i}.{name}": v.contiguous() for i, cells in effects.items()
                              for name, v in cells.items()}}
    config = {"role": "mask", "refined": True, "exclusive": bool(parent.config.get("exclusive")),
              **asdict(c), "model": asdict(c.model),
              "data": {name: {"path": path, "n": len(sets[name]),
                              "sha256": sha256_file(Path(path)) if Path(path).is_file() else None}
                       for name, path in (c.forget, *c.protect)}}
    measured = {name: torch.cat([e[name] for e in effects.values()]) for name in sets}
    metrics = {"input": mask_counts(masks), "kept": mask_counts(refined),
               "mean_effect": {name: float(v.mean()) for name, v in measured.items() if len(v)}}
    return save(out, "neurons", tensors=tensors, config=config, model=identity,
                parents=[parent.path], metrics=metrics, force=force)
