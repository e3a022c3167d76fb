"""Options shared by the depth commands (`comprehension`, `relearn`): which arm to measure."""

from __future__ import annotations

from typing import Annotated

import typer

AdapterOpt = Annotated[str | None, typer.Option(help="Adapter artifact (LoRA or ReFT) of the arm.")]
SaeOpt = Annotated[str | None, typer.Option(
    help="SAE artifact: its selected forget features are gated (part of the arm).")]
GateStrengthOpt = Annotated[float | None, typer.Option(
    help="Kept share of the gated SAE features (default 0: removed).")]
ScrubOpt = Annotated[str | None, typer.Option(
    "--script-scrub", help="Script-scrub artifact (part of the arm).")]
NeuronsOpt = Annotated[str | None, typer.Option(
    help="Neuron mask or ablation artifact whose neurons are scaled (part of the arm).")]
NeuronScaleOpt = Annotated[float | None, typer.Option(
    help="Factor on the masked neurons (default: the ablation artifact's scale).")]


def arm_spec(adapter: str | None, sae: str | None, gate_strength: float | None,
             scrub: str | None, neurons: str | None, neuron_scale: float | None):
    """A :class:`mmie.depth.arms.ArmSpec` (ValueError if inconsistent)."""
    from mmie.depth.arms import ArmSpec

    return ArmSpec(adapter=adapter, sae=sae, sae_gate_strength=gate_strength, scrub=scrub,
                   neurons=neurons, neuron_scale=neuron_scale)
