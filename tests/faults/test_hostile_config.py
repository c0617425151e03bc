"""Hostile job configs through the launcher CLI: one line naming the field, exit code 2, nothing created,
nothing started. Only what tests/unit/test_jobs.py and test_config.py do not cover already (they cover a
non-dividing global batch, a world size that cannot split it, a missing data.source, an unknown profile, too
many nodes, a run_dir under a file, and at load_job level unknown keys, bad types and a `$(...)` name).

Most cases call the CLI's `main(argv)` in this process (the same code `python -m cratescale.launch` runs; the
start of Ray and every stage are replaced by a tripwire); the shell-injection names go through a real
subprocess. Also: the sbatch file quotes every value that comes from the profile or a path.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import REPO

DEMO = REPO / "jobs" / "demo.yaml"


@pytest.fixture
def cli(monkeypatch, capsys):
    """main(argv) -> (exit code, stderr); fails the test if anything would be started."""
    import cratescale.launch.run as run
    from cratescale.launch.__main__ import main

    def tripwire(*args, **kwargs):
        raise AssertionError("the launcher started something on a bad config")

    monkeypatch.setattr(run, "start_ray", tripwire)
    monkeypatch.setattr(run, "STAGES", {name: tripwire for name in run.STAGES})

    def call(*argv: str) -> tuple[int, str]:
        code = main([str(DEMO), *argv])
        return code, capsys.readouterr().err
    return call


@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory):
    """A read-only file system (root ignores permission bits, not a ro mount); a file as parent elsewhere."""
    path = tmp_path_factory.mktemp("ro") / "mnt"
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        blocker = path / "a_file"
        blocker.write_text("not a directory")
        yield blocker
        return
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


CASES = [
    (["bogus=1"], "jobs/demo.yaml, command-line override 'bogus=1': bogus: Extra inputs are not permitted"),
    (["schedule.stepz=5"], "schedule.stepz: Extra inputs are not permitted"),
    (["schedule.steps=ten"], "schedule.steps: Input should be a valid integer"),
    (["checkpoint.every_steps=1.5"], "checkpoint.every_steps: Input should be a valid integer"),
    (["parallel.zero_stage=[2]"], "parallel.zero_stage: Input should be 0, 1, 2 or 3"),
    (["schedule.global_batch=-64"], "schedule.global_batch: Input should be greater than 0"),
    (["schedule.micro_batch=0"], "schedule.micro_batch: Input should be greater than 0"),
    (["cluster.tasks_per_node=4"], "schedule.micro_batch 32 does not divide the per-rank batch 16"),
    (["cluster.tasks_per_node=0"], "cluster.tasks_per_node: Input should be greater than or equal to 1"),
    (["stages=[ingest,pretrain,deploy]"], "stages.2: Input should be 'ingest'"),
    (["model.name=crate_mae_gigantic"], "model: unknown model 'crate_mae_gigantic'"),
    (["model.overrides.depthh=3"], "model: crate_mae_debug: unknown CrateMAE settings ['depthh']"),
    (["model.overrides.depth=deep"], "model: crate_mae_debug: depth='deep' must be int"),
    (["data.image_size=40"], "data.image_size: 40, but crate_mae_debug takes 32 px images"),
    (["model.overrides.img_size=30", "data.image_size=30"], "img_size 30 is not a multiple of patch_size 8"),
    (["checkpoint.start_fresh_from_weights=/nonexistent/export"], "checkpoint.start_fresh_from_weights: "),
    (["extract.datasets=[{name: x, source: /nonexistent/set}]"], "extract.datasets.0.source: /nonexistent/set"),
    (["run_dir=/proc/no/such/run"], "run_dir: /proc/no/such/run cannot be created"),
    (["name=it's"], "name \"it's\": use letters"),
    (["name=two words"], "name 'two words': use letters"),
    (["name=" + "x" * 65], "(at most 64)"),
    (["name=a\nb"], "use letters"),
    (["schedule.steps"], "override 'schedule.steps' is not of the form key.sub=value"),
]


@pytest.mark.parametrize("args, needle", CASES, ids=[c[0][0][:28] for c in CASES])
def test_bad_config_is_one_line_exit_2_nothing_created(cli, tmp_path, args, needle):
    run_dir = tmp_path / "run"
    argv = args if any(a.startswith("run_dir=") for a in args) else [f"run_dir={run_dir}", *args]
    code, err = cli(*argv)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not run_dir.exists() and not Path("/proc/no").exists()


def test_paths_that_are_not_writable(cli, tmp_path, read_only_dir):
    for field in ("run_dir", "data.root"):
        target = read_only_dir / "sub" / field
        argv = [f"run_dir={tmp_path / 'run'}", f"{field}={target}"]
        code, err = cli(*argv)
        assert code == 2 and err.startswith(f"error: {field}: {target} cannot be created"), err
        assert err.count("\n") == 1 and not target.exists()
    assert not (tmp_path / "run").exists()


def test_shell_injection_in_the_name_runs_nothing(tmp_path):
    """The real CLI: a job name is never interpreted by a shell (and is refused before anything)."""
    canary = tmp_path / "pwned"
    for name in (f"$(touch {canary})", f"x;touch {canary}", f"`touch {canary}`", f"x' && touch '{canary}"):
        result = subprocess.run([sys.executable, "-m", "cratescale.launch", str(DEMO), f"run_dir={tmp_path}/run",
                                 f"name={name}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "name" in result.stderr, result.stderr
    assert not canary.exists() and not (tmp_path / "run").exists()


# ---- the sbatch script ------------------------------------------------------------------------------------
HOSTILE_ENV = {"PLAIN": "1", "SPACES": "a b  c", "QUOTES": "it's \"quoted\"", "SUBST": "$(touch CANARY)",
               "BACKTICKS": "`touch CANARY`", "SEMI": "x; touch CANARY", "NEWLINE": "line1\nline2",
               "DOLLAR": "$HOME and ${PATH}"}


def _profile(env: dict[str, str], **fields):
    from cratescale.config import load_profile

    return load_profile("example_h100").model_copy(update={"env": env, **fields})


def test_sbatch_script_quotes_everything_from_config(tmp_path):
    from cratescale.config import load_job
    from cratescale.launch.executors import sbatch_script

    canary = tmp_path / "canary"
    env = {k: v.replace("CANARY", str(canary)) for k, v in HOSTILE_ENV.items()}
    job = load_job(REPO / "jobs" / "imagenet21k.yaml")
    folder = tmp_path / "sub mit's dir" / "$(x)"
    script = sbatch_script(job, _profile(env, partition="gpu --exclusive", account="my acct", qos="q;x",
                                         constraint="h100&ib"), folder)
    # Every #SBATCH line is one option: a value with spaces cannot smuggle in another one.
    for line in (ln for ln in script.splitlines() if ln.startswith("#SBATCH")):
        assert len(shlex.split(line)) == 2, line
    assert f"--partition={shlex.quote('gpu --exclusive')}" in script
    # The script parses, and running its setup (and a stand-in for the command) yields exactly the values.
    path = tmp_path / "job.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    setup = script.split("# setup\n")[1].split("\n# command")[0]  # a quoted value may span lines (NEWLINE)
    probe = setup + "\n" + "\n".join(f'printf "%s\\0" "${k}"' for k in env)
    out = subprocess.run(["bash", "-c", probe], capture_output=True, timeout=30)
    assert out.stdout.decode().split("\0")[:-1] == list(env.values()), out.stderr.decode()
    command = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    assert shlex.split(command)[-1] == str(folder)
    assert not canary.exists()


def test_profile_env_name_that_is_not_a_variable_is_refused(tmp_path):
    from cratescale.config import ConfigError, load_job
    from cratescale.launch.executors import sbatch_script

    job = load_job(REPO / "jobs" / "imagenet21k.yaml")
    for name in ("A B", "X=1; touch /tmp/x; Y", "1ABC", "$(id)"):
        with pytest.raises(ConfigError, match="env name .* is not a shell variable name"):
            sbatch_script(job, _profile({name: "v"}), tmp_path)
