"""`select-layers`: compare forget vs retain activations per layer and pick the layers to edit.

Layer ``i`` is the output of decoder block ``i`` (0-based). The embedding output is not a block
and is never offered; the last block is measured but not a candidate unless ``include_last``,
because its output feeds the final norm and LM head directly.

Pipeline: read every text set (errors before any model loads), harvest mean-pooled hidden
states of all blocks for forget and retain (one decoder pass per batch, see
:func:`mmie.core.activations.harvest`), release the model, measure each layer
(:mod:`mmie.layers.rules`), pick ``top_k`` layers with a registered strategy, save a ``layers``
artifact whose ``metrics['chosen']`` later stages read.

Forget and retain files with the same number of records are read as line-aligned pairs
(translations), which the paired metrics (CKA, Procrustes, ANC) need. Otherwise both are
truncated to the smaller count, ``paired`` is recorded as false and the paired metrics are
recorded as missing: on unrelated rows they would measure nothing about the layer.

With two or more ``langs`` sets, language-specific neurons are counted per layer (LAPE, see
:mod:`mmie.layers.rules`) on the activation-function output inside each block's MLP (the sign of
SiLU/GELU(gate) is the sign of the gate pre-activation, as in the LAPE paper); where that module
cannot be found, on the down-projection input, and as a last resort on the block output. The
site used is recorded.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

import torch
from torch import nn

from mmie.core import profile
from mmie.core.activations import Harvest, harvest, iter_batches
from mmie.core.artifacts import Artifact, ModelIdentity, save, sha256_file
from mmie.core.data import TextSource, read_parallel, read_raw, read_texts
from mmie.core.errors import ArtifactError, DataError, MetricError
from mmie.core.hooks import HookSpec, block_hidden, hooked
from mmie.core.models import LoadedModel, ModelSpec, loaded
from mmie.core.progress import SILENT, Progress
from mmie.layers.rules import (
    STRATEGIES,
    Choice,
    LayerRow,
    choose,
    lape_counts,
    measure_layer,
    metric_names,
)


class Pairing(StrEnum):
    AUTO = "auto"   # paired when both files have the same number of records
    YES = "yes"     # must be line-aligned (DataError otherwise)
    NO = "no"       # never paired


@dataclass(frozen=True)
class SelectLayersConfig:
    """Settings of one `select-layers` run.

    forget, retain: text files (jsonl/txt/tsv/csv or HF dataset) of the language to forget and
        of a language to keep.
    model: which model to load.
    field: JSON field or column holding the text.
    langs: (name, file) sets for counting language-specific neurons; none, or at least two.
    top_k: how many layers to choose.
    strategy: name of a rule in ``mmie.layers.rules.STRATEGIES``.
    include_last: also offer the last block as a candidate.
    max_samples: use at most this many texts (pairs) per set; None = all.
    max_length: tokens per text (longer texts are truncated).
    batch_size: texts per forward pass.
    folds: stratified folds of the linear probe; each set needs at least this many texts.
    seed: seeds the probe's fold split and the token sample.
    pairing: auto, yes or no (see :class:`Pairing`).
    token_sample: token states per set and layer to store besides the pooled ones (0 = none).
    min_spread: smallest std used to z-score a metric across layers (metric units); flatter
        metrics count as noise and hardly move the score.
    lape_site: 'auto' or a name in ``LAPE_SITES``: where neuron activity is read.
    lape_entropy_quantile: share of neurons with the lowest entropy that may be specific.
    lape_prob_quantile: quantile of all activation probabilities used as the activity threshold.
    """

    forget: str
    retain: str
    model: ModelSpec = ModelSpec()
    field: str = "text"
    langs: tuple[tuple[str, str], ...] = ()
    top_k: int = 3
    strategy: str = "probe-cka"
    include_last: bool = False
    max_samples: int | None = None
    max_length: int = 128
    batch_size: int = 8
    folds: int = 5
    seed: int = 0
    pairing: Pairing = Pairing.AUTO
    token_sample: int = 0
    min_spread: float = 0.01
    lape_site: str = "auto"
    lape_entropy_quantile: float = 0.01
    lape_prob_quantile: float = 0.95

    def __post_init__(self) -> None:
        if not self.forget or not self.retain:
            raise ValueError("forget and retain files are both required")
        _check_ranges(self)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy '{self.strategy}' "
                             f"(known: {', '.join(sorted(STRATEGIES))})")
        try:
            object.__setattr__(self, "pairing", Pairing(self.pairing))
        except ValueError:
            raise ValueError(f"pairing '{self.pairing}' not in auto, yes, no") from None
        if self.lape_site != "auto" and self.lape_site not in LAPE_SITES:
            raise ValueError(f"lape_site '{self.lape_site}' not in auto, {', '.join(LAPE_SITES)}")
        _check_langs(self.langs)


def _check_ranges(c: SelectLayersConfig) -> None:
    minimums = {"top_k": 1, "max_length": 2, "batch_size": 1, "folds": 2, "token_sample": 0}
    for name, low in minimums.items():
        if getattr(c, name) < low:
            raise ValueError(f"{name.replace('_', '-')} must be >= {low}, got {getattr(c, name)}")
    if c.max_samples is not None and c.max_samples < c.folds:
        raise ValueError(f"max-samples {c.max_samples} is below folds {c.folds}")
    if not c.min_spread > 0:
        raise ValueError(f"min_spread must be > 0, got {c.min_spread}")
    for name in ("lape_entropy_quantile", "lape_prob_quantile"):
        if not 0 < getattr(c, name) < 1:
            raise ValueError(f"{name} must be in (0, 1), got {getattr(c, name)}")


def _check_langs(langs) -> None:
    names = [name for name, _ in langs]
    if any(not name or not path for name, path in langs):
        raise ValueError("every language set needs a name and a file (NAME=FILE)")
    if len(set(names)) != len(names):
        raise ValueError(f"language names repeat: {', '.join(names)}")
    if len(langs) == 1:
        raise ValueError("language-specific neurons need at least two --lang sets")


@dataclass
class TextSets:
    forget: list[str]
    retain: list[str]
    paired: bool
    langs: dict[str, list[str]]


def read_sets(c: SelectLayersConfig) -> TextSets:
    """Every text set, validated; forget/retain paired when line-aligned (see module doc)."""
    limit = c.max_samples
    raw = {path: read_raw(TextSource(path, c.field)) for path in (c.forget, c.retain)}
    for role, path in (("forget", c.forget), ("retain", c.retain)):
        if not any(t.strip() for t in raw[path]):
            raise DataError(f"{path}: no non-empty texts ({role} set)")
    aligned = len(raw[c.forget]) == len(raw[c.retain])
    if c.pairing is Pairing.YES or (c.pairing is Pairing.AUTO and aligned):
        rows = read_parallel([c.forget, c.retain], field=c.field, limit=limit)
        forget, retain, paired = [f for f, _ in rows], [r for _, r in rows], True
    else:
        forget = read_texts(c.forget, c.field, limit)
        retain = read_texts(c.retain, c.field, limit)
        n = min(len(forget), len(retain))
        forget, retain, paired = forget[:n], retain[:n], False
    if len(forget) < c.folds:
        raise DataError(f"{len(forget)} usable forget/retain texts, fewer than the {c.folds} "
                        "probe folds; add data or lower --folds")
    langs = {name: read_texts(path, c.field, limit) for name, path in c.langs}
    return TextSets(forget, retain, paired, langs)


def _file_record(path: str, n: int) -> dict:
    p = Path(path).expanduser()
    return {"path": str(p), "n": n, "sha256": sha256_file(p) if p.is_file() else None}


# Where LAPE reads neuron activity in a block: (module, read its input instead of its output).
Site = Callable[[nn.Module], tuple[nn.Module, bool] | None]


def _child(module: nn.Module | None, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        found = getattr(module, name, None)
        if isinstance(found, nn.Module):
            return found
    return None


LAPE_SITES: dict[str, Site] = {
    "act_fn": lambda b: (m, False) if (m := _child(_child(b, ("mlp",)), ("act_fn", "act")))
    else None,
    "down_proj_input": lambda b: (m, True) if (m := _child(
        _child(b, ("mlp",)), ("down_proj", "c_proj", "dense_4h_to_h", "fc2"))) else None,
    "block": lambda b: (b, False),
}


def resolve_site(blocks: nn.ModuleList, name: str) -> tuple[str, list[tuple[nn.Module, bool]]]:
    """The first site (in LAPE_SITES order for 'auto') found as a distinct module per block."""
    for site in (LAPE_SITES if name == "auto" else (name,)):
        found = [LAPE_SITES[site](block) for block in blocks]
        if all(found) and len({id(m) for m, _ in found}) == len(blocks):
            return site, found
    raise MetricError(f"LAPE site '{name}' not found as one module per block")


def _sign_recorder(store: dict, layer: int, read_input: bool) -> Callable:
    def hook(module, args, output):
        del module
        values = args[0] if read_input else block_hidden(output)
        store[layer] = (values > 0).cpu()

    return hook


def activation_probability(lm: LoadedModel, texts: list[str], modules, c: SelectLayersConfig,
                           progress: Progress, desc: str) -> torch.Tensor:
    """P(activation > 0) per layer and neuron over the real tokens of ``texts``."""
    store: dict[int, torch.Tensor] = {}
    active, n_tokens = None, 0
    specs = [HookSpec(m, _sign_recorder(store, i, pre)) for i, (m, pre) in enumerate(modules)]
    with hooked(specs):
        for batch in iter_batches(lm, texts, [lm.n_layers - 1], max_length=c.max_length,
                                  batch_size=c.batch_size, progress=progress, desc=desc):
            mask = batch.mask[..., None]
            step = torch.stack([(store[i] & mask).sum((0, 1)) for i in range(len(modules))])
            active = step if active is None else active + step
            n_tokens += int(batch.mask.sum())
    if n_tokens == 0:
        raise MetricError(f"{desc}: no real tokens to count neuron activity on")
    return active.double() / n_tokens


def _lape(lm: LoadedModel, sets: TextSets, c: SelectLayersConfig, progress: Progress):
    site, modules = resolve_site(lm.blocks, c.lape_site)
    prob = torch.stack([activation_probability(lm, texts, modules, c, progress, f"neurons {name}")
                        for name, texts in sets.langs.items()]).float()
    return site, prob


def candidate_layers(n_layers: int, include_last: bool) -> list[int]:
    return list(range(n_layers if include_last else n_layers - 1))


def _check_out(out: Path, force: bool) -> None:
    # save() checks again; failing here spares the user a whole harvest before the refusal.
    if Path(out).exists() and not force:
        raise ArtifactError(f"{out} already exists; pass --force to replace it")


@dataclass
class _Harvested:
    """What the model pass produced; the model itself is released before any metric runs."""

    forget: Harvest
    retain: Harvest
    lape: tuple[str, torch.Tensor] | None   # (site, P(active) [langs, layers, neurons])
    identity: ModelIdentity
    candidates: list[int]


def _harvest_all(c: SelectLayersConfig, sets: TextSets, progress: Progress) -> _Harvested:
    with loaded(c.model) as lm:
        candidates = candidate_layers(lm.n_layers, c.include_last)
        if c.top_k > len(candidates):
            raise ValueError(f"top-k {c.top_k} is more than the {len(candidates)} candidate "
                             f"layers of {lm.identity.name} ({lm.n_layers} blocks"
                             f"{'' if c.include_last else ', last excluded'})")
        layers = list(range(lm.n_layers))
        kw = dict(max_length=c.max_length, batch_size=c.batch_size,
                  token_sample=c.token_sample, seed=c.seed, progress=progress)
        forget = harvest(lm, sets.forget, layers, desc="forget", **kw)
        retain = harvest(lm, sets.retain, layers, desc="retain", **kw)
        lape = _lape(lm, sets, c, progress) if sets.langs else None
        return _Harvested(forget, retain, lape, lm.identity, candidates)


@profile.phase("select_layers")
def run(config: SelectLayersConfig, out: Path | str, *, force: bool = False,
        progress: Progress = SILENT) -> Artifact:
    """Measure every layer, choose ``top_k``, save and return the ``layers`` artifact."""
    _check_out(Path(out), force)
    sets = read_sets(config)
    got = _harvest_all(config, sets, progress)
    rows = [measure_layer(i, got.forget.pooled[i], got.retain.pooled[i], paired=sets.paired,
                          folds=config.folds, seed=config.seed, candidate=i in got.candidates)
            for i in progress.track(got.forget.layers, total=len(got.forget.layers),
                                    desc="layer metrics")]
    choice = choose(rows, STRATEGIES[config.strategy], config.top_k, config.min_spread)
    metrics = _summary(config, sets, got, rows, choice)
    table = {k: metrics[k] for k in ("layers", "chosen", "reasons", "strategy", "paired")}
    files = {"layers.json": json.dumps(table, indent=2, sort_keys=True) + "\n",
             "layers.png": plot_png(rows, choice.chosen, config.strategy)}
    return save(out, "layers", tensors=_tensors(got), config=asdict(config), model=got.identity,
                metrics=metrics, files=files, force=force)


def _summary(c: SelectLayersConfig, sets: TextSets, got: _Harvested, rows: list[LayerRow],
             choice: Choice) -> dict:
    """The manifest metrics; ``chosen`` (list of ints) is what later stages read."""
    strategy = STRATEGIES[c.strategy]
    lape = _lape_summary(got.lape, sets, rows, c)  # fills row.lape, so before the rows dump
    return {
        "layers": [r.to_dict() for r in rows], "chosen": choice.chosen, "reasons": choice.reasons,
        "strategy": {"name": strategy.name, "description": strategy.description,
                     "terms": [list(t) for t in strategy.terms], "dropped": choice.dropped},
        "candidates": got.candidates, "paired": sets.paired, "n_samples": len(sets.forget),
        "data": _data_records(c, sets), **({"lape": lape} if lape else {}),
    }


def _data_records(c: SelectLayersConfig, sets: TextSets) -> dict:
    records = {"forget": _file_record(c.forget, len(sets.forget)),
               "retain": _file_record(c.retain, len(sets.retain))}
    records.update({f"lang:{name}": _file_record(path, len(sets.langs[name]))
                    for name, path in c.langs})
    return records


def _lape_summary(lape, sets: TextSets, rows: list[LayerRow], c: SelectLayersConfig) -> dict:
    if lape is None:
        return {}
    site, prob = lape
    result = lape_counts(prob, list(sets.langs), entropy_quantile=c.lape_entropy_quantile,
                         prob_quantile=c.lape_prob_quantile)
    for row in rows:
        row.lape = result.counts[row.layer]
    return {"site": site, "languages": list(sets.langs), "threshold": result.threshold,
            "entropy_cutoff": result.entropy_cutoff, "selected": result.selected,
            "width": int(prob.shape[-1]),
            "counts": {str(k): v for k, v in result.counts.items()}}


def _tensors(got: _Harvested) -> dict[str, dict[str, torch.Tensor]]:
    sides = (("forget", got.forget), ("retain", got.retain))
    pooled = {f"{side}.L{i}": h.pooled[i] for side, h in sides for i in h.layers}
    tensors = {"pooled": pooled}
    if got.forget.token_text.numel() or got.retain.token_text.numel():
        tokens = {f"{side}.L{i}": h.tokens[i] for side, h in sides for i in h.layers}
        tokens.update({f"{side}.text": h.token_text for side, h in sides})
        tensors["tokens"] = tokens
    if got.lape is not None:
        tensors["lape"] = {"prob": got.lape[1]}
    return tensors


def plot_png(rows: list[LayerRow], chosen: list[int], strategy: str) -> bytes:
    """Every metric (and the score, and LAPE counts if any) against layer, chosen layers marked."""
    from matplotlib.figure import Figure

    panels = [*metric_names(), "score"] + (["lape"] if any(r.lape for r in rows) else [])
    cols = 3
    fig = Figure(figsize=(4 * cols, 3 * -(-len(panels) // cols)), layout="constrained")
    axes = fig.subplots(-(-len(panels) // cols), cols, squeeze=False).flatten()
    for ax, name in zip(axes[:len(panels)], panels, strict=True):
        _panel(ax, rows, name, chosen)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"forget vs retain by layer (strategy {strategy}; chosen: "
                 f"{', '.join(map(str, chosen))})")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _panel(ax, rows: list[LayerRow], name: str, chosen: list[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    if name == "lape":
        for lang in rows[0].lape:
            ax.plot([r.layer for r in rows], [r.lape[lang] for r in rows], marker=".", label=lang)
        ax.legend(fontsize=7)
    else:
        get = (lambda r: r.score) if name == "score" else (lambda r: r.values.get(name))
        pts = [(r.layer, get(r)) for r in rows if get(r) is not None]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color="tab:blue")
    for layer in chosen:
        ax.axvline(layer, color="tab:red", alpha=0.4, linestyle="--")
    for row in rows:
        if not row.candidate:
            ax.axvspan(row.layer - 0.5, row.layer + 0.5, color="grey", alpha=0.15, lw=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("language-specific neurons" if name == "lape" else name, fontsize=9)
    ax.set_xlabel("block (grey: not a candidate; red: chosen)", fontsize=7)
