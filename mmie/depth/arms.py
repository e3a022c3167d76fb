"""Which unlearning arm a depth measurement looks at, and how it is put on the model.

An arm is any combination of a saved adapter (LoRA or ReFT), an SAE feature gate, a script scrub
(all through :func:`mmie.edits.interventions.attached`) and a neuron mask scaled at inference
(:func:`mmie.edits.neurons.ablated`). With nothing set the arm is the base model.

For the relearning attack a LoRA arm is merged into the weights of the run's private model copy
before the attack's own LoRA is added (:func:`attack_ready`): two PEFT LoRA sets on one module
would nest, and merging makes the arm part of "the model under attack". Hook-based parts (ReFT,
gated LoRA, SAE gate, scrub, neurons) stay applied, frozen, for the whole attack: the attacker
fine-tunes the deployed system, edits included. They are attached after the attack LoRA exists, so
a neuron mask scales the input of the LoRA-wrapped down-projection, LoRA path included, and the
attack cannot route around it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from mmie.core.artifacts import content_hash
from mmie.core.models import LoadedModel
from mmie.edits.adapters import LoraAdapter, load_adapter
from mmie.edits.interventions import attached
from mmie.edits.neurons import ablated


@dataclass(frozen=True)
class ArmSpec:
    """adapter, sae, scrub, neurons: artifact paths (None = not part of the arm).
    sae_gate_strength: kept share of the gated SAE features (0 = removed; None = the default).
    neuron_scale: factor on the masked neurons (None = the ablation artifact's recorded scale).
    """

    adapter: str | None = None
    sae: str | None = None
    sae_gate_strength: float | None = None
    scrub: str | None = None
    neurons: str | None = None
    neuron_scale: float | None = None

    def __post_init__(self) -> None:
        if self.sae_gate_strength is not None and self.sae is None:
            raise ValueError("an SAE gate strength needs an SAE artifact")
        if self.neuron_scale is not None and self.neurons is None:
            raise ValueError("a neuron scale needs a neurons artifact")

    @property
    def is_base(self) -> bool:
        return not (self.adapter or self.sae or self.scrub or self.neurons)

    def to_dict(self) -> dict:
        return asdict(self)


def _path(p: str | None) -> Path | None:
    return Path(p) if p else None


@contextmanager
def _neurons(lm: LoadedModel, arm: ArmSpec) -> Iterator[dict]:
    if arm.neurons is None:
        yield {}
        return
    with ablated(lm, arm.neurons, arm.neuron_scale) as masks:
        yield {"neurons": {"path": arm.neurons, "sha256": content_hash(Path(arm.neurons)),
                           "selected": sum(int(m.sum()) for m in masks.values()),
                           "arm": "neurons"}}


@contextmanager
def applied(lm: LoadedModel, arm: ArmSpec, *, adapter: bool = True) -> Iterator[dict]:
    """Apply the arm (``adapter=False``: all but the adapter) for the block; yields the records
    of :func:`attached` plus ``neurons``, and the arm's name."""
    with ExitStack() as stack:
        got = dict(stack.enter_context(attached(
            lm, adapter=_path(arm.adapter) if adapter else None, sae=_path(arm.sae),
            sae_gate_strength=arm.sae_gate_strength, scrub=_path(arm.scrub))))
        got.update(stack.enter_context(_neurons(lm, arm)))
        parts = [p for p in got.pop("arm_parts") if adapter or p != "base"]
        parts += ["neurons"] if arm.neurons else []
        got["arm"] = "+".join(parts) or "base"
        yield got


@contextmanager
def fixed_adapter(lm: LoadedModel, arm: ArmSpec) -> Iterator[dict]:
    """The arm's adapter made a fixed part of ``lm``: LoRA merged into the weights (for good:
    the caller's model copy is spent), ReFT hooks frozen until exit. See the module docstring."""
    if arm.adapter is None:
        yield {}
        return
    adapter = load_adapter(arm.adapter, lm)
    config = adapter.source.config
    record = {"path": arm.adapter, "sha256": content_hash(Path(arm.adapter)),
              "method": adapter.spec.method,
              "arm": f"{config.get('method')}-{config.get('objective')}"}
    if isinstance(adapter, LoraAdapter):
        adapter.peft_model.merge_and_unload()
        adapter.peft_model = None  # merged: nothing left to unload
        yield {**record, "merged": True}
        return
    try:
        with adapter.edits():
            yield {**record, "merged": False}
    finally:
        adapter.remove()
