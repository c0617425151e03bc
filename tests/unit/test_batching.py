"""How a global batch splits over a world, and which node counts a run can restart on (issue 28 item 3)."""
from pathlib import Path

import pytest

from cratescale.config import ConfigError, load_job
from cratescale.config.batching import describe_split, no_fit_line, resumable_node_counts, split_for_world

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def nodes_to_run_on(job, usable: int) -> int | None:
    """The rule the batch script applies in bash (launch/recover.py cs_fit), stated in Python: the largest
    resumable node count that `usable` nodes hold; None when none fits."""
    fits = [n for n in resumable_node_counts(job) if n <= usable]
    return fits[-1] if fits else None


@pytest.mark.parametrize("global_batch, world, max_micro, expected", [
    (4096, 64, 64, (64, 1)),    # as configured
    (4096, 32, 64, (64, 2)),    # half the nodes: twice the accumulation
    (4096, 56, 64, None),       # 7 of 8 nodes: 4096 / 56 is not whole
    (96, 4, 16, (12, 2)),       # 24 per rank: 16 does not divide it, two micro-batches of 12
    (96, 6, 16, (16, 1)),
    (7, 1, 4, (1, 7)),          # a prime share: micro-batches of one
    (8, 16, 4, None),           # fewer samples than ranks
])
def test_split_keeps_the_global_batch_with_micro_batches_no_larger_than_asked(global_batch, world, max_micro,
                                                                             expected):
    split = split_for_world(global_batch, world, max_micro)
    assert split == expected
    if split:
        micro, accum = split
        assert micro * accum * world == global_batch and micro <= max_micro


def test_imagenet21k_resumes_on_the_counts_that_divide_its_batch():
    job = load_job(JOBS / "imagenet21k.yaml")
    assert (job.cluster.nodes, job.cluster.tasks_per_node, job.schedule.global_batch) == (8, 8, 4096)
    counts = resumable_node_counts(job)
    assert counts == [n for n in (1, 2, 4, 8) if n >= job.cluster.min_nodes]
    assert nodes_to_run_on(job, 7) == 4   # 7 usable of 8: 56 ranks do not split 4096, 32 do
    assert nodes_to_run_on(job, 8) == 8   # all back: the full count again
    assert nodes_to_run_on(job, job.cluster.min_nodes - 1) is None
    line = no_fit_line(job, 3)
    assert "3 usable node(s)" in line and "global_batch 4096" in line and f"min_nodes {job.cluster.min_nodes}" in line


def test_a_three_node_job_whose_batch_does_not_divide_over_two_nodes_resumes_on_one():
    job = load_job(JOBS / "demo.yaml", ["cluster.nodes=3", "cluster.tasks_per_node=1", "schedule.global_batch=9",
                                        "schedule.micro_batch=3"])
    assert resumable_node_counts(job) == [1, 3]
    assert nodes_to_run_on(job, 2) == 1
    assert describe_split(job, 1) is None   # 9 per rank in 3 micro-batches of 3: as asked
    job = load_job(JOBS / "demo.yaml", ["cluster.nodes=2", "cluster.tasks_per_node=2", "schedule.global_batch=24",
                                        "schedule.micro_batch=6"])
    assert "micro-batch 4 x 2 accumulated" in describe_split(job, 3)   # 8 per rank on 3 ranks


def test_min_nodes_above_nodes_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cluster.min_nodes 3 > cluster.nodes 2"):
        load_job(JOBS / "demo.yaml", ["cluster.nodes=2", "cluster.min_nodes=3"])


@pytest.mark.parametrize("overrides", [
    [],  # imagenet21k: 8 nodes x 8, min 4
    ["cluster.nodes=3", "cluster.tasks_per_node=1", "cluster.min_nodes=1", "schedule.global_batch=9",
     "schedule.micro_batch=3"],
])
def test_the_batch_script_trains_on_the_count_the_rule_picks(overrides, tmp_path):
    """The sbatch setup's own choice (bash, in the allocation) against config/batching.py's rule, for every
    allocation size from nothing to the full count."""
    import subprocess

    from cratescale.launch.recover import batch_lines

    job = load_job(JOBS / "imagenet21k.yaml", [f"run_dir={tmp_path}", *overrides])
    lines = batch_lines(job)
    fit = next(line for line in lines if line.startswith("cs_fit()"))
    counts = " ".join(map(str, resumable_node_counts(job)))
    script = fit + "\n" + "".join(f'cs_fit "{counts}" {n}\n' for n in range(job.cluster.nodes + 1))
    got = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert [int(n) for n in got] == [nodes_to_run_on(job, n) or 0 for n in range(job.cluster.nodes + 1)]


def test_the_sbatch_asks_for_a_node_range_with_the_task_count_of_the_full_size(tmp_path):
    from cratescale.config import load_profile
    from cratescale.launch.executors import sbatch_script

    job = load_job(JOBS / "imagenet21k.yaml", [f"run_dir={tmp_path}"])
    text = sbatch_script(job, load_profile(job.cluster.profile), tmp_path / "submitit")
    assert "#SBATCH --nodes=4-8\n" in text and "#SBATCH --ntasks=64\n" in text and "#SBATCH --requeue\n" in text
    assert "--ntasks-per-node" not in text.split("# setup")[0]  # it would keep SLURM from starting on fewer nodes
    same = load_job(JOBS / "imagenet21k.yaml", [f"run_dir={tmp_path}", "cluster.min_nodes=8"])
    text = sbatch_script(same, load_profile(job.cluster.profile), tmp_path / "submitit")
    assert "#SBATCH --nodes=8\n" in text and "#SBATCH --ntasks-per-node=8\n" in text
