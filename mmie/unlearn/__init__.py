"""unlearn: config, data, training loop, checkpoints, FSDP glue and the objectives."""
