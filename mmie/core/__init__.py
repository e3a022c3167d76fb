"""Shared pieces every stage uses: artifacts, models and their sources, data, hooks,
activations, losses, generation, statistics, similarity, distributed helpers, errors, progress."""
