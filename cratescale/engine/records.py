"""The records a training process appends to metrics.jsonl, one TypedDict per kind: the writer (the trainer,
the asynchronous committer) and the readers (launch/progress.py, launch/status.py) name the same fields.
Rows are plain JSON objects on disk; MetricsWriter adds `time` (unix seconds) to each."""
from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict, Union


class StartRecord(TypedDict):
    """A process began (or resumed) training."""
    kind: Literal["start"]
    step: int
    world_size: int
    elastic: bool
    resumed: bool
    total_steps: int
    job_id: str | None
    setup_s: float  # process group, model, engine, resume, loader
    speed: dict[str, Any]  # parallel.{compile, compile_mode, activation_checkpointing, attention}
    decoder: str
    decoder_why: str
    decoder_changed_from: str | None
    gpu_decode: dict[str, Any]  # the decode route; fallbacks summed over ranks
    schedule_note: str | None
    passed_over: list[str]  # newer commits that failed verification at resume (one line each), newest first
    micro_batch: NotRequired[int]  # on this world (config/batching.py); schedule.micro_batch or smaller
    accum: NotRequired[int]
    time: NotRequired[float]


class FirstStepRecord(TypedDict):
    """This process's first step: loader start-up and (with parallel.compile) the compile."""
    kind: Literal["first_step"]
    step: int
    seconds_since_start: float
    time: NotRequired[float]


class TrainRecord(TypedDict):
    """A logging window (logging.every_steps); loss and data_wait are means over ranks."""
    kind: Literal["train"]
    step: int
    loss: float
    lr: float
    images_per_s: float
    data_wait: float
    mfu: float
    memory_gb: float
    epoch: float
    bad_samples: int  # summed over ranks
    time: NotRequired[float]


# A commit that landed. stall_s: training time lost to it; write_s: written while training went on; wait_s
# (async only): waiting for the previous write. recovered: sealed by a process that died before writing this row
# (a peer lost in the agreement after the seal, a kill); the next start wrote it, sealed_at the marker's time.
# The functional form because `async` is a keyword.
CommitRecord = TypedDict("CommitRecord", {
    "kind": Literal["commit"], "step": int, "seconds": float, "stall_s": float, "write_s": float, "async": bool,
    "wait_s": NotRequired[float], "recovered": NotRequired[bool], "sealed_at": NotRequired[float],
    "time": NotRequired[float]})


class CommitSkippedRecord(TypedDict):
    """checkpoint.when_busy=skip: a commit left out because `writing` was still being written."""
    kind: Literal["commit_skipped"]
    step: int
    writing: int
    skipped: int
    time: NotRequired[float]


class EndRecord(TypedDict):
    """The process stopped: completed, preempted, or bad_data (with the one-line error)."""
    kind: Literal["end"]
    step: int
    status: Literal["completed", "preempted", "bad_data"]
    error: NotRequired[str]
    time: NotRequired[float]


MetricRecord = Union[StartRecord, FirstStepRecord, TrainRecord, CommitRecord, CommitSkippedRecord, EndRecord]
