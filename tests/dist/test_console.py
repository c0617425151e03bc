"""The launcher's console speaks for the project (issue 30 item 3), seen as an sbatch log sees it (a pipe): no
library log lines (Ray, Ray Data, DeepSpeed, warnings; they are in logs/launcher.log), lines never wrapped, and a
resumed run says from which step and on which world."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.dist
# What the libraries printed on the launcher's console before (issue 30's list), as patterns
LIBRARY_LINES = re.compile(r"Token authentication|RAY_AUTH_MODE|Started a local Ray|streaming_executor|"
                           r"logging_progress|Setting accelerator|RayDeprecationWarning|Processing zero checkpoint|"
                           r"Reconstructed fp32|Loading checkpoint shards|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING)")


def launch(run_dir: Path, steps: int, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cratescale.launch", str(REPO / "tests/dist/tiny.yaml"), f"run_dir={run_dir}",
         f"schedule.steps={steps}", "checkpoint.every_steps=100", "stages=[pretrain,export]",
         f"data.root={run_dir.parent / 'data'}", "logging.every_steps=1"],
        capture_output=True, text=True, timeout=900, cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_the_console_shows_the_projects_lines_only_and_where_a_resume_started(tmp_path, tiny_manifest):
    run_dir = tmp_path / "run"
    (tmp_path / "data").symlink_to(tiny_manifest.parent)
    first = launch(run_dir, 4, tmp_path)
    second = launch(run_dir, 6, tmp_path)   # training longer: the run resumes from its step-4 commit
    for text in (first, second):
        noise = [line for line in text.splitlines() if LIBRARY_LINES.search(line)]
        assert not noise, noise
        # one line per message, however long: the submission line carries its whole logs path
        assert any(line.endswith(f"logs in {run_dir / 'submitit'}") for line in text.splitlines()), text[-2000:]
        assert "== pretrain ==" in text and "─" * 20 not in text
    assert "training started at step 0 on 2 rank(s)" in first
    assert "training resumed from step 4 on 2 rank(s) (same world)" in second
    assert "was trained toward 4 steps (warmup 2), this job runs 6 (warmup 2)" in second   # the schedule note
    log = (run_dir / "logs" / "launcher.log").read_text()
    assert "Started a local Ray instance" in log and "Processing zero checkpoint" in log   # kept, off the console
