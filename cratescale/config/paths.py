"""Where a run keeps things: one place, so every stage, the trainer, the metrics and the status command agree."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cratescale.config.schema import JobConfig


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

    @property
    def config(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.data_root / "manifest.parquet"

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def metrics(self) -> Path:
        """One JSON record per line, written by rank 0 (engine/metrics.py), read by launch/progress.py."""
        return self.run_dir / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.run_dir / "tensorboard"

    def sample_log(self, rank: int) -> Path:
        """Every consumed sample id of `rank` per step (logging.sample_log)."""
        return self.run_dir / "samples" / f"rank{rank}.jsonl"

    @property
    def export(self) -> Path:
        return self.run_dir / "export"

    @property
    def init_export(self) -> Path:
        """The architecture at its initialization: the baseline evaluation compares against."""
        return self.run_dir / "export_init"

    @property
    def embeddings(self) -> Path:
        return self.run_dir / "embeddings"

    @property
    def report(self) -> Path:
        return self.run_dir / "report"

    @property
    def submitit_dir(self) -> Path:
        return self.run_dir / "submitit"

    @property
    def launch_state(self) -> Path:
        return self.run_dir / "launch.json"
