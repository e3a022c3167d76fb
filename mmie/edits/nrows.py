"""Neuron-row fine-tuning (method ``nrows``): an edit confined to selected MLP neurons.

For each block with selected neurons ``S`` (a ``neurons`` mask artifact from `mmie neurons
select`, e.g. ``--lape --exclusive``), only the weights that compute or read those neurons move:
the rows ``S`` of every row projection (``gate_proj`` and ``up_proj``; GPT-2 ``c_fc``) and the
columns ``S`` of the down projection. They are trained as additive deltas on the frozen model,

    pre[..., S] += x @ D_row^T        (D_row: |S| x d_model, per row projection)
    y += z[..., S] @ D_down^T         (D_down: d_model x |S|, z the down projection's input),

which is full-rank fine-tuning of those neurons only: every other neuron's input weights, and
every other weight of the model, stay exactly as they were. With all deltas zero (the start)
the model is exactly the base model. Any unlearning objective trains it (``--objective
redirect``: "forget Hindi, continue in English" through the Hindi neurons alone).

Why: language-specific neurons (LAPE, Tang et al. 2024, "Language-Specific Neurons: The Key to
Multilingual Capabilities in Large Language Models") localise where a language is processed;
restricting the update to them is the fine-tuning counterpart of ablating them, in the spirit
of localised unlearning (e.g. Hase et al. 2023, "Does Localization Inform Editing?", which also
warns that localisation need not be where an edit works best: compare with the ``lora`` arm).

The deltas live only inside :meth:`NeuronRowsAdapter.edits` (forward hooks, removed on exit).
Artifact tensor group ``rows``: ``layer{i}.index`` (the neuron ids, int64, sorted) and
``layer{i}.{module}`` (the delta of each projection); names and shapes are checked on load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from mmie.core.artifacts import Artifact
from mmie.core.errors import ArtifactError
from mmie.core.hooks import HookSpec, hooked
from mmie.core.models import LoadedModel
from mmie.edits.adapters import Adapter, AdapterSpec, Payload, check_names_shapes, register_method
from mmie.edits.neurons import MlpModules, block_mlps, effective_weight, load_mask, mask_mlps

STEM = "rows"


def _names(mods: MlpModules) -> dict[str, nn.Module]:
    """Child name inside the MLP -> module, for the row projections and the down projection."""
    names = {id(m): n for n, m in mods.mlp.named_children()}
    return {names[id(m)]: m for m in (*mods.rows.values(), mods.down)}


def row_shapes(mods: MlpModules, k: int) -> dict[str, tuple[int, int]]:
    """Delta shape per projection for ``k`` neurons: rows ``(k, in)``, down ``(out, k)``."""
    shapes = {}
    for name, module in _names(mods).items():
        out_dim, in_dim = effective_weight(module).shape
        shapes[name] = (out_dim, k) if module is mods.down else (k, in_dim)
    return shapes


def _row_hook(index: Tensor, delta: Tensor) -> Callable:
    def hook(module, args, output):
        x = args[0]
        return output.index_add(-1, index, (x.to(delta.dtype) @ delta.T).to(output.dtype))

    return hook


def _down_hook(index: Tensor, delta: Tensor) -> Callable:
    def hook(module, args, output):
        z = args[0].index_select(-1, index)
        return output + (z.to(delta.dtype) @ delta.T).to(output.dtype)

    return hook


@register_method("nrows")
class NeuronRowsAdapter(Adapter):
    """Deltas on the selected neurons' rows and columns only (see the module docstring)."""

    default_lr = 1e-3

    def __init__(self, lm: LoadedModel, spec: AdapterSpec, index: dict[int, Tensor],
                 params: dict[str, nn.Parameter], mlps: dict[int, MlpModules]) -> None:
        super().__init__(lm, spec)
        self.index, self.params, self.mlps = index, params, mlps

    @classmethod
    def _build(cls, lm: LoadedModel, spec: AdapterSpec, index: dict[int, Tensor]
               ) -> NeuronRowsAdapter:
        params = {}
        mlps = block_mlps(lm, sorted(index))
        for i, idx in index.items():
            for name, shape in row_shapes(mlps[i], len(idx)).items():
                params[f"layer{i}.{name}"] = nn.Parameter(
                    torch.zeros(shape, device=lm.block_device(i)))
        return cls(lm, spec, index, params, mlps)

    @classmethod
    def create(cls, lm: LoadedModel, spec: AdapterSpec) -> NeuronRowsAdapter:
        if not spec.neurons:
            raise ValueError("--method nrows needs a neurons mask (--neurons, from "
                             "`mmie neurons select`)")
        artifact, masks = load_mask(spec.neurons, lm.identity)
        mask_mlps(lm, masks, str(artifact.path))  # refuses layers or widths this model lacks
        index = {i: m.nonzero().flatten().to(torch.long) for i, m in masks.items()
                 if i in spec.layers and m.any()}
        if not index:
            raise ValueError(f"{artifact.path}: no selected neuron in the chosen blocks "
                             f"{list(spec.layers)}")
        return cls._build(lm, spec, index)

    @classmethod
    def from_artifact(cls, lm: LoadedModel, artifact: Artifact,
                      spec: AdapterSpec) -> NeuronRowsAdapter:
        tensors = artifact.tensors(STEM)
        index = _read_index(lm, tensors, str(artifact.path))
        adapter = cls._build(lm, spec, index)
        expected = {**{f"layer{i}.index": (len(idx),) for i, idx in index.items()},
                    **{k: tuple(p.shape) for k, p in adapter.params.items()}}
        check_names_shapes(f"{artifact.path}/{STEM}.safetensors",
                           {k: tuple(v.shape) for k, v in tensors.items()}, expected)
        adapter.load_frozen({k: tensors[k] for k in adapter.params})
        return adapter

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.params)

    @contextmanager
    def edits(self) -> Iterator[dict[int, Tensor]]:
        hooks = []
        for i, mods in self.mlps.items():
            idx = self.index[i].to(self.lm.block_device(i))
            for name, module in _names(mods).items():
                make = _down_hook if module is mods.down else _row_hook
                hooks.append(HookSpec(module, make(idx, self.params[f"layer{i}.{name}"])))
        with hooked(hooks):
            yield {}

    def payload(self) -> Payload:
        rows = {f"layer{i}.index": idx.cpu().contiguous() for i, idx in self.index.items()}
        rows.update({k: p.detach().contiguous() for k, p in self.params.items()})
        return Payload({STEM: rows})


def _read_index(lm: LoadedModel, tensors: dict[str, Tensor], where: str) -> dict[int, Tensor]:
    """``{layer: neuron ids}`` from ``layer{i}.index`` entries, refusing bad ids."""
    index = {}
    for key, value in tensors.items():
        if not key.endswith(".index"):
            continue
        layer = int(key.removeprefix("layer").removesuffix(".index"))
        if not 0 <= layer < lm.n_layers:
            raise ArtifactError(f"{where}: block {layer} out of range ({lm.n_layers} blocks)")
        width = effective_weight(block_mlps(lm, [layer])[layer].down).shape[1]
        ids = value.to(torch.long)
        if ids.dim() != 1 or not len(ids) or ids.unique().numel() != len(ids) or \
                int(ids.min()) < 0 or int(ids.max()) >= width:
            raise ArtifactError(f"{where}: {key} must hold distinct neuron ids in [0, {width})")
        index[layer] = ids
    if not index:
        raise ArtifactError(f"{where}: no layer{{i}}.index tensor (which neurons the edit holds)")
    return dict(sorted(index.items()))
