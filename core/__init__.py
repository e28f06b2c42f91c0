"""Framework-neutral parts: config, data, the training loop, checkpoints, the CLI."""
