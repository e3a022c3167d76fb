"""Forward hooks on decoder blocks, always removed, always on the block's own device.

On a model split by accelerate (``device_map``) a block's parameters may sit on ``meta`` or
the CPU outside its forward; hooks therefore take the device from the activation they get
(``output.device``), and whatever they build for a block goes to
:meth:`mmie.core.models.LoadedModel.block_device`, never to a parameter's device.

Decoder blocks return either a tensor (Gemma 3 in transformers 5) or a tuple whose first item
is the hidden state (older layouts, GPT-2). :func:`block_hidden` and :func:`with_block_hidden`
hide that difference so edits work on every architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

HiddenFn = Callable[[torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised from a hook to end a forward pass early once the needed layers have run."""


@dataclass(frozen=True)
class HookSpec:
    module: nn.Module
    fn: Callable
    pre: bool = False      # forward pre-hook instead of forward hook
    with_kwargs: bool = False


@contextmanager
def hooked(specs: Sequence[HookSpec]) -> Iterator[None]:
    """Register every hook for the duration of the block; removed in ``finally``."""
    handles = []
    try:
        for spec in specs:
            register = (spec.module.register_forward_pre_hook if spec.pre
                        else spec.module.register_forward_hook)
            handles.append(register(spec.fn, with_kwargs=spec.with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()


def block_hidden(output) -> torch.Tensor:
    """The hidden state inside a decoder block's output."""
    return output[0] if isinstance(output, tuple) else output


def with_block_hidden(output, hidden: torch.Tensor):
    """The block output with its hidden state replaced, in the same structure."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def _editor(fn: HiddenFn) -> Callable:
    def hook(module, args, output):
        del module, args
        hidden = block_hidden(output)
        # on a split model the next block may expect the state where this one left it
        return with_block_hidden(output, fn(hidden).to(hidden.device))

    return hook


@contextmanager
def edit_blocks(blocks: nn.ModuleList, edits: Mapping[int, HiddenFn]) -> Iterator[None]:
    """Replace block ``i``'s output hidden state by ``edits[i](hidden)`` inside the block."""
    _check_layers(blocks, edits)
    with hooked([HookSpec(blocks[i], _editor(fn)) for i, fn in sorted(edits.items())]):
        yield


def _recorder(store: dict, layer: int, stop: bool) -> Callable:
    def hook(module, args, output):
        del module, args
        store[layer] = block_hidden(output)
        if stop:
            raise StopForward

    return hook


@contextmanager
def capture_blocks(blocks: nn.ModuleList, layers: Sequence[int],
                   stop_after_last: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Record the output hidden state of each listed block into the yielded dict.

    With ``stop_after_last`` the deepest listed block raises :class:`StopForward`, so callers
    that only need activations skip the rest of the network (and the LM head); run the
    forward through :func:`run_until_stop`.
    """
    _check_layers(blocks, layers)
    store: dict[int, torch.Tensor] = {}
    last = max(layers)
    specs = [HookSpec(blocks[i], _recorder(store, i, stop_after_last and i == last))
             for i in sorted(set(layers))]
    with hooked(specs):
        yield store


def run_until_stop(forward: Callable[[], object]) -> None:
    try:
        forward()
    except StopForward:
        pass  # expected: the capture hook ended the pass after the deepest layer


def _check_layers(blocks: nn.ModuleList, layers) -> None:
    bad = [i for i in layers if not 0 <= int(i) < len(blocks)]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {len(blocks)} blocks "
                         f"(0..{len(blocks) - 1})")
