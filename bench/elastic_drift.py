"""How far a resume on another world size moves a bf16 run, against how far two runs of one world size drift
(issue 27): the measurement behind the bounds in tests/slurm/test_train_slurm.py and tests/slurm/test_multinode.py.

The SLURM tests' job (tests/dist/tiny.yaml: DALI on the CPU, bf16, ZeRO-2, 100 steps) trained by local gloo ranks:
  - two uninterrupted 2-rank runs (same world, same threads: expected bitwise equal);
  - for each stop step k: 2 ranks to k, then 1 rank from k's commit to the end, compared with the 2-rank run;
  - the k with the largest difference resumed twice on 1 rank (the elastic path itself deterministic?).

    .venv/bin/python -m bench.elastic_drift [--stops 2,3,5,10,25,50,75,95] [--out bench/results/elastic_drift.json]

Prints one JSON line per comparison: the largest |a - b| over all weights, the largest |a - b| / |b| where |b| is
not tiny, and the worst element of torch.testing.assert_close's rule as a fraction of its tolerance at
(rtol, atol) = (1e-4, 1e-5); one weight tensor's norm of the change, relative to the change training made.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from tests.dist.harness import final_weights, run_ranks, write_config

BASE_JOB = Path(__file__).resolve().parents[1] / "tests" / "dist" / "tiny.yaml"
STEPS = 100
COMMON: list[str] = [f"schedule.steps={STEPS}", "logging.every_steps=1", "checkpoint.keep_last=2", "checkpoint.every_steps=50"]


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], init: dict[str, torch.Tensor] | None) -> dict:
    """Largest absolute and relative differences over all tensors, and the assert_close ratio at 1e-4 / 1e-5."""
    worst_abs = worst_rel = worst_tol = 0.0
    changed = moved = 0.0
    for key, ref in b.items():
        x, y = a[key].double(), ref.double()
        d = (x - y).abs()
        worst_abs = max(worst_abs, d.max().item())
        big = y.abs() > 1e-3
        if big.any():
            worst_rel = max(worst_rel, (d[big] / y.abs()[big]).max().item())
        worst_tol = max(worst_tol, (d / (1e-5 + 1e-4 * y.abs())).max().item())
        if init is not None:
            moved += (y - init[key].double()).pow(2).sum().item()
            changed += d.pow(2).sum().item()
    out = {"max_abs": worst_abs, "max_rel": worst_rel, "assert_close_ratio": worst_tol}
    if init is not None:
        out["diff_over_training_change"] = (changed / moved) ** 0.5 if moved else None
    return out


def train(root: Path, name: str, manifest: Path, world: int, stop_after: int | None = None) -> Path:
    """`root/name` trained on `world` ranks (from its commit, when it holds one)."""
    run_dir = root / name
    config = write_config(BASE_JOB, run_dir, [*COMMON, f"cluster.tasks_per_node={world}"])
    run_ranks(config, manifest, world, stop_after, timeout=600)
    return run_dir


def resumed_copy(stopped: Path, name: str) -> str:
    """A copy of a stopped run beside it, to resume from its commit; returns the copy's name."""
    shutil.copytree(stopped, stopped.with_name(name))
    return name


def compare_resumes(train: Callable[..., Path], stops: list[int], steps: int,
                    emit: Callable[[dict], None]) -> tuple[int, dict | None]:
    """The rows of this bench and bench/finetune_elastic_drift.py: two uninterrupted 2-rank runs against each
    other, then for each stop step k, 2 ranks to k and 1 rank from k's commit to the end against the first.
    `train(name, world, stop_after=None)` trains one run and returns its directory. Returns the stop with the
    largest difference and the weights at step 0 (None when the run commits none)."""
    init_dir = train("init", 2, stop_after=0)
    init = final_weights(init_dir)[1] if (init_dir / "checkpoints").exists() else None
    ref_a = final_weights(train("ref_a", 2))[1]
    ref_b = final_weights(train("ref_b", 2))[1]
    emit({"what": "same world (2 ranks), two runs", **difference(ref_b, ref_a, init)})
    worst_k, worst = stops[0], -1.0
    for k in stops:
        stopped = train(f"stop_{k}", 2, stop_after=k)
        resumed = final_weights(train(resumed_copy(stopped, f"elastic_{k}"), 1))[1]
        diff = difference(resumed, ref_a, init)
        emit({"what": "2 -> 1 ranks vs 2 ranks", "stop_step": k, "steps_on_1": steps - k, **diff})
        if diff["max_abs"] > worst:
            worst_k, worst = k, diff["max_abs"]
    return worst_k, init


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stops", default="2,3,5,10,25,50,75,95")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="key=value for every run, e.g. optim.grad_clip=null")
    args = parser.parse_args()
    COMMON.extend(args.overrides)
    from data_pipeline.ingest import ingest

    root = Path(tempfile.mkdtemp(prefix="elastic-drift-"))
    manifest = Path(ingest("synthetic://shapes?n=192&classes=4&size=32&seed=1", root / "data", workers=0))
    rows: list[dict] = []

    def emit(row: dict) -> None:
        row = {**row, "overrides": args.overrides, "time": round(time.time(), 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def run(name: str, world: int, stop_after: int | None = None) -> Path:
        return train(root, name, manifest, world, stop_after)

    worst_k, init = compare_resumes(run, [int(s) for s in args.stops.split(",")], STEPS, emit)
    first = final_weights(root / f"elastic_{worst_k}")[1]
    again = final_weights(run(resumed_copy(root / f"stop_{worst_k}", f"elastic_{worst_k}_again"), 1))[1]
    emit({"what": "2 -> 1 ranks, the same resume twice", "stop_step": worst_k, **difference(again, first, init)})
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
