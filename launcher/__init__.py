"""Training launcher: the trainer, its tracking and telemetry, and the Slurm/torchrun entry points."""
