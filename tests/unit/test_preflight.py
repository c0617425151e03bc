"""One preflight (issue 30.2): --dry-run refuses what the launch refuses, with the same line, before Ray or SLURM
start; options and overrides in any order; relative paths are resolved against the launcher's directory, and an
error about one says so; a resume the checkpoint's identity would refuse is found before anything is queued."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DEMO = REPO / "jobs" / "demo.yaml"


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cratescale.launch", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def refused_alike(run_dir: Path, *overrides: str, cwd: Path = REPO) -> str:
    """The dry-run (plan, then the problem) and the launch (the problem alone) refuse with the same line, exit 2,
    and nothing is started (no config, no launch record, no Ray)."""
    dry = cli(str(DEMO), "--dry-run", f"run_dir={run_dir}", *overrides, cwd=cwd)  # option before the overrides
    launched = cli(str(DEMO), f"run_dir={run_dir}", *overrides, cwd=cwd)
    assert dry.returncode == 2 and launched.returncode == 2, (dry.stderr, launched.stderr)
    assert "deepspeed" in dry.stdout, "the dry-run prints the plan before its problems"
    assert errors(dry)[:1] == launched.stderr.strip().splitlines(), (dry.stderr, launched.stderr)
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "launch.json").exists()
    return launched.stderr.strip()


def test_missing_relative_source_names_the_directory_it_was_resolved_against(tmp_path):
    line = refused_alike(tmp_path / "run", "data.source=images/train", cwd=tmp_path)
    assert line == (f"error: data.source: {tmp_path}/images/train ('images/train': relative paths resolve against "
                    f"the directory the launcher runs in, {tmp_path}) does not exist")


def test_run_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    line = refused_alike(tmp_path / "a_file" / "run")
    assert line.startswith(f"error: run_dir: {tmp_path}/a_file/run cannot be created ({tmp_path}/a_file is not a "
                           f"writable directory)")


def test_weights_that_are_not_an_export(tmp_path):
    line = refused_alike(tmp_path / "run", f"checkpoint.start_fresh_from_weights={tmp_path}")
    assert line == f"error: checkpoint.start_fresh_from_weights: {tmp_path} is not an export (no export.json)"


def test_dry_run_lists_every_problem_the_launch_would_meet_one_by_one(tmp_path):
    (tmp_path / "a_file").write_text("")
    dry = cli(str(DEMO), f"run_dir={tmp_path}/a_file/run", "--dry-run", f"data.source={tmp_path}/none",
              f"checkpoint.start_fresh_from_weights={tmp_path}")
    assert dry.returncode == 2
    assert [line.split(":")[1].strip() for line in errors(dry)] == \
        ["data.source", "checkpoint.start_fresh_from_weights", "run_dir"], dry.stderr
    assert "preflight: 3 problem(s); the launch would stop at the first" in dry.stderr


def _commit_step(run_dir: Path, *overrides: str) -> None:
    """A sealed commit as the ranks write it (meta with the job's identity and global batch), without training."""
    from cratescale.checkpoint import CheckpointStore
    from cratescale.config import job_identity, load_job

    job = load_job(str(DEMO), list(overrides))
    store = CheckpointStore(run_dir / "checkpoints")
    (store.begin(5) / "model.pt").write_bytes(b"weights")
    store.commit(5, meta={"global_batch": job.schedule.global_batch, "identity": job_identity(job, "no-manifest")})


@pytest.mark.parametrize("overrides, needle", [
    (["seed=1"], "the job changed what training continues with: seed 0 -> 1. Use checkpoint.allow_config_change"),
    (["model.name=crate_mae_tiny", "data.image_size=224", "model.overrides={}"],
     "model.name 'crate_mae_debug' -> 'crate_mae_tiny'"),
    (["schedule.global_batch=128"], "schedule.global_batch: 128, but"),
])
def test_resume_that_the_ranks_would_refuse_is_refused_before_anything_starts(tmp_path, overrides, needle):
    _commit_step(tmp_path / "run")
    line = refused_alike(tmp_path / "run", *overrides)
    assert needle in line and "step_000000005" in line, line


def test_resume_of_the_same_job_and_an_allowed_change_pass(tmp_path):
    _commit_step(tmp_path / "run")
    assert cli(str(DEMO), f"run_dir={tmp_path}/run", "--dry-run").returncode == 0
    allowed = cli(str(DEMO), "seed=1", "--dry-run", "checkpoint.allow_config_change=true", f"run_dir={tmp_path}/run")
    assert allowed.returncode == 0, allowed.stderr
