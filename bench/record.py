"""The raw output of a CPU benchmark, kept in bench/results/: what ran (the command line), when, on what machine
and under what load. The machine is shared (a CI suite may run beside a benchmark), so the 1-minute load average
is taken when the run starts and when it ends; BENCHMARKS.md's machine column quotes both.

    run = Run()                       # at the start of main(): takes the date, command line and load
    ...
    run.save(args.json, {"reps": [...], "rows": [...]})   # adds the load at the end; no-op when path is None
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: the platform's word is all there is
        pass
    import platform

    return platform.processor() or "unknown"


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def add_json_arg(parser: argparse.ArgumentParser, name: str) -> None:
    """`--json PATH`: where the raw output goes (off unless given, so tests that run a script write nothing)."""
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help=f"write per-rep data and the machine to PATH (kept as bench/results/{name}.json)")


class Run:
    """One benchmark run's header: started at construction, closed by save()."""

    def __init__(self) -> None:
        self.started = time.time()
        script = Path(sys.argv[0]).resolve()
        script = script.relative_to(REPO) if script.is_relative_to(REPO) else script
        self.header = {"command": ["python", str(script), *sys.argv[1:]],
                       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
                       "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_start": load_average()}}

    def save(self, path: Path | None, data: dict) -> dict:
        """Write header + data to path (when given) and return it; the header gains the end load and duration."""
        machine = {**self.header["machine"], "load_end": load_average()}
        out = {**self.header, "machine": machine, "seconds": round(time.time() - self.started, 1), **data}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out, indent=1, default=str) + "\n")
            print(f"raw output: {path} (load average {machine['load_start']} at start, {machine['load_end']} at end)")
        return out
