"""train-sae: activation stream, trainer and optimiser, held-out quality, feature selection,
SAELens export."""
