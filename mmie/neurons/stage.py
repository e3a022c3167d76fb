"""Neuron-level analysis: score MLP neurons on a text set, select a set, ablate it.

The carried-over experiment: find the neurons that matter for one data set (Wanda scores, or
LAPE language-specific neurons), freeze them and fine-tune (:mod:`mmie.neurons.finetune`), score
again and ask whether the frozen neurons' importance drifts or stays
(:mod:`mmie.neurons.compare`). What a score is, exactly, is in :mod:`mmie.neurons.scores`.

Selections (role ``mask``; tensor file ``mask`` with a bool ``layer{i}.selected`` per layer):

- ``diff``: neurons in the top ``top`` share of the target set's scores and not in the top
  ``top`` share of the reference set's (a set difference). ``scope='layer'`` ranks within each
  layer (``ceil(top * d_ff)`` per layer), ``'global'`` over all scored neurons at once.
- ``lape``: LAPE (Tang et al. 2024). Per language ``l``, ``p_l = P(act > 0)``; normalised over
  languages, the entropy ``H = -sum q_l log q_l``. A neuron is a candidate when ``p_l`` exceeds
  the activity threshold in some language (``min_prob``, or else the ``prob_quantile`` of all
  probabilities); of the candidates, the ``lape_quantile`` share of all neurons with the lowest
  entropy is language-specific, and the mask holds those active above the threshold in
  ``target_lang``. Ranked over all layers at once, as in the paper. With ``exclusive``, a
  neuron stays only if it is selected for ``target_lang`` and for none of the other languages
  (the protected ones): LAPE alone also keeps neurons active in several languages, e.g. ones
  that fire on Hindi, Urdu, Punjabi and Bengali alike but not on English (issue #20), which
  are "not English" neurons rather than Hindi ones.

:func:`ablated` scales the selected neurons' activations (a pre-hook on down_proj) while a
block runs: one more unlearning arm for `evaluate` and `gate`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmie.core.artifacts import Artifact, ModelIdentity, save, sha256_file
from mmie.core.data import read_texts, sample
from mmie.core.errors import ArtifactError, MetricError
from mmie.core.generation import GenerationSettings, generate
from mmie.core.models import LoadedModel, ModelSpec, loaded
from mmie.core.progress import SILENT, Progress
from mmie.edits.neurons import (
    ablated,
    load_mask,
    load_role,
    mask_counts,
    mask_tensors,
    per_layer,
    resolve_layout,
)
from mmie.neurons.finetune import applied, nll
from mmie.neurons.scores import collect, lape_masks, score_tensors

SCORES_STEM, LANG_PREFIX = "scores", "lang_"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _check_names(pairs: Sequence[tuple[str, str]], what: str) -> None:
    names = [name for name, _ in pairs]
    if bad := [n for n in names if not _NAME.match(n)]:
        raise ValueError(f"{what} names may use letters, digits, '_' and '-' only: {bad}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names repeat: {', '.join(names)}")


# --- score ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoreConfig:
    """Settings of `neurons score`.

    model: the base model; adapter: a fine-tune to apply first (an ``adapter`` artifact or a
        ``neurons`` finetune artifact), so before/after scores come from the same base.
    data: the text set whose Wanda scores are computed; field: its JSON field / column.
    langs: (name, file) sets whose activation probabilities are stored too (for LAPE).
    layers: blocks to score; None = all.
    max_samples: texts used per set (a seeded sample; None = all); seed: that sample's seed.
    max_length, batch_size: tokens per text and texts per forward pass.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: str = ""
    field: str = "text"
    langs: tuple[tuple[str, str], ...] = ()
    adapter: str | None = None
    layers: tuple[int, ...] | None = None
    max_samples: int | None = 200
    max_length: int = 128
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "langs", tuple(tuple(x) for x in self.langs))
        if not self.data:
            raise ValueError("a data file is required")
        _check_names(self.langs, "--lang")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"layers must be non-empty block indices >= 0, got {self.layers}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.max_length < 2 or self.batch_size < 1:
            raise ValueError("max_length must be >= 2 and batch_size >= 1")

    def to_dict(self) -> dict:
        return {**asdict(self), "model": asdict(self.model)}


