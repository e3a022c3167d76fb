"""What changes a model at run time, used by unlearn (which trains edits) and evaluate (which
applies them): LoRA/ReFT/gated-LoRA/neuron-row adapters, language gates, ReFT modules, SAE
gate, script scrub, neuron scaling."""

# register the gated-LoRA and neuron-row adapter methods in mmie.edits.adapters.METHODS
from mmie.edits import glora as _glora  # noqa: E402,F401
from mmie.edits import nrows as _nrows  # noqa: E402,F401
