"""Where a run keeps things: one place, so every stage, the trainer, the metrics and the status command agree."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cratescale.config.schema import JobConfig


class _InRun:
    """A read-only path under the run directory (a descriptor: not a dataclass field)."""

    def __init__(self, name: str, doc: str = "") -> None:
        self.name, self.__doc__ = name, doc or f"run_dir / {name!r}"

    def __get__(self, paths: "RunPaths | None", owner: type) -> Path:
        if paths is None:
            return self  # type: ignore[return-value]  # the class attribute, for help() and introspection
        return paths.run_dir / self.name


@dataclass(frozen=True)
class RunPaths:
    run_dir: Path
    data_root: Path

    @classmethod
    def of(cls, job: JobConfig) -> "RunPaths":
        run_dir = Path(job.run_dir).expanduser().resolve()
        data_root = Path(job.data.root).expanduser().resolve() if job.data.root else run_dir / "data"
        return cls(run_dir, data_root)

    @classmethod
    def of_run(cls, run_dir: Path) -> "RunPaths":
        """The run directory's own files (metrics, checkpoints, status) when the data root is not known."""
        return cls(Path(run_dir), Path(run_dir) / "data")

    config = _InRun("config.yaml")
    checkpoints = _InRun("checkpoints")
    metrics = _InRun("metrics.jsonl", "One JSON record per line, written by rank 0 (engine/metrics.py), read by "
                                      "launch/progress.py.")
    tensorboard = _InRun("tensorboard")
    export = _InRun("export")
    init_export = _InRun("export_init", "The architecture at its initialization: the baseline evaluation compares "
                                        "against.")
    embeddings = _InRun("embeddings")
    finetune = _InRun("finetune", "One fine-tune run per transfer set and arm: finetune/<set>/<arm>/ "
                                  "(launch/finetune_stage.py).")
    report = _InRun("report")
    submitit_dir = _InRun("submitit")
    launch_state = _InRun("launch.json")

    @property
    def manifest(self) -> Path:
        return self.data_root / "manifest.parquet"

    def sample_log(self, rank: int) -> Path:
        """Every consumed sample id of `rank` per step (logging.sample_log)."""
        return self.run_dir / "samples" / f"rank{rank}.jsonl"
