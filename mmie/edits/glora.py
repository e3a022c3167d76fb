"""Gated LoRA (method ``glora``): a LoRA update that acts only where a language gate is on.

Each adapted linear layer of a block after the gate's block computes
``y = W x + g_t * (alpha / r) * B A x``, with ``A`` (r x in) and ``B`` (out x r) as in LoRA
(Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") and ``g_t`` in {0, 1}
the causal latch of :mod:`mmie.edits.langgate`: 1 from the first token where the probe on the
base model's hidden state says "forget language", else 0. Conditioning an unlearning edit on a
classifier of the model's own activations follows Dynamic SAE Guardrails (Muhamed et al. 2025).

What that buys and what it does not:

- Where the gate never fires, the model is *exactly* the base model (the update is not
  computed), so kept languages cannot drift: retention is decided by the gate's false-fire rate,
  which the ``langgate`` artifact measures on validation texts, not by how well a retain loss
  held.
- The language is not removed from the weights; the gate only keeps the model from using it.
  The relearning attack and the comprehension measures (``mmie relearn``,
  ``mmie comprehension``) show how deep that goes; a guardrail is expected to be shallow.

The update lives only inside :meth:`GatedLoraAdapter.edits` (forward hooks on the linear
layers, removed on exit); outside it ``lm.model`` is the plain model, which is also the frozen
reference. Artifact tensor groups: ``lora`` (``layer{i}.{module}.A`` / ``.B``) and ``gate`` (the
language gate, copied from the ``langgate`` artifact given at training time, so the adapter is
self-contained).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor, nn

from mmie.core.artifacts import Artifact
from mmie.core.errors import ModelError
from mmie.core.hooks import HookSpec, StopForward, hooked, run_until_stop
from mmie.core.models import LoadedModel
from mmie.edits.adapters import (
    Adapter,
    AdapterSpec,
    Payload,
    block_linears,
    check_layers,
    check_names_shapes,
    register_method,
)
from mmie.edits.langgate import LanguageGate, Latch, gate_live, gate_shapes, load_gate


def _targets(lm: LoadedModel, spec: AdapterSpec) -> dict[str, nn.Linear]:
    """``layer{i}.{module}`` -> linear layer, for every target of every chosen block."""
    return {f"layer{i}.{sub}": m for (i, sub), m in block_linears(lm, spec).items()}


def glora_shapes(lm: LoadedModel, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for key, linear in _targets(lm, spec).items():
        shapes[f"{key}.A"] = (spec.rank, linear.in_features)
        shapes[f"{key}.B"] = (linear.out_features, spec.rank)
    return shapes


def _gated_delta(a: Tensor, b: Tensor, scaling: float, latch: Latch, key: str) -> Callable:
    def hook(module, args, output):
        gate = latch.values
        x = args[0]
        if gate is None or gate.shape != x.shape[:2]:
            raise ModelError(f"{key}: the language gate has no value for this forward pass "
                             "(its block did not run before this layer)")
        if not bool(gate.any()):  # nothing gated on: exactly the base model's output
            return output
        delta = (x.to(a.dtype) @ a.T) @ b.T * scaling
        return output + (gate[..., None].to(delta.dtype) * delta).to(output.dtype)

    return hook


@register_method("glora")
class GatedLoraAdapter(Adapter):
    """LoRA through forward hooks, scaled per token by a language gate (module docstring)."""

    default_lr = 5e-4

    def __init__(self, lm: LoadedModel, spec: AdapterSpec, gate: LanguageGate,
                 params: dict[str, nn.Parameter]) -> None:
        super().__init__(lm, spec)
        self.gate, self.params = gate, params
        self.modules = _targets(lm, spec)

    @classmethod
    def _build(cls, lm: LoadedModel, spec: AdapterSpec, gate: LanguageGate) -> GatedLoraAdapter:
        check_layers(lm, spec.layers)
        if bad := [i for i in spec.layers if i <= gate.layer]:
            raise ValueError(f"blocks {bad} come before or at the gate's block {gate.layer}: "
                             "the gate must be computed before the edit acts")
        params = {}
        for key, shape in glora_shapes(lm, spec).items():
            block = int(key.split(".", 1)[0].removeprefix("layer"))
            params[key] = nn.Parameter(torch.zeros(shape, device=lm.block_device(block)))
        return cls(lm, spec, gate, params)

    @classmethod
    def create(cls, lm: LoadedModel, spec: AdapterSpec) -> GatedLoraAdapter:
        if not spec.gate_probe:
            raise ValueError("--method glora needs a language gate (--gate-probe, a langgate "
                             "artifact from `mmie langgate`)")
        _, gate = load_gate(spec.gate_probe, lm)
        # every block after the gate's: with the default (all blocks) the earlier ones drop out
        spec = replace(spec, layers=tuple(i for i in spec.layers if i > gate.layer))
        if not spec.layers:
            raise ValueError(f"no chosen block comes after the gate's block {gate.layer}")
        adapter = cls._build(lm, spec, gate)
        for key, param in adapter.params.items():
            if key.endswith(".A"):  # PEFT's LoRA init: A Kaiming-uniform, B zero (no change)
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        return adapter

    @classmethod
    def from_artifact(cls, lm: LoadedModel, artifact: Artifact,
                      spec: AdapterSpec) -> GatedLoraAdapter:
        tensors = artifact.manifest["tensors"]
        check_names_shapes(f"{artifact.path}/gate.safetensors",
                           {k: tuple(v["shape"]) for k, v in tensors.get("gate", {}).items()},
                           gate_shapes(lm.identity.d_model))
        gate = LanguageGate.from_tensors(artifact.tensors("gate"), lm.identity.d_model,
                                         f"{artifact.path}/gate.safetensors")
        adapter = cls._build(lm, spec, gate)
        check_names_shapes(f"{artifact.path}/lora.safetensors",
                           {k: tuple(v["shape"]) for k, v in tensors.get("lora", {}).items()},
                           glora_shapes(lm, spec))
        adapter.load_frozen(artifact.tensors("lora"))
        return adapter

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.params)

    @contextmanager
    def edits(self) -> Iterator[dict[int, Tensor]]:
        scaling = self.spec.alpha / self.spec.rank
        with gate_live(self.lm, self.gate) as latch:
            hooks = [HookSpec(module, _gated_delta(self.params[f"{key}.A"],
                                                   self.params[f"{key}.B"], scaling, latch, key))
                     for key, module in self.modules.items()]
            with hooked(hooks):
                yield {}

    def unchanged(self, sequences: Sequence[Sequence[int]]) -> list[bool]:
        """A sequence on which the gate never fires sees the base model exactly, whatever the
        LoRA weights: one pass per sequence up to the gate's block (unpadded, as the gate is
        causal and per row), stopped there."""
        def stop(module, args, output):
            raise StopForward  # registered after the gate's own hook, so the latch has run

        out = []
        with torch.no_grad(), gate_live(self.lm, self.gate) as latch, \
                hooked([HookSpec(self.lm.blocks[self.gate.layer], stop)]):
            for ids in sequences:
                run_until_stop(lambda ids=ids: self.lm.model(
                    input_ids=torch.tensor([list(ids)], device=self.lm.device), use_cache=False))
                out.append(not bool(latch.values.any()))
        return out

    def payload(self) -> Payload:
        lora = {k: p.detach().contiguous() for k, p in self.params.items()}
        return Payload({"lora": lora, "gate": self.gate.tensors()})

