"""The job config tree: one typed, validated description of a run, saved with it."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

STAGES = ("ingest", "pretrain", "export", "finetune", "extract", "evaluate")
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# Marks a field as part of the resume identity (config/identity.py): what a checkpoint's training continues with
# (model, optimizer, the global batch, the seed, what the loader and sampler read). Everything unmarked (paths,
# dry-run hints, speed knobs, the schedule's length) may change across a resume.
IDENTITY = {"identity": True}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    # A registered model (python -m cratescale.models lists them with their parameter counts).
    name: str = Field("crate_mae_debug", json_schema_extra=IDENTITY)
    # Constructor overrides of the registered size (img_size, patch_size, lambd, eta, mask_ratio, ...).
    overrides: dict[str, Any] = Field(default_factory=dict, json_schema_extra=IDENTITY)


class DataConfig(Strict):
    # A path (folder, .tar, .tar.gz, webdataset dir) or synthetic://shapes?n=...&classes=...&size=...
    source: str = "synthetic://shapes?n=2048&classes=10&size=48"
    # Where the manifest lives; default: <run_dir>/data. Ingest runs when it holds no manifest.
    root: str | None = None
    # Size hint for --dry-run before ingest has counted (ImageNet-21k winter21: 13,153,500; fall11: 14,197,122).
    expected_samples: int | None = Field(None, gt=0)
    # The square side, in pixels, that the loader crops and resizes to (the model's img_size).
    image_size: int = Field(32, gt=0, json_schema_extra=IDENTITY)
    # The training decoder: dali (DALI, CPU here and nvJPEG on GPUs), pil (PIL workers), or auto (DALI if
    # installed).
    loader: Literal["auto", "dali", "pil"] = "auto"
    # DALI's CPU threads per rank.
    num_threads: int = Field(1, ge=1)
    # DALI on GPUs: share of JPEGs for the hardware decoder (BENCHMARKS.md "Input pipeline plan"), and how many
    # batches the pipeline prepares ahead of the training step. hw_decoder_load and shard_size are
    # data_pipeline's defaults too (HW_DECODER_LOAD, SHARD_SIZE; tests/unit/test_config.py keeps them equal).
    hw_decoder_load: float = Field(0.75, ge=0.0, le=1.0)
    # Batches DALI prepares ahead of the training step.
    prefetch_depth: int = Field(2, ge=1, le=8)
    # GPU JPEG decode route: roi (crop-window decoder), full (whole image + GPU slice), or auto (roi if it
    # survives a two-batch probe in a child process at start-up, else full; data_pipeline/gpu_decode.py).
    gpu_decode: Literal["auto", "roi", "full"] = "auto"
    # Processes that read encoded bytes for DALI's parallel external source (training, extraction, evaluation).
    feed_workers: int = Field(1, ge=1)
    # Ingest: samples per class held out as the val split (the evaluation's test set).
    val_per_class: int = Field(0, ge=0)
    # Ingest: re-encode images to this side (shorter edge, JPEG) into new tar shards; null keeps the source bytes.
    reshard: int | None = Field(None, gt=0)
    # Ingest: samples per tar shard when resharding.
    shard_size: int = Field(1000, gt=0)
    # Bad-data budget (engine/data_budget.py): the run stops with one line when unreadable samples exceed this
    # fraction of the samples seen, or most of the last bad_window_steps steps' samples, or one finds no
    # decodable replacement.
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    # The window, in steps, of the bad-data budget's 'most of the recent samples' rule.
    bad_window_steps: int = Field(10, ge=1)
    # Ingest tasks in flight: one per CPU of the Ray cluster the launcher runs in ("auto"), a number, or 0 (inline).
    ingest_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"


class OptimConfig(Strict):
    base_lr: float = Field(1.5e-4, gt=0, json_schema_extra=IDENTITY)  # scaled by global_batch / 256
    # AdamW's decoupled weight decay; 1-D parameters (norms, biases) and the tokens and position tables get none.
    weight_decay: float = Field(0.05, ge=0, json_schema_extra=IDENTITY)
    # AdamW's (beta1, beta2).
    betas: tuple[float, float] = Field((0.9, 0.95), json_schema_extra=IDENTITY)
    # Clip the global gradient norm to this; null turns clipping off.
    grad_clip: float | None = Field(1.0, gt=0, json_schema_extra=IDENTITY)


class ScheduleConfig(Strict):
    # The global batch defines the data order; micro_batch only splits it (as the world size does), and the length
    # and warmup may change on resume (the learning-rate schedule is then recomputed, with a note).
    global_batch: int = Field(64, gt=0, json_schema_extra=IDENTITY)
    # Images per rank per forward/backward; on a world where it does not divide the per-rank share, smaller ones are
    # used.
    micro_batch: int = Field(16, gt=0)
    # Training length in optimizer steps (set this or epochs).
    steps: int | None = Field(None, gt=0)
    # Training length in epochs of the training split (set this or steps).
    epochs: float | None = Field(None, gt=0)
    # Linear learning-rate warm-up, in steps (overrides warmup_epochs); then a cosine decay to the end.
    warmup_steps: int | None = Field(None, ge=0)
    # Linear learning-rate warm-up, in epochs, when warmup_steps is not set.
    warmup_epochs: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _length(self) -> "ScheduleConfig":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of steps or epochs")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of micro_batch {self.micro_batch}")
        return self


class ParallelConfig(Strict):
    # DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states sharded), 2 (+ gradients), 3 (+
    # parameters).
    zero_stage: Literal[0, 1, 2, 3] = 2
    # Training precision: bf16 (fp32 master weights) or fp32.
    precision: Literal["fp32", "bf16"] = "bf16"
    # The process group's backend: nccl (GPUs), gloo (CPUs), or auto (nccl when CUDA is there).
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Recompute block activations in backward (memory for about one extra forward); see distributed/wrap.py.
    activation_checkpointing: bool = False
    # torch.compile the model in place before DeepSpeed wraps it (first step pays the compile time).
    compile: bool = False
    # SDPA kernel on GPUs (distributed/wrap.py); cudnn measured fastest on an H100 (BENCHMARKS.md).
    # mssa_triton: CRATE's MSSA takes the q = k = v Triton kernel (cratescale/kernels/mssa_triton.py).
    attention: Literal["auto", "flash", "cudnn", "efficient", "mssa_triton"] = "auto"
    # torch.compile mode with compile=true; "reduce-overhead" captures CUDA graphs (the fixed per-step cost at
    # small per-GPU batches, BENCHMARKS.md "GPU").
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    # Overlap the gradient reduction with backward (more bucket memory); null keeps DeepSpeed's default (off
    # for ZeRO-1/2, on for ZeRO-3). One H100, world size 1: 4% slower (nothing to overlap there).
    overlap_comm: bool | None = None
    # Under precision bf16, where the reconstruction target (and its norm_pix statistics) come from: "fp32", the
    # loader's fp32 pixels (the model casts its own input to bf16), or "bf16", the bf16-cast input (the behaviour
    # before issue 12). Measured on a shortened cifar10 recipe in BENCHMARKS.md.
    bf16_target: Literal["fp32", "bf16"] = "fp32"
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
    # Commit a checkpoint every this many steps (and always at a stop and at the end).
    every_steps: int = Field(100, gt=0)
    # Committed checkpoints kept (the newest is never deleted).
    keep_last: int = Field(3, ge=1)
    # Also keep every commit whose step is a multiple of this; 0 keeps none beyond keep_last.
    keep_every: int = Field(0, ge=0)
    # Resume from a checkpoint of another run/model/global batch by loading only its weights.
    start_fresh_from_weights: str | None = None
    # Resume even when the checkpoint's identity (model, optimizer, batch, seed, data) differs, with a warning.
    allow_config_change: bool = False
    # Resume under another decoder (DALI cpu / mixed, PIL, other versions): its pixels differ from the saved run's.
    allow_decoder_change: bool = False
    # Asynchronous commit (issue 18): state copied to host memory at the step boundary, written by a
    # background thread while training goes on. when_busy: a commit asked while one is writing waits for
    # it, or is skipped (counted in metrics and the console). The final/stop commit always waits.
    # Off by default until the whole fault tier has passed with it (tests/faults run it explicitly).
    async_commit: bool = False
    # With async_commit: a commit asked while one is still writing waits for it (wait) or is skipped and counted
    # (skip).
    when_busy: Literal["wait", "skip"] = "wait"


class ClusterConfig(Strict):
    # Where training runs: local (processes on this machine, through submitit) or slurm (submitted with sbatch).
    executor: Literal["local", "slurm"] = "local"
    # A cluster profile from cluster/profiles/ (partition, GPUs and CPUs per node, env, peak FLOP/s), or a path.
    profile: str = "local"
    # Nodes to train on.
    nodes: int = Field(1, ge=1)
    # The fewest nodes a restart may run on after a lost node: the largest count from min_nodes to nodes whose
    # ranks split the global batch is used, and the full count again once the nodes are back.
    min_nodes: int = Field(1, ge=1)
    # No node count fits (too few usable nodes): wait for nodes to return, or stop the run with one line.
    when_no_fit: Literal["wait", "stop"] = "wait"
    # How often following a SLURM run asks SLURM (squeue while it lives, sacct once it ended); the run directory
    # (metrics, commits) is read every second. Schedulers' admins forbid tighter polling of slurmdbd.
    slurm_poll_s: float = Field(30.0, ge=10)
    # Ranks per node (one per GPU on a GPU cluster).
    tasks_per_node: int = Field(2, ge=1)
    # The job's time limit in minutes; null takes the profile's.
    time_min: int | None = Field(None, gt=0)
    # The SLURM partition; null takes the profile's.
    partition: str | None = None
    # Requeues and resubmissions a run may use in all before it stops.
    max_requeues: int = Field(20, ge=0)
    # A Ray cluster to join for ingest and extraction; null starts (or joins) a local one.
    ray_address: str | None = None
    array: list[dict[str, Any]] = Field(default_factory=list)  # one run per entry: overrides


class LoggingConfig(Strict):
    # A metrics row and a console line every this many steps.
    every_steps: int = Field(10, gt=0)
    # Record every consumed sample id per rank and step (samples/rank<r>.jsonl): audits the data order.
    sample_log: bool = False
    # Mirror the metrics to TensorBoard under <run_dir>/tensorboard.
    tensorboard: bool = True
    # The launcher's progress bars (ingest, training); false for a console that is a log file.
    progress: bool = True
    # The held-out reconstruction loss (the val split's masked patches, masks drawn from (seed, row): the same at
    # every step and for every model of the same data) every this many steps and after the last; null: off.
    heldout_every_steps: int | None = Field(None, gt=0)


class TransferSet(Strict):
    # The set's name: its store is embeddings/<name>, its report report/<name>.
    name: str
    # The set's images: a folder of class folders, a tar, or synthetic://...
    source: str
    # Samples per class held out as its test split.
    val_per_class: int = Field(0, ge=0)


class ExtractConfig(Strict):
    # What each store row holds: cls (the class token) and/or mean (mean of the patch tokens).
    features: list[str] = Field(default_factory=lambda: ["cls", "mean"])
    # Encoder blocks whose mean-pooled output is stored too (evaluate.layers adds every block).
    layers: list[int] = Field(default_factory=list)
    # The stored features' precision.
    dtype: Literal["float16", "float32"] = "float16"
    # A number, or "auto": the largest batch / most actors the nodes' memory and CPUs (GPUs) hold, from each
    # actor's predicted peak memory (embeddings/memory.py); actors ask Ray for that memory either way.
    batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = 64
    # Extraction actors (Ray), or auto.
    actors: Annotated[int, Field(ge=1)] | Literal["auto"] = 2
    # Rows per store shard (the unit one writer owns and commits).
    shard_rows: int = Field(4096, gt=0)
    # GPUs each actor asks Ray for (0: CPU actors, which never touch a GPU); on a GPU the encoder runs in bf16
    # autocast. A dead actor (killed for memory or anything) restarts at most max_restarts times, then the stage
    # stops with one line; committed shards are kept.
    gpus_per_actor: float = Field(0.0, ge=0)
    # Restarts of a dead extraction actor before the stage stops with one line.
    max_restarts: int = Field(3, ge=0)
    # Datasets to embed; empty means the pretraining data itself.
    datasets: list[TransferSet] = Field(default_factory=list)


class EvaluateConfig(Strict):
    # The stored feature the report's probe and kNN use (cls or mean).
    feature: str = "cls"
    # Neighbours of the weighted kNN classifier.
    knn_k: int = Field(20, gt=0)
    # The kNN's softmax temperature over cosine similarities.
    knn_temperature: float = Field(0.07, gt=0)
    # Fit the linear probe (L-BFGS, C chosen on a validation split).
    probe: bool = True
    # White-box diagnostics: coding rate, R^c and sparsity per layer, attention maps, reconstructions.
    diagnostics: bool = True
    # Images shown in the attention and reconstruction figures.
    diagnostic_images: int = Field(8, gt=0)
    # Beside the pretrained features, the same protocol on: "init" (the same architecture at its
    # initialization, same seed; extract embeds it too) and "pixels" (raw pixels at the model's input size).
    baselines: list[Literal["init", "pixels"]] = Field(default_factory=lambda: ["init", "pixels"])
    # Probe + kNN on every encoder layer's mean-pooled output (extract adds every layer to the stores).
    layers: bool = True


class FinetuneConfig(Strict):
    # Fine-tune the exported encoder with a classification head (and the scratch arm) after export. Not part of the
    # pretraining's resume identity: changing a fine-tune setting never blocks resuming the pretraining.
    enabled: bool = False
    # Which arms run: pretrained (the export's encoder) and scratch (the same architecture from its initialization,
    # same seed and steps).
    arms: list[Literal["pretrained", "scratch"]] = Field(default_factory=lambda: ["pretrained", "scratch"])
    # Length in optimizer steps (set this or epochs when enabled).
    steps: int | None = Field(None, gt=0)
    # Length in epochs of the fine-tuning set's train split (set this or steps when enabled); MAE: 100 for ViT-B.
    epochs: float | None = Field(None, gt=0)
    # Images per optimizer step over all ranks; the peak learning rate scales with it.
    global_batch: int = Field(64, gt=0)
    # Images per rank per forward/backward (global_batch = micro_batch x accumulation x ranks).
    micro_batch: int = Field(16, gt=0)
    # MAE's blr: the peak learning rate is base_lr * global_batch / 256.
    base_lr: float = Field(5e-4, gt=0)
    # The cosine schedule's floor (MAE: 1e-6).
    min_lr: float = Field(1e-6, ge=0)
    # Layer-wise learning-rate decay: block i learns at layer_decay ** (depth - i) of the head's rate, the patch
    # embedding and tokens at layer_decay ** (depth + 1) (MAE: 0.75 for ViT-B).
    layer_decay: float = Field(0.75, gt=0, le=1)
    # AdamW's decoupled weight decay; norms, biases, the cls token and positions get none.
    weight_decay: float = Field(0.05, ge=0)
    # AdamW's (beta1, beta2): torch's defaults, as MAE fine-tunes (pretraining uses optim.betas).
    betas: tuple[float, float] = (0.9, 0.999)
    # Clip the global gradient norm to this; null (MAE's fine-tuning default) turns clipping off.
    grad_clip: float | None = Field(None, gt=0)
    # Stochastic depth: block i of depth d drops its residual branches with probability drop_path * i / (d - 1).
    drop_path: float = Field(0.1, ge=0, lt=1)
    # Label smoothing of the cross entropy (and of mixup's soft targets).
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    # Mixup's Beta(alpha, alpha); 0 is off. MAE uses 0.8 with cutmix 1.0 over 100 ImageNet epochs, where they
    # fight overfitting; a run of a few hundred steps on a small CPU model underfits, and mixing only slows it.
    mixup: float = Field(0.0, ge=0)
    # Cutmix's Beta(alpha, alpha); 0 is off (see mixup for why). With both on a batch takes one of them, even odds.
    cutmix: float = Field(0.0, ge=0)
    # Linear warm-up in steps (overrides warmup_epochs).
    warmup_steps: int | None = Field(None, ge=0)
    # Linear warm-up in epochs when warmup_steps is not set (MAE: 5).
    warmup_epochs: float = Field(5.0, ge=0)
    # Seeds the head, the scratch arm's initialization, the data order, drop path and mixing; null: the job's
    # seed, so the scratch arm starts from the initialization pretraining started from.
    seed: int | None = None
    # Top-1 on the transfer set's val split every this many steps (a {"kind": "eval"} metrics row), and after the
    # last step; null: after the last step only.
    eval_every_steps: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "FinetuneConfig":
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set one of steps or epochs, not both")
        if self.enabled and self.steps is None and self.epochs is None:
            raise ValueError("enabled: set steps or epochs")
        if not self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms {self.arms}: name each of pretrained, scratch at most once, at least one")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of micro_batch {self.micro_batch}")
        return self


class JobConfig(Strict):
    # The run's name: letters, digits, '.', '_' or '-'; the SLURM job name and ${name} in run_dir.
    name: str = "demo"
    # Where the run lives (config, metrics, checkpoints, exports, embeddings, reports); ${name} is replaced.
    run_dir: str = "runs/${name}"
    # Seeds the model's initialization, the sampler's permutations and every per-sample augmentation and mask.
    seed: int = Field(0, json_schema_extra=IDENTITY)
    # The stages to run, in this order: ingest, pretrain, export, finetune, extract, evaluate.
    stages: list[Literal["ingest", "pretrain", "export", "finetune", "extract", "evaluate"]] = Field(
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
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)

    @model_validator(mode="after")
    def _check(self) -> "JobConfig":
        if not _JOB_NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '.', '_' or '-' (at most 64), no spaces or quotes")
        if self.cluster.min_nodes > self.cluster.nodes:
            raise ValueError(f"cluster.min_nodes {self.cluster.min_nodes} > cluster.nodes {self.cluster.nodes}")
        _check_split("schedule", self.schedule.global_batch, self.schedule.micro_batch, self.world_size)
        if self.finetune.enabled:
            _check_split("finetune", self.finetune.global_batch, self.finetune.micro_batch, self.world_size)
        return self

    @property
    def finetune_seed(self) -> int:
        return self.seed if self.finetune.seed is None else self.finetune.seed

    @property
    def world_size(self) -> int:
        return self.cluster.nodes * self.cluster.tasks_per_node

    @property
    def grad_accum(self) -> int:
        return self.schedule.global_batch // (self.world_size * self.schedule.micro_batch)


def _check_split(section: str, global_batch: int, micro_batch: int, world: int) -> None:
    per_rank, rest = divmod(global_batch, world)
    if rest:
        raise ValueError(f"{section}.global_batch {global_batch} cannot be split over {world} ranks")
    if per_rank % micro_batch:
        raise ValueError(f"{section}.micro_batch {micro_batch} does not divide the per-rank batch "
                         f"{per_rank} (global_batch {global_batch} / {world} ranks)")
