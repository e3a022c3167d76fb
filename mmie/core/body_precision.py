"""Reduced-precision matmuls in the decoder body, for inference passes on CPU.

With the LM head in bf16 (:mod:`mmie.core.head_precision`) the rest of an evaluation on the
default model is mostly the decoder body's projections in fp32: on a CPU with AMX or AVX-512
BF16 a ``[64, 640] x [640, 2048]`` product takes about a quarter of the time in bf16.
Under :func:`body_precision` every plain linear layer of the body (attention and MLP
projections) computes ``x W^T`` from bf16 copies of ``x`` and ``W`` (bf16 products summed in
fp32 by the matmul) and hands back fp32: the residual stream, the norms, attention's softmax,
the KV cache and every adapter stay fp32.

Unlike the bf16 head this **changes greedy continuations**: each projection's output is
rounded to bf16 (relative error up to 2^-8), and over 18 layers and 48 steps a near-tie
between two next tokens goes the other way for some prompts (on the demo's 480 evaluation
prompts 257 continuations stayed token-identical; every gate decision stayed the same and
every gate estimate inside the fp32 evaluation's interval: README, "What make demo shows").
It is therefore a setting of the measurement, not an implementation detail: ``evaluate``
records it in the ``data`` block ``gate`` requires to be identical between the baseline and
every arm.

Only layers that exist when the block is entered are changed, so a LoRA attached inside it
(PEFT wraps the original layer as its ``base_layer``) adds its fp32 update on top of the bf16
base product. A layer whose weight changes inside the block is cast again; with autograd
recording a trainable weight, the layer computes in full precision.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmie.core.errors import ModelError
from mmie.core.models import get_decoder

BODY_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _eligible(module: nn.Module) -> bool:
    """A plain fp32 ``nn.Linear`` that nobody has shadowed and no accelerate hook moves."""
    return (isinstance(module, nn.Linear) and module.weight.dtype == torch.float32
            and "forward" not in vars(module) and not hasattr(module, "_hf_hook"))


class _Reduced:
    """The shadowing forward of one layer, with its reduced copy of the weight (cast again
    when the weight's version changes)."""

    def __init__(self, layer: nn.Linear, dtype: torch.dtype) -> None:
        self.layer, self.dtype = layer, dtype
        self.version, self.copy = -1, None

    def weight(self) -> Tensor:
        weight = self.layer.weight
        if self.copy is None or self.version != weight._version:
            # outside inference mode, so that a later training step may still read the layer
            with torch.inference_mode(False), torch.no_grad():
                self.copy = weight.detach().to(self.dtype)
            self.version = weight._version
        return self.copy

    def __call__(self, x: Tensor) -> Tensor:
        layer = self.layer
        if torch.is_grad_enabled() and (layer.weight.requires_grad or x.requires_grad):
            return F.linear(x, layer.weight, layer.bias)  # a graph: full precision
        out = F.linear(x.to(self.dtype), self.weight()).to(x.dtype)
        return out if layer.bias is None else out + layer.bias


def body_layers(model: nn.Module) -> list[nn.Linear]:
    """The decoder body's linear layers this module would compute in reduced precision."""
    try:
        body = get_decoder(model)
    except ModelError:
        return []
    return [m for m in body.modules() if _eligible(m)]


@contextmanager
def body_precision(model: nn.Module, name: str) -> Iterator[int]:
    """Compute the decoder body's linear layers at ``name`` ("fp32" or "bf16") inside the
    block; yields how many layers were changed (0 for fp32). Everything is restored in
    ``finally``."""
    if name not in BODY_DTYPES:
        raise ValueError(f"body dtype must be one of {sorted(BODY_DTYPES)}, got {name!r}")
    dtype = BODY_DTYPES[name]
    layers = [] if dtype is None else body_layers(model)
    for layer in layers:
        layer.forward = _Reduced(layer, dtype)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)