def _score_sets(c: ScoreConfig) -> dict[str, tuple[str, str, list[str]]]:
    """Tensor stem -> (label, path, texts); read before the model loads, so bad files fail fast."""
    read = lambda path: sample(read_texts(path, c.field), c.max_samples, c.seed)  # noqa: E731
    return {SCORES_STEM: (Path(c.data).name, c.data, read(c.data)),
            **{f"{LANG_PREFIX}{name}": (name, path, read(path)) for name, path in c.langs}}


def _layers(lm: LoadedModel, layers: tuple[int, ...] | None) -> list[int]:
    chosen = sorted(set(layers)) if layers is not None else list(range(lm.n_layers))
    if bad := [i for i in chosen if i >= lm.n_layers]:
        raise ValueError(f"layers {bad} out of range: {lm.identity.name} has {lm.n_layers} "
                         f"blocks (0..{lm.n_layers - 1})")
    return chosen


def run_score(config: ScoreConfig, out: Path | str, *, force: bool = False,
              progress: Progress = SILENT) -> Artifact:
    """Score every MLP neuron of the chosen layers on each set (see :mod:`neuron_scores`)."""
    sets = _score_sets(config)
    with loaded(config.model) as lm, applied(lm, config.adapter):
        layers, tensors, counts, done = _layers(lm, config.layers), {}, {}, {}
        for stem, (label, path, texts) in sets.items():
            if path not in done:  # a --lang file that is also --data is scored once
                stats = collect(lm, texts, layers, max_length=config.max_length,
                                batch_size=config.batch_size, progress=progress,
                                desc=f"neurons {label}")
                done[path] = (score_tensors(lm, stats, layers),
                              {"n_texts": len(texts), "n_tokens": stats.n_tokens})
            tensors[stem] = {k: v.clone() for k, v in done[path][0].items()}
            counts[stem] = done[path][1]
        settings = {**config.to_dict(), "role": "scores", "layers": layers,
                    "layout": resolve_layout(lm.blocks[layers[0]]).name,
                    "data_sha256": sha256_file(Path(config.data))}
        wanda = per_layer(tensors[SCORES_STEM], "wanda")
        metrics = {"sets": counts, "wanda_mean": {i: float(w.mean()) for i, w in wanda.items()}}
        parents = [config.adapter] if config.adapter else []
        return save(out, "neurons", tensors=tensors, config=settings, model=lm.identity,
                    parents=parents, metrics=metrics, force=force)


# --- select -----------------------------------------------------------------------------------

class SelectMethod(str, Enum):
    DIFF = "diff"
    LAPE = "lape"


class Scope(str, Enum):
    LAYER = "layer"
    GLOBAL = "global"


