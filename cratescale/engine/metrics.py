"""Training metrics: JSONL + TensorBoard on rank 0, images/s, data-wait fraction and MFU."""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from cratescale.config import RunPaths
from cratescale.engine.records import CommitRecord, CommitSkippedRecord, MetricRecord


class MetricsWriter:
    """Appends one JSON object per line (readable while training runs) and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        paths = RunPaths.of_run(run_dir)
        self.path = paths.metrics
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(paths.tensorboard))
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def write(self, record: MetricRecord) -> None:
        record = {"time": time.time(), **record}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def say(line: str) -> None:
    """One console line of the run (rank 0), flushed: the launcher and SLURM logs show it at once."""
    print(f"[cratescale] {line}", flush=True)


def commit_line(record: CommitRecord | CommitSkippedRecord) -> str:
    """The console line of a finished (or skipped) commit."""
    if record["kind"] == "commit_skipped":
        return (f"skipped the commit of step {record['step']}: step {record['writing']} is still being written "
                f"(checkpoint.when_busy=skip; {record['skipped']} skipped)")
    stalled = f" (training stalled {record['stall_s']:.2f}s)" if record["async"] else ""
    return f"committed step {record['step']} in {record['seconds']:.2f}s{stalled}"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = RunPaths.of_run(run_dir).metrics
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill; the next ones are whole
            continue
    return rows


def unrecorded_commits(run_dir: Path, sealed: dict[int, float]) -> list[CommitRecord]:
    """Rows for the sealed commits (step -> the marker's time) that metrics.jsonl has no commit row for: a process
    that died between the seal and its row (its peer lost in the agreement that follows the seal, a kill -9).
    Written by the next start, before its start row, so that metrics, status and lost steps agree with the store."""
    path = RunPaths.of_run(run_dir).metrics
    recorded: set[int] = set()
    if path.exists():
        with path.open() as f:
            for line in f:
                if '"kind": "commit"' in line:  # parse only the commit rows of a weeks-long file
                    try:
                        recorded.add(json.loads(line)["step"])
                    except (json.JSONDecodeError, KeyError):
                        continue
    return [{"kind": "commit", "step": step, "seconds": 0.0, "stall_s": 0.0, "write_s": 0.0, "async": False,
             "recovered": True, "sealed_at": when} for step, when in sorted(sealed.items()) if step not in recorded]


class StepTimer:
    """Wall time split into waiting for data and the rest, over a logging window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.images = 0

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of work that is not training (an evaluation) out of the window."""
        self.start += seconds

    def window(self) -> tuple[float, float, int]:
        return time.perf_counter() - self.start, self.data_wait, self.images


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def mfu(images_per_s: float, flops_per_image: float, peak_flops_per_device: float, devices: int) -> float:
    return images_per_s * flops_per_image / (peak_flops_per_device * devices)
