"""The launcher: CLI, Ray supervisor, executors (local, SLURM via submitit), preemption."""