@dataclass(frozen=True)
class SelectConfig:
    """Settings of `neurons select` (methods in the module docstring).

    method: ``diff`` or ``lape``.
    target, reference: ``diff``: score artifacts of the set whose neurons are wanted and of the
        set they must not matter for. ``lape``: ``target`` (optional) contributes its --lang sets.
    top: share of neurons counted as "top" (0 < top <= 1); scope: ``layer`` or ``global``.
    score: the score quantity ranked by ``diff`` (``wanda``, ``act_norm``, ``up_proj.rows``...).
    langs: ``lape``: (name, score artifact) pairs; each artifact's main set is that language.
    target_lang: ``lape``: the language whose neurons form the mask; None = the first one.
    lape_quantile: share of all neurons with the lowest entropy that may be specific.
    min_prob: activity threshold; None = the ``prob_quantile`` of all probabilities.
    exclusive: ``lape``: keep only neurons selected for ``target_lang`` and no other language.
    """

    method: SelectMethod = SelectMethod.DIFF
    target: str | None = None
    reference: str | None = None
    top: float = 0.03
    scope: Scope = Scope.LAYER
    score: str = "wanda"
    langs: tuple[tuple[str, str], ...] = ()
    target_lang: str | None = None
    lape_quantile: float = 0.01
    min_prob: float | None = None
    prob_quantile: float = 0.95
    exclusive: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", SelectMethod(self.method))
        object.__setattr__(self, "scope", Scope(self.scope))
        object.__setattr__(self, "langs", tuple(tuple(x) for x in self.langs))
        _check_names(self.langs, "--lang")
        if self.method is SelectMethod.DIFF and not (self.target and self.reference):
            raise ValueError("diff selection needs --target and --reference score artifacts")
        if self.method is SelectMethod.LAPE and not (self.langs or self.target):
            raise ValueError("--lape needs --lang NAME=DIR score artifacts (or --target)")
        for name in ("top", "lape_quantile", "prob_quantile"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.exclusive and self.method is not SelectMethod.LAPE:
            raise ValueError("--exclusive applies to --lape selections")
        if self.min_prob is not None and not 0 <= self.min_prob < 1:
            raise ValueError(f"min_prob must be in [0, 1), got {self.min_prob}")

    def to_dict(self) -> dict:
        return {**asdict(self), "method": self.method.value, "scope": self.scope.value}


@dataclass
class Selection:
    masks: dict[int, Tensor]
    parents: list[str]
    model: ModelIdentity | None
    metrics: dict = field(default_factory=dict)


def top_share(scores: dict[int, Tensor], share: float, scope: Scope) -> dict[int, Tensor]:
    """Bool masks of the ``ceil(share * n)`` highest scores, per layer or over all layers."""
    if scope is Scope.LAYER:
        return {i: _top(s, share) for i, s in scores.items()}
    flat = _top(torch.cat([scores[i] for i in scores]), share)
    return dict(zip(scores, flat.split([len(s) for s in scores.values()]), strict=True))


def _top(values: Tensor, share: float) -> Tensor:
    order = torch.sort(values.float(), descending=True, stable=True).indices  # ties: lower index
    mask = torch.zeros(len(values), dtype=torch.bool)
    mask[order[:math.ceil(share * len(values))]] = True
    return mask


def _same_layers(a: dict[int, Tensor], b: dict[int, Tensor], where: str) -> None:
    shapes = lambda d: {i: tuple(t.shape) for i, t in d.items()}  # noqa: E731
    if shapes(a) != shapes(b):
        raise ArtifactError(f"{where}: scored layers / widths differ: {shapes(a)} vs {shapes(b)}")


def _select_diff(c: SelectConfig) -> Selection:
    target = load_role(c.target, ("scores",))
    reference = load_role(c.reference, ("scores",), target.model)
    t_scores = per_layer(target.tensors(SCORES_STEM), c.score, str(target.path))
    r_scores = per_layer(reference.tensors(SCORES_STEM), c.score, str(reference.path))
    _same_layers(t_scores, r_scores, f"{c.target} vs {c.reference}")
    t_top, r_top = top_share(t_scores, c.top, c.scope), top_share(r_scores, c.top, c.scope)
    masks = {i: t_top[i] & ~r_top[i] for i in t_top}
    overlap = {i: int((t_top[i] & r_top[i]).sum()) for i in t_top}
    return Selection(masks, [c.target, c.reference], target.model,
                     {"top_target": {i: int(m.sum()) for i, m in t_top.items()},
                      "overlap_with_reference": overlap})


def _lape_sets(c: SelectConfig) -> tuple[dict[str, dict[int, Tensor]], list[Artifact]]:
    probs, arts = {}, []
    if c.target:
        arts.append(target := load_role(c.target, ("scores",)))
        for stem in target.tensor_files():
            if stem.startswith(LANG_PREFIX):
                probs[stem.removeprefix(LANG_PREFIX)] = per_layer(target.tensors(stem), "act_prob")
    for name, path in c.langs:
        if name in probs:
            raise ValueError(f"language '{name}' given twice (--lang and the target's sets)")
        arts.append(art := load_role(path, ("scores",), arts[0].model if arts else None))
        probs[name] = per_layer(art.tensors(SCORES_STEM), "act_prob", path)
    if len(probs) < 2:
        raise MetricError(f"LAPE needs at least 2 languages, got {sorted(probs) or 'none'}")
    return probs, arts


def _select_lape(c: SelectConfig) -> Selection:
    probs, arts = _lape_sets(c)
    names = list(probs)
    target = c.target_lang or names[0]
    if target not in probs:
        raise ValueError(f"target language '{target}' not among {', '.join(names)}")
    first = probs[names[0]]
    for name in names[1:]:
        _same_layers(first, probs[name], f"LAPE sets {names[0]} vs {name}")
    layers, widths = list(first), [len(t) for t in first.values()]
    prob = torch.stack([torch.cat([probs[n][i] for i in layers]) for n in names]).double()
    threshold = (c.min_prob if c.min_prob is not None
                 else float(np.quantile(prob.numpy(), c.prob_quantile)))
    per_lang = lape_masks(prob, c.lape_quantile, threshold)
    mine = per_lang[names.index(target)]
    counts = {n: int(per_lang[k].sum()) for k, n in enumerate(names)}
    shared = {n: int((mine & per_lang[k]).sum()) for k, n in enumerate(names) if n != target}
    if c.exclusive:
        others = [k for k, n in enumerate(names) if n != target]
        mine = mine & ~per_lang[others].any(0)
    masks = dict(zip(layers, mine.split(widths), strict=True))
    return Selection(masks, [str(a.path) for a in arts], arts[0].model,
                     {"threshold": threshold, "target_lang": target, "per_language": counts,
                      "shared_with": shared, "exclusive": c.exclusive})


SELECTORS: dict[SelectMethod, Callable[[SelectConfig], Selection]] = {
    SelectMethod.DIFF: _select_diff, SelectMethod.LAPE: _select_lape}


def run_select(config: SelectConfig, out: Path | str, *, force: bool = False) -> Artifact:
    """Select neurons from score artifacts and save the masks (role ``mask``)."""
    chosen = SELECTORS[config.method](config)
    return save(out, "neurons", tensors=mask_tensors(chosen.masks),
                config={**config.to_dict(), "role": "mask"}, model=chosen.model,
                parents=chosen.parents, metrics={**mask_counts(chosen.masks), **chosen.metrics},
                force=force)


# --- ablate -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AblateConfig:
    """Settings of `neurons ablate`.

    model: the base model; neurons: a mask artifact; scale: factor on the selected neurons'
        activations (0 removes them, 1 leaves the model unchanged).
    prompts: prompts continued before and after (greedy, ``max_new_tokens``) as a demo.
    data: optional texts whose mean NLL is measured before and after (``max_samples`` of them,
        ``max_length`` tokens each); field: their JSON field / column.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    neurons: str = ""
    scale: float = 0.0
    prompts: tuple[str, ...] = ()
    max_new_tokens: int = 32
    data: str | None = None
    field: str = "text"
    max_samples: int = 32
    max_length: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.neurons:
            raise ValueError("a neurons mask artifact is required")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be finite, got {self.scale}")
        if self.max_new_tokens < 1 or self.max_samples < 1 or self.max_length < 2:
            raise ValueError("max_new_tokens and max_samples must be >= 1, max_length >= 2")

    def to_dict(self) -> dict:
        return {**asdict(self), "model": asdict(self.model)}


@torch.no_grad()
def _mean_nll(lm: LoadedModel, texts: list[str], c: AblateConfig) -> float:
    losses = [float(nll(lm, texts[i:i + 8], c.max_length)) for i in range(0, len(texts), 8)]
    return sum(losses) / len(losses)


def _measure(lm: LoadedModel, c: AblateConfig, texts: list[str] | None) -> dict:
    settings = GenerationSettings(max_new_tokens=c.max_new_tokens)
    return {"generations": [g.text for g in generate(lm, list(c.prompts), settings)],
            "nll": _mean_nll(lm, texts, c) if texts else None}


def run_ablate(config: AblateConfig, out: Path | str, *, force: bool = False) -> Artifact:
    """Save an ablation arm (mask + scale, role ``ablation``) with a before/after demo."""
    texts = read_texts(config.data, config.field, config.max_samples) if config.data else None
    with loaded(config.model) as lm:
        _, masks = load_mask(config.neurons, lm.identity)
        before = _measure(lm, config, texts)
        with ablated(lm, config.neurons, config.scale):
            after = _measure(lm, config, texts)
        demo = [{"prompt": p, "before": b, "after": a} for p, b, a in
                zip(config.prompts, before["generations"], after["generations"], strict=True)]
        missing = {"value": None, "missing": "no data file given"}
        nll_metrics = {f"nll_{k}": v["nll"] if texts else missing
                       for k, v in (("before", before), ("after", after))}
        files = {"demo.jsonl": "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in demo)}
        return save(out, "neurons", tensors=mask_tensors(masks),
                    config={**config.to_dict(), "role": "ablation"}, model=lm.identity,
                    parents=[config.neurons], metrics={**mask_counts(masks), **nll_metrics},
                    files=files, force=force)
