"""What changes a model at run time, used by unlearn (which trains edits) and evaluate (which
applies them): LoRA/ReFT/gated-LoRA adapters, language gates, ReFT modules, SAE gate, script
scrub, neuron scaling."""

# registers the gated-LoRA adapter method in mmie.edits.adapters.METHODS
from mmie.edits import glora as _glora  # noqa: E402,F401
