"""What the launcher prints while a job runs: one console shared by the stages, a rich progress bar fed by the
supervisor's polls, and the one-line error a stage ends with."""
from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text


class PlainConsole(Console):
    """The console when it is a log file (an sbatch output, a pipe): one plain line per message, never wrapped at
    80 columns or padded, stage banners as `== name ==` instead of a rule drawn across the width."""

    def log(self, *objects: Any, **_: Any) -> None:
        line = " ".join(str(o) for o in objects)
        self.print(f"[{time.strftime('%H:%M:%S')}] {line}", markup=False, highlight=False, soft_wrap=True)

    def rule(self, title: str = "", **_: Any) -> None:
        self.print(f"== {Text.from_markup(str(title)).plain} ==", markup=False, highlight=False, soft_wrap=True)


console = Console() if sys.stdout.isatty() else PlainConsole(soft_wrap=True, highlight=False)


class StageError(RuntimeError):
    """A stage that did not produce what the next one needs."""


class TrainingDisplay:
    """The bar (off with logging.progress=false: a log file gets no redraws) and one line per state change."""

    def __init__(self, console: Console | None = None, bar: bool = True) -> None:
        self.console = console or Console()
        self.progress = Progress(TextColumn("[bold]{task.fields[state]:<10}"), BarColumn(),
                                 TextColumn("step {task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), console=self.console, transient=False,
                                 disable=not bar or not self.console.is_terminal)
        self.task = self.progress.add_task("train", total=None, state="PENDING", info="")
        self.last_state = None
        self.last_start_time: float | None = None

    def __enter__(self) -> "TrainingDisplay":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def update(self, status: dict[str, Any]) -> None:
        last = status.get("last") or {}
        info = ""
        if last:
            info = (f"loss {last['loss']:.4f}  {last['images_per_s']:.0f} img/s  wait {last['data_wait']:.0%}  "
                    f"mfu {last['mfu']:.1%}")
        if status["restarts"] or status["requeues"]:
            info += f"  restarts {status['restarts']} (lost {status['lost_steps']} steps)"
        self.progress.update(self.task, completed=status["step"], total=status["total_steps"],
                             state=status["state"], info=info)
        start = status.get("start")
        if start and start.get("time") != self.last_start_time:
            self.last_start_time = start.get("time")
            for line in start_lines(start):
                self.console.log(line)
        if status["state"] != self.last_state:
            lost = f" (lost a node: {status['node_failures']}, now {status['nodes']} node(s))" \
                if status.get("node_failures") and status["state"] == "REQUEUED" else ""
            self.console.log(f"job {status['job_id']}: {status['state']}{lost}")
            self.last_state = status["state"]


def start_lines(start: dict[str, Any]) -> list[str]:
    """Rank 0's key lines of a training process's start, for the launcher's console: where it resumed (on which
    world), the schedule note, commits passed over, the decoder and how the batch is cut."""
    world = f"{start['world_size']} rank(s)"
    if start.get("resumed"):
        how = "elastic: another world size, through the universal checkpoint" if start.get("elastic") else "same world"
        lines = [f"training resumed from step {start['step']} on {world} ({how})"]
    else:
        lines = [f"training started at step {start['step']} on {world}"]
    lines += list(start.get("passed_over") or [])
    if start.get("schedule_note"):
        lines.append(str(start["schedule_note"]))
    micro = f", micro-batch {start['micro_batch']} x {start['accum']}" if start.get("micro_batch") else ""
    lines.append(f"decoder {start.get('decoder')} ({start.get('decoder_why')}){micro}")
    return lines
