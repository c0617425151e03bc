"""The time-boxed section harness of bench/gpu_bench.py: rows, deadlines, the markdown/JSON results."""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import signal
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

COLUMNS = ["section", "what", "measured", "unit", "baseline", "ratio", "target", "mfu", "note"]


class SectionTimeout(Exception):
    """A section ran past its time box."""


@contextlib.contextmanager
def time_box(seconds: float):
    """Raise SectionTimeout in the main thread after `seconds` (delivered once the current C call returns)."""
    def _raise(signum, frame):
        raise SectionTimeout(f"time box of {seconds:.0f}s exceeded")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Bench:
    """Rows, the global deadline, incremental output."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = time.monotonic() + args.budget
        self.rows: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        self.out_dir = Path(args.out_dir) if args.out_dir else None
        self.device = torch.device("cpu" if args.cpu_smoke else "cuda")
        self.peak_flops: float | None = None
        self.train: dict[tuple[str, str, bool], dict[str, Any]] = {}  # (model, layout, compiled) -> result

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, section: str, what: str, **fields: Any) -> dict[str, Any]:
        row = {"section": section, "what": what, **fields}
        self.rows.append(row)
        print("  " + " | ".join(f"{k}={_fmt(row.get(k))}" for k in COLUMNS if row.get(k) not in (None, "")),
              flush=True)
        self.flush()
        return row

    def section(self, name: str, budget_s: float, min_s: float, fn: Callable[[], None]) -> None:
        left = self.remaining()
        if left < min_s:
            self.add(name, "(section)", note=f"skipped: {left:.0f}s left of the global budget, needs >= {min_s:.0f}s")
            return
        box = min(budget_s, left - 1.0)
        print(f"== {name} (time box {box:.0f}s, {left:.0f}s left)", flush=True)
        t0 = time.monotonic()
        try:
            with time_box(box):
                fn()
        except SectionTimeout as exc:
            self.add(name, "(section)", note=f"timed out: {exc}")
        except Exception as exc:  # noqa: BLE001 - one section failing must not stop the others
            traceback.print_exc()
            self.add(name, "(section)", note=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        finally:
            cleanup()
            print(f"   ({name}: {time.monotonic() - t0:.1f}s)", flush=True)

    def flush(self) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "gpu_results.md").write_text(markdown(self.rows, self.meta))
        (self.out_dir / "gpu_results.json").write_text(json.dumps({"meta": self.meta, "rows": self.rows},
                                                                  indent=1, default=str))


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = [f"machine: {meta.get('device', '?')}; torch {meta.get('torch', '?')}; "
            f"peak bf16 matmul {meta.get('peak_tflops', '?')} TFLOP/s (measured, MFU denominator)", "",
            "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    body = ["| " + " | ".join(_fmt(r.get(k)) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(head + body) + "\n"


def cleanup() -> None:
    torch._dynamo.reset()  # compiled graphs of a finished row hold their model's weights and buffers
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
