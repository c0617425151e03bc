"""Where a run keeps things: one place, so every stage and the status command agree."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cratescale.config import JobConfig


@dataclass(frozen=True)
class RunPaths:
    run_dir: Path
    data_root: Path

    @classmethod
    def of(cls, job: JobConfig) -> "RunPaths":
        run_dir = Path(job.run_dir).expanduser().resolve()
        data_root = Path(job.data.root).expanduser().resolve() if job.data.root else run_dir / "data"
        return cls(run_dir, data_root)

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
