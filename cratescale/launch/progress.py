"""A run's progress, restarts and lost work, read from the metrics its ranks write (no job needed)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from cratescale.config import RunPaths
from cratescale.engine.records import EndRecord, FirstStepRecord, MetricRecord, StartRecord, TrainRecord

class RunProgress:
    """Folds metrics.jsonl in as it grows: each update reads only the lines written since the last one, so a
    supervisor polling a months-long run every few seconds does not re-parse the whole file each time."""

    def __init__(self, run_dir: Path) -> None:
        self.path = RunPaths.of_run(run_dir).metrics
        self.offset = 0
        self.starts = self.commits = self.preempted = self.lost = self.step = 0
        self.total_steps: int | None = None
        self.last_train: TrainRecord | None = None
        self.last_start: StartRecord | None = None
        self.last_time: float | None = None  # when rank 0 last wrote a record (unix seconds)
        self.last_end: str | None = None
        self.first_step_s: float | None = None

    def update(self) -> dict[str, Any]:
        if self.path.exists():
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            whole = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next update
            self.offset += len(whole)
            for line in whole.splitlines():
                try:
                    self._fold(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill; the next ones are whole
                    continue
        return self.summary()

    def _fold(self, row: MetricRecord) -> None:
        kind = row.get("kind")
        self.last_time = row.get("time", self.last_time)
        if kind == "start":
            start = cast(StartRecord, row)
            self.starts += 1
            self.last_start = start
            self.last_end = None  # a new process (a resume, a longer schedule): not ended until it says so
            self.total_steps = start.get("total_steps")
            if start.get("resumed"):
                self.lost += max(0, self.step - start["step"])
        elif kind == "train":
            self.last_train = cast(TrainRecord, row)
        elif kind == "commit":
            self.commits += 1
            if row.get("recovered"):  # written at the next start: the step reached before it is what counts
                return
        elif kind == "first_step":
            # rank 0's start of its latest process to its first step (process group, engine, loader, compile)
            self.first_step_s = round(cast(FirstStepRecord, row)["seconds_since_start"], 1)
        elif kind == "end":
            end = cast(EndRecord, row)
            self.last_end = end.get("status")
            self.preempted += end.get("status") == "preempted"
        if "step" in row:
            self.step = row["step"]

    def summary(self) -> dict[str, Any]:
        return {"restarts": max(0, self.starts - 1), "lost_steps": self.lost, "step": self.step,
                "total_steps": self.total_steps, "last": self.last_train, "finished": self.last_end == "completed",
                "preempted": self.preempted, "commits": self.commits, "first_step_s": self.first_step_s,
                "started": self.starts > 0, "ended": self.last_end, "last_record_time": self.last_time,
                "decoder": (self.last_start or {}).get("decoder"), "start": self.last_start}


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Progress, restarts and lost work of a run, read once from its metrics."""
    return RunProgress(run_dir).update()
