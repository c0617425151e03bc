"""A stage run out of order (issue 30.4): `--stages evaluate` on a run without embeddings ends before Ray or SLURM
start with one line naming the stage to run first, as a user sees it (its own process: no traceback)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from cratescale.checkpoint.export import export_weights
from cratescale.models import create_model

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "dist" / "tiny.yaml"


def _launch(run: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cratescale.launch", str(TINY), f"run_dir={run}",
                           "stages=[pretrain,export,extract,evaluate]", *args],
                          cwd=REPO, text=True, capture_output=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "RAY_ADDRESS": "127.0.0.1:1"})  # a Ray start would fail loudly (the test times out)


def test_a_stage_without_its_inputs_names_the_stage_to_run_first(tmp_path):
    run = tmp_path / "run"
    done = _launch(run, "--stages", "evaluate")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0] == f"error: --stages: evaluate needs what export makes (no export in {run}/export); run export " \
                       f"first: --stages export,extract,evaluate", lines[0]
    assert not run.exists()  # nothing created, nothing started

    torch.manual_seed(0)
    model = create_model("crate_mae_debug", img_size=32, patch_size=8)
    export_weights(model.state_dict(), model.config, {"step": 8}, run / "export")
    done = _launch(run, "--stages", "evaluate")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"evaluate needs what extract makes (no complete embedding store {run}/embeddings/pretrain); run " \
           f"extract first: --stages extract,evaluate" in done.stderr, done.stderr
    done = _launch(run, "--stages", "export")
    assert f"export needs what pretrain makes (no committed checkpoint in {run}/checkpoints)" in done.stderr
    assert sorted(p.name for p in run.iterdir()) == ["export"]
    done = subprocess.run([sys.executable, "-m", "cratescale.launch", str(TINY), f"run_dir={run}", "--stages",
                           "export"], cwd=REPO, text=True, capture_output=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and done.stderr.strip() == \
        "error: --stages: export not among the job's stages ['pretrain'] (the job's `stages` field)", done.stderr
