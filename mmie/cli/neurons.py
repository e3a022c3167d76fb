"""`mmie neurons` (stub until its stage lands)."""

from mmie.cli.app import app
from mmie.cli.common import fail


@app.command("neurons")
def neurons_cmd() -> None:
    """Neuron-level analysis: Wanda/LAPE scores, frozen-neuron fine-tuning, score dynamics."""
    raise fail("'mmie neurons' is not implemented yet", 1)
