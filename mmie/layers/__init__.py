"""select-layers: harvest activations, per-layer metrics, selection rules."""
