"""The job config tree: one typed, validated description of a run, saved with it."""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

STAGES = ("ingest", "pretrain", "export", "extract", "evaluate")
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    name: str = "crate_mae_debug"
    # Constructor overrides of the registered size (img_size, patch_size, lambd, eta, mask_ratio, ...).
    overrides: dict[str, Any] = Field(default_factory=dict)


class DataConfig(Strict):
    # A path (folder, .tar, .tar.gz, webdataset dir) or synthetic://shapes?n=...&classes=...&size=...
    source: str = "synthetic://shapes?n=2048&classes=10&size=48"
    # Where the manifest lives; default: <run_dir>/data. Ingest runs when it holds no manifest.
    root: str | None = None
    # Size hint for --dry-run before ingest has counted (ImageNet-21k fall11: 14,197,122).
    expected_samples: int | None = Field(None, gt=0)
    image_size: int = Field(32, gt=0)
    loader: Literal["auto", "dali", "pil"] = "auto"
    num_threads: int = Field(1, ge=1)
    # DALI on GPUs: share of JPEGs for the hardware decoder (BENCHMARKS.md "Input pipeline plan"), and how many
    # batches the pipeline prepares ahead of the training step.
    hw_decoder_load: float = Field(0.75, ge=0.0, le=1.0)
    prefetch_depth: int = Field(2, ge=1, le=8)
    val_per_class: int = Field(0, ge=0)
    reshard: int | None = Field(None, gt=0)
    shard_size: int = Field(1000, gt=0)


class OptimConfig(Strict):
    base_lr: float = Field(1.5e-4, gt=0)  # scaled by global_batch / 256
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(1.0, gt=0)


class ScheduleConfig(Strict):
    global_batch: int = Field(64, gt=0)
    micro_batch: int = Field(16, gt=0)
    steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    warmup_steps: int | None = Field(None, ge=0)
    warmup_epochs: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _length(self) -> "ScheduleConfig":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of steps or epochs")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of micro_batch {self.micro_batch}")
        return self


class ParallelConfig(Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "bf16"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Recompute block activations in backward (memory for about one extra forward); see distributed/wrap.py.
    activation_checkpointing: bool = False
    # torch.compile the model in place before DeepSpeed wraps it (first step pays the compile time).
    compile: bool = False
    # SDPA kernel on GPUs (distributed/wrap.py); cudnn measured fastest on an H100 (BENCHMARKS.md).
    attention: Literal["auto", "flash", "cudnn", "efficient"] = "auto"
    # Overlap the gradient reduction with backward (more bucket memory); null keeps DeepSpeed's default (off
    # for ZeRO-1/2, on for ZeRO-3). One H100, world size 1: 4% slower (nothing to overlap there).
    overlap_comm: bool | None = None
    # A collective waits this long for a peer before it fails (a lost node ends its survivors' ranks in
    # bounded time, then the supervisor resumes on the nodes left); torch's own default is 30 minutes.
    collective_timeout_s: int = Field(600, ge=5)

    @model_validator(mode="after")
    def _compile_needs_zero_le_2(self) -> "ParallelConfig":
        if self.compile and self.zero_stage == 3:
            raise ValueError("compile=true is supported with zero_stage 0-2 (ZeRO-3's parameter hooks break "
                             "the compiled graph)")
        return self


class CheckpointConfig(Strict):
    every_steps: int = Field(100, gt=0)
    keep_last: int = Field(3, ge=1)
    keep_every: int = Field(0, ge=0)
    # Resume from a checkpoint of another run/model/global batch by loading only its weights.
    start_fresh_from_weights: str | None = None
    allow_config_change: bool = False


class ClusterConfig(Strict):
    executor: Literal["local", "slurm"] = "local"
    profile: str = "local"
    nodes: int = Field(1, ge=1)
    tasks_per_node: int = Field(2, ge=1)
    time_min: int | None = Field(None, gt=0)
    partition: str | None = None
    max_requeues: int = Field(20, ge=0)
    ray_address: str | None = None
    array: list[dict[str, Any]] = Field(default_factory=list)  # one run per entry: overrides


class LoggingConfig(Strict):
    every_steps: int = Field(10, gt=0)
    # Record every consumed sample id per rank and step (samples/rank<r>.jsonl): audits the data order.
    sample_log: bool = False
    tensorboard: bool = True
    progress: bool = True


class TransferSet(Strict):
    name: str
    source: str
    val_per_class: int = Field(0, ge=0)


class ExtractConfig(Strict):
    features: list[str] = Field(default_factory=lambda: ["cls", "mean"])
    layers: list[int] = Field(default_factory=list)
    dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = Field(64, gt=0)
    actors: int = Field(2, ge=1)
    shard_rows: int = Field(4096, gt=0)
    # Datasets to embed; empty means the pretraining data itself.
    datasets: list[TransferSet] = Field(default_factory=list)


class EvaluateConfig(Strict):
    feature: str = "cls"
    knn_k: int = Field(20, gt=0)
    knn_temperature: float = Field(0.07, gt=0)
    probe: bool = True
    diagnostics: bool = True
    diagnostic_images: int = Field(8, gt=0)


class JobConfig(Strict):
    name: str = "demo"
    run_dir: str = "runs/${name}"
    seed: int = 0
    stages: list[Literal["ingest", "pretrain", "export", "extract", "evaluate"]] = Field(
        default_factory=lambda: ["ingest", "pretrain", "export"])
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(steps=100))
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _check(self) -> "JobConfig":
        if not _JOB_NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '.', '_' or '-' (at most 64), no spaces or quotes")
        world = self.world_size
        per_rank, rest = divmod(self.schedule.global_batch, world)
        if rest:
            raise ValueError(f"schedule.global_batch {self.schedule.global_batch} cannot be split over {world} ranks")
        if per_rank % self.schedule.micro_batch:
            raise ValueError(f"schedule.micro_batch {self.schedule.micro_batch} does not divide the per-rank batch "
                             f"{per_rank} (global_batch {self.schedule.global_batch} / {world} ranks)")
        return self

    @property
    def world_size(self) -> int:
        return self.cluster.nodes * self.cluster.tasks_per_node

    @property
    def grad_accum(self) -> int:
        return self.schedule.global_batch // (self.world_size * self.schedule.micro_batch)
