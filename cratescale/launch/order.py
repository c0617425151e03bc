"""A stage run without what it reads (`--stages evaluate` on a run with no embeddings) is refused before Ray or
SLURM start, with one line naming the stage to run first; `stage_sets` is the one list of the sets a job extracts
and evaluates (the status table reads it too)."""
from __future__ import annotations

from pathlib import Path

from cratescale.config import ConfigError, JobConfig, RunPaths

# What each stage reads, and the stage that makes it.
_NEEDS = {"export": "pretrain", "finetune": "export", "extract": "export", "evaluate": "extract"}
_CHAIN = ["pretrain", "export", "finetune", "extract", "evaluate"]


def stage_sets(job: JobConfig) -> list[str]:
    """The names of the embedding sets: each transfer set, or the pretraining data itself."""
    return [d.name for d in job.extract.datasets] or ["pretrain"]


def _complete_store(store: Path) -> bool:
    from cratescale.embeddings.store import EmbeddingStore, StoreError

    try:
        return EmbeddingStore(store).is_complete()
    except StoreError:
        return False


def missing_input(stage: str, job: JobConfig, paths: RunPaths) -> tuple[str, str] | None:
    """(what `stage` would read and is not there, the stage that makes it), or None."""
    from cratescale.checkpoint import CheckpointStore

    if stage == "export" and not CheckpointStore(paths.checkpoints).commits():
        return f"no committed checkpoint in {paths.checkpoints}", "pretrain"
    if stage in ("finetune", "extract", "evaluate") and not (paths.export / "export.json").is_file():
        return f"no export in {paths.export}", "export"
    if stage == "evaluate":
        if absent := [s for s in (paths.embeddings / n for n in stage_sets(job)) if not _complete_store(s)]:
            return f"no complete embedding store {absent[0]}", "extract"
    return None


def check_stage_order(job: JobConfig, paths: RunPaths, chosen: list[str]) -> None:
    """Each chosen stage's inputs exist, or the stage that makes them runs before it (ConfigError: exit 2)."""
    for i, stage in enumerate(chosen):
        if stage not in _NEEDS or _NEEDS[stage] in chosen[:i]:
            continue
        if found := missing_input(stage, job, paths):
            why, first = found
            # finetune is on the way to nothing else: suggested only when it is the stage asked for
            between = [s for s in _CHAIN[_CHAIN.index(first):_CHAIN.index(stage)] if s != "finetune"]
            raise ConfigError(f"--stages: {stage} needs what {first} makes ({why}); run {first} first: "
                              f"--stages {','.join([*between, *chosen[i:]])}")
