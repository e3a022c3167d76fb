"""What changes a model at run time, used by unlearn (which trains edits) and evaluate (which
applies them): LoRA/ReFT adapters, ReFT modules, SAE gate, script scrub, neuron scaling."""
