"""Every job file in jobs/ loads and dry-runs through the real CLI; bad input exits 2 with one line."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOBS = sorted((REPO / "jobs").glob("*.yaml"))


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cratescale.launch", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


# The target job reads /datasets/... and submits to a partition named `gpu`: neither exists on a dev machine, and
# its dry-run says so (exit 2) after printing the plan, as the launch would refuse them before anything starts.
AWAY_FROM_ITS_CLUSTER = {"imagenet21k": ["data.source: /datasets/imagenet21k/winter21_whole.tar does not exist",
                                         "extract.datasets.0.source: /datasets/transfer/cifar10;",
                                         "cluster: "]}


@pytest.mark.parametrize("job", JOBS, ids=[p.stem for p in JOBS])
def test_every_job_dry_runs(job, tmp_path):
    result = run_cli(str(job), f"run_dir={tmp_path}/run", "--dry-run")
    out = result.stdout
    assert "parameters" in out and "memory/GPU" in out and "deepspeed" in out
    assert not (tmp_path / "run").exists(), "a dry run must not create the run directory"
    expected = AWAY_FROM_ITS_CLUSTER.get(job.stem, [])
    assert result.returncode == (2 if expected else 0), result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(expected), result.stderr
    for line, needle in zip(errors, expected):
        assert line.startswith(f"error: {needle}"), (line, needle)


def test_cifar10_plans_its_fine_tune_arms(tmp_path):
    out = run_cli(str(REPO / "jobs/cifar10.yaml"), f"run_dir={tmp_path}/run", "--dry-run").stdout
    assert "export -> finetune -> extract" in out
    assert ("finetune       1 set(s) x 2 arm(s) (pretrained, scratch), one run each: 500 steps of 256 (micro 64), "
            "peak lr 0.001, layer decay 0.75") in out
    out = run_cli(str(REPO / "jobs/cifar10.yaml"), f"run_dir={tmp_path}/run", "finetune.enabled=false",
                  "--dry-run").stdout
    assert "finetune       " not in out


def test_the_compare_job_pairs_crate_mae_with_vit_mae_at_equal_shape_and_at_equal_parameters(tmp_path):
    from cratescale.config import RunPaths, load_job
    from cratescale.engine.model_build import build_model
    from cratescale.launch.array import expand_array

    job = load_job(REPO / "jobs/cifar10_compare.yaml", [f"run_dir={tmp_path}/run"])
    members = [member for member, _ in expand_array(job, RunPaths.of(job))]

    def encoder(member) -> int:
        model = build_model(member)
        return sum(p.numel() for name, p in model.named_parameters()
                   if not name.startswith(("decoder", "mask_token")))

    crate, vit, vit_small = (encoder(m) for m in members)
    assert [m.model.name for m in members] == ["crate_mae_debug", "vit_mae_debug", "vit_mae_debug"]
    assert all(m.model.overrides["depth"] == 4 and m.model.overrides["patch_size"] == 4 and
               m.model.overrides["encoder_tokens"] == "visible" for m in members)
    assert crate <= 0.4 * vit  # the paper's claim at this shape (0.26x)
    assert abs(vit_small / crate - 1) < 0.05  # the ViT-MAE at CRATE-MAE's parameter count
    assert all(m.logging.heldout_every_steps and m.seed == job.seed and m.schedule == job.schedule for m in members)


def test_imagenet21k_plan_numbers(tmp_path):
    out = run_cli(str(REPO / "jobs/imagenet21k.yaml"), f"run_dir={tmp_path}/run", "--dry-run").stdout
    assert "44,047,872 parameters" in out
    assert "8 nodes x 8 = 64" in out and "global 4096 = micro 64 x accum 1 x 64 ranks" in out
    assert "3211 steps per epoch" in out  # winter21: 13,153,500 // 4096
    assert "#SBATCH --signal=USR2@" in out and "#SBATCH --nodes=4-8" in out and "--ntasks-per-node=8 \"$@\"" in out
    # example_h100's measured step: 14.7 ms + 64 / 3744 img/s = 31.8 ms; 3211 steps an epoch
    assert "estimate       31.8 ms per step (compute only), 128,829 img/s on 64 GPUs, 1.7 min per epoch" in out
    assert "fixed per-step cost is 46%" in out
    # 44,047,872 parameters x (2 bf16 + 12 fp32 master and moments) = 0.57 GiB; no H100 cluster's rates measured yet
    assert "overheads      not measured for profile example_h100" in out and "a commit is 0.57 GiB" in out


def test_overheads_follow_the_measured_rates():
    from cratescale.config import JobConfig, load_profile
    from cratescale.config.profile import MeasuredRestart
    from cratescale.launch.plan import Plan, overheads_line

    job = JobConfig.model_validate({"cluster": {"nodes": 2, "tasks_per_node": 1}, "checkpoint": {"every_steps": 100},
                                    "schedule": {"global_batch": 8, "micro_batch": 4, "steps": 1001}})
    plan = Plan("crate_mae_base", 1, 1, world_size=2, global_batch=8, micro_batch=4, grad_accum=1, train_samples=None,
                steps_per_epoch=None, total_steps=1001, peak_lr=1e-3, model_states_gb_per_gpu=0, flops_per_image=1.0,
                layout="all", checkpoint_gb=0.5)
    profile = load_profile("example_h100").model_copy(update={"measured_restart": MeasuredRestart(
        startup_s=12, commit_gb_per_s=0.5, convert_gb_per_s=0.25, convert_fixed_s=3, source="a test")})
    # a commit: 0.5 GiB / (0.5 GB/s x 2 nodes) = 0.5 s, 11 of them (1001 steps, every 100); conversion 3 + 0.5 / 0.25
    assert overheads_line(plan, job, profile) == ("start-up 12 s per (re)start; a commit 0.50 GiB in 0.5 s x 11 = 0.1 min; "
                                                  "a resize (another world size) adds the universal conversion, 5 s  "
                                                  "[a test]")


def test_estimate_follows_the_batch_split_and_stays_out_without_a_measurement():
    from cratescale.config import load_profile
    from cratescale.launch.plan import Plan, estimate_line

    profile = load_profile("example_h100")
    plan = Plan("crate_mae_base", 1, 1, world_size=8, global_batch=4096, micro_batch=256, grad_accum=2,
                train_samples=None, steps_per_epoch=None, total_steps=None, peak_lr=1e-3, model_states_gb_per_gpu=0,
                flops_per_image=1.0, layout="all", checkpoint_gb=0.5)
    line = estimate_line(plan, profile)
    step_ms = 2 * (14.7 + 256 / 3744 * 1e3)  # two micro-steps of 256
    assert line.startswith(f"estimate       {step_ms:.1f} ms per step") and "fixed per-step" not in line
    assert "min per epoch" not in line  # the sample count is unknown
    plan.layout = "visible"  # measured separately: 10.9 ms + b / 6841
    assert estimate_line(plan, profile).startswith(f"estimate       {2 * (10.9 + 256 / 6841 * 1e3):.1f} ms")
    plan.model_name = "crate_mae_large"
    assert estimate_line(plan, profile) is None


@pytest.mark.parametrize("args, needle", [
    (["schedule.global_batch=63"], "schedule"),
    (["cluster.tasks_per_node=3"], "cannot be split over 3 ranks"),
    (["data.source=/nonexistent/images"], "data.source: /nonexistent/images does not exist"),
    (["cluster.profile=nope"], "no profile 'nope'"),
    (["cluster.nodes=2", "schedule.micro_batch=16"], "cluster.nodes: 2 nodes asked"),
])
def test_bad_input_exits_2_with_one_line(args, needle, tmp_path):
    result = run_cli(str(REPO / "jobs/demo.yaml"), f"run_dir={tmp_path}/run", *args)
    assert result.returncode == 2
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists(), "nothing may be started on bad input"


def test_run_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_cli(str(REPO / "jobs/demo.yaml"), f"run_dir={blocker}/run")
    assert result.returncode == 2 and "run_dir" in result.stderr and "not a writable directory" in result.stderr


@pytest.mark.parametrize("job", [p for p in JOBS if "array:" in p.read_text()], ids=lambda p: p.stem)
def test_every_array_member_builds(job, tmp_path):
    # --dry-run plans the parent only; every member's overrides must validate and build its model too.
    from cratescale.config import load_job
    from cratescale.engine.model_build import build_model
    from cratescale.launch.array import expand_array
    from cratescale.config import RunPaths

    parent = load_job(job, [f"run_dir={tmp_path}/run"])
    members = expand_array(parent, RunPaths.of(parent))
    assert len(members) == len(parent.cluster.array) > 1
    for member, _ in members:
        build_model(member)  # unknown or inconsistent model overrides raise here
    assert len({m.model_dump_json(exclude={"name", "run_dir"}) for m, _ in members}) == len(members)
