"""What the launcher prints while a job runs: one console shared by the stages, a rich progress bar fed by the
supervisor's polls, and the one-line error a stage ends with."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

console = Console()


class StageError(RuntimeError):
    """A stage that did not produce what the next one needs."""


class TrainingDisplay:
    """The bar (off with logging.progress=false: a log file gets no redraws) and one line per state change."""

    def __init__(self, console: Console | None = None, bar: bool = True) -> None:
        self.console = console or Console()
        self.progress = Progress(TextColumn("[bold]{task.fields[state]:<10}"), BarColumn(),
                                 TextColumn("step {task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), console=self.console, transient=False, disable=not bar)
        self.task = self.progress.add_task("train", total=None, state="PENDING", info="")
        self.last_state = None

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
        if status["state"] != self.last_state:
            lost = f" (lost a node: {status['node_failures']}, now {status['nodes']} node(s))" \
                if status.get("node_failures") and status["state"] == "REQUEUED" else ""
            self.console.log(f"job {status['job_id']}: {status['state']}{lost}")
            self.last_state = status["state"]
