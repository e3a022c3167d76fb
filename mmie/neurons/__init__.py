"""neurons: per-neuron scores, selection (Wanda, LAPE), frozen fine-tuning, comparison."""
