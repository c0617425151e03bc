"""Cluster profiles: what differs per cluster, kept out of the job file."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from cratescale.config.schema import Strict

PROFILE_DIR = Path(__file__).resolve().parents[2] / "cluster" / "profiles"


class MeasuredStep(Strict):
    """One GPU's training step time t(b) = fixed_ms + b / images_per_s, as bench/gpu.sh measures it."""
    images_per_s: float = Field(..., gt=0)  # per GPU at large batch
    fixed_ms: float = Field(0.0, ge=0)  # per micro-step, whatever the batch (launches, optimizer)
    source: str = ""

    def micro_step_s(self, batch: int) -> float:
        return self.fixed_ms / 1e3 + batch / self.images_per_s


class MeasuredRestart(Strict):
    """What a start, a commit and a change of world size cost on this cluster (bench/scale.py or a launch's
    `setup_s`, bench/checkpoint.py, bench/universal.py); --dry-run turns it into the run's overheads."""
    startup_s: float = Field(..., gt=0)         # a rank from its start to step 0 (process group, model, engine, data)
    commit_gb_per_s: float = Field(..., gt=0)   # a synchronous commit per node: checkpoint bytes / seconds to sealed
    convert_gb_per_s: float = Field(..., gt=0)  # the universal conversion with one node's cores (one converter a run)
    convert_fixed_s: float = Field(0.0, ge=0)   # the converter's own start (a process importing DeepSpeed), any size
    source: str = ""


class ProfileConfig(Strict):
    name: str
    scheduler: Literal["slurm", "local"]
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int = Field(1, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    max_nodes: int = Field(1, ge=1)
    signal_lead_s: int = Field(120, ge=1)
    time_min: int = Field(60, gt=0)
    env: dict[str, str] = Field(default_factory=dict)
    peak_flops_per_gpu: float = Field(..., gt=0)
    # "<model>/<encoder_tokens>" -> the measured step on this cluster's GPU; --dry-run turns it into a time estimate
    measured_step: dict[str, MeasuredStep] = Field(default_factory=dict)
    # Start-up, commit and conversion rates on this cluster; --dry-run's overheads line (none: says not measured)
    measured_restart: MeasuredRestart | None = None


def profile_path(name: str) -> Path:
    """A profile by name (cluster/profiles/<name>.yaml) or by path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return path
    return PROFILE_DIR / f"{name}.yaml"
