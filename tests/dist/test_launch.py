"""The demo path end to end through the launcher: local Ray, the supervisor actor, submitit's local
executor with 2 ranks, DeepSpeed ZeRO-2 over gloo (issue 4)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.dist


def test_demo_job_runs_through_the_launcher_and_loss_falls(tmp_path):
    run_dir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "cratescale.launch", str(REPO / "jobs/demo.yaml"), f"run_dir={run_dir}",
         "data.source=synthetic://shapes?n=512&classes=4&size=32&seed=0", "data.val_per_class=8",
         "schedule.steps=60", "schedule.warmup_steps=5", "checkpoint.every_steps=20", "logging.every_steps=10",
         "stages=[ingest,pretrain,export]"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("kind") == "train"]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoints" / "latest").exists()
    assert (run_dir / "export" / "weights.zarr").is_dir()
    png = run_dir / "export" / "reconstructions.png"
    assert png.exists() and png.stat().st_size > 1000
    status = subprocess.run([sys.executable, "-m", "cratescale.launch", "status", str(run_dir), "--json"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    status = json.loads(status.stdout)
    assert (status["state"], status["step"], status["total_steps"], status["last_commit_step"]) == \
        ("COMPLETED", 60, 60, 60)
    assert "Ray tasks in flight" in result.stdout  # the ingest stage's summary (one task per CPU of local Ray)
