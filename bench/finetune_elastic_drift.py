"""How far a fine-tune resumed on another world size ends from the uninterrupted fine-tune (issue 32): the
measurement behind the bound of tests/dist/test_finetune.py's elastic test. bench/elastic_drift.py's method on
that test's fine-tune: tiny CRATE-MAE exported after 4 steps of tests/dist/tiny.yaml (DALI on the CPU, bf16,
ZeRO-2), then 120 fine-tune steps of 16 with every random draw in play (drop path 0.2, mixup 0.8, cutmix 1.0).

  - two uninterrupted 2-rank fine-tunes (expected bitwise equal);
  - for each stop step k: 2 ranks to k, then 1 rank from k's commit to the end, against the 2-rank fine-tune.

bench/results/finetune_elastic.json is the run with the draws seeded per sample (engine/finetune_task.py);
finetune_elastic_before.json the same bench at --stops 20 with the earlier per-rank seeding put back by hand.

    .venv/bin/python -m bench.finetune_elastic_drift [--stops 5,20,60,100] [--out bench/results/finetune_elastic.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.elastic_drift import compare_resumes
from cratescale.config import dump_job, load_job
from cratescale.engine.finetune_task import manifest_class_names
from cratescale.launch.finetune_stage import finetune_job
from tests.dist.harness import run_ranks

REPO = Path(__file__).resolve().parents[1]
BASE_JOB = REPO / "tests" / "dist" / "tiny.yaml"
STEPS = 120
FINETUNE = ["finetune.enabled=true", f"finetune.steps={STEPS}", "finetune.global_batch=16", "finetune.micro_batch=8",
            "finetune.warmup_steps=4", "finetune.eval_every_steps=40", "finetune.drop_path=0.2", "finetune.mixup=0.8",
            "finetune.cutmix=1.0", "checkpoint.every_steps=20"]


def pretrain(root: Path) -> Path:
    """The tiny pretraining run and its export, through the launcher (as the test's fixture)."""
    run_dir = root / "pre"
    subprocess.run([sys.executable, "-m", "cratescale.launch", str(BASE_JOB), f"run_dir={run_dir}",
                    "data.val_per_class=8", "schedule.steps=4", "stages=[ingest,pretrain,export]",
                    "logging.progress=false"], check=True, cwd=root, env=dict(os.environ, PYTHONPATH=str(REPO)),
                   stdout=subprocess.DEVNULL)
    return run_dir


def finetune(pre: Path, manifest: Path, run_dir: Path, world: int, stop_after: int | None = None) -> Path:
    """`run_dir` fine-tuned on `world` ranks (from its commit, when it holds one)."""
    job = load_job(pre / "config.yaml", [*FINETUNE, f"cluster.tasks_per_node={world}"])
    config = run_dir.parent / f"{run_dir.name}.yaml"
    dump_job(finetune_job(job, run_dir), config)
    run_ranks(config, manifest, world, stop_after, timeout=900)
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stops", default="5,20,60,100")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="finetune-drift-"))
    pre = pretrain(root)
    manifest = pre / "data" / "manifest.parquet"
    os.environ["FINETUNE_SPEC"] = json.dumps({"arm": "pretrained", "set_name": "pretrain",
                                              "export": str(pre / "export"),
                                              "class_names": list(manifest_class_names(manifest))})
    rows: list[dict] = []

    def emit(row: dict) -> None:
        row = {**row, "time": round(time.time(), 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def run(name: str, world: int, stop_after: int | None = None) -> Path:
        return finetune(pre, manifest, root / name, world, stop_after)

    compare_resumes(run, [int(s) for s in args.stops.split(",")], STEPS, emit)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
