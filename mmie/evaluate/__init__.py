"""evaluate: config, generation passes and metrics (pure functions)."""
