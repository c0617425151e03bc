"""The local dev SLURM cluster does what the launcher relies on: multi-task jobs with gloo, USR2 -> checkpoint ->
requeue under the same job id, real partition preemption, and request validation."""
from __future__ import annotations

import os
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import submitit

from cratescale.config import load_profile
import slurm_helpers
from cratescale.launch import slurm_tools

PROFILE = load_profile("local")


class Counter(submitit.helpers.Checkpointable):
    """Counts to `total`, one step per 0.5 s; submitit's default checkpoint() pickles self, so the step survives."""

    def __init__(self) -> None:
        self.step = 0
        self.starts: list[tuple[int, int]] = []

    def __call__(self, progress: str, total: int) -> dict:
        self.starts.append((int(os.environ.get("SLURM_RESTART_COUNT", "0")), self.step))
        while self.step < total:
            time.sleep(0.5)
            self.step += 1
            if submitit.JobEnvironment().global_rank == 0:
                with open(progress, "a") as f:
                    f.write(f"step={self.step}\n")
        return {"step": self.step, "starts": self.starts, "job_id": os.environ["SLURM_JOB_ID"]}


def _allreduce() -> dict:
    import torch
    import torch.distributed as dist

    env = submitit.helpers.TorchDistributedEnvironment().export()   # RANK, WORLD_SIZE, MASTER_ADDR/PORT
    dist.init_process_group("gloo")
    t = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(t)
    world = dist.get_world_size()
    dist.destroy_process_group()
    return {"rank": env.rank, "world": world, "sum": t.item(), "procid": int(os.environ["SLURM_PROCID"])}


@pytest.fixture
def executor(tmp_path: Path) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=tmp_path / "%j")
    assert ex.cluster == "slurm"
    ex.update_parameters(slurm_partition=PROFILE.partition, timeout_min=5, nodes=1, tasks_per_node=1,
                         cpus_per_task=1, slurm_signal_delay_s=PROFILE.signal_lead_s)
    return ex


def _config() -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in out.splitlines()) if v}


def test_cluster_up_idle_and_configured(slurm_cluster):
    for name in (PROFILE.partition, slurm_helpers.PREEMPT_PARTITION):
        assert slurm_cluster[name]["state"] == "UP" and slurm_cluster[name]["cpus_per_node"] >= 2
    # idle: no leftover jobs from an earlier run hold the node
    t0 = time.monotonic()
    while any(n["state"] != "IDLE" for n in slurm_tools.node_info().values()):
        assert time.monotonic() - t0 < 30, f"node not idle: {slurm_tools.node_info()}"
        time.sleep(0.5)
    conf = _config()
    assert "preempt_send_user_signal" in conf["SlurmctldParameters"]   # else preemption never sends USR2
    assert conf["PreemptType"] == "preempt/partition_prio"
    assert conf["AccountingStorageType"] == "accounting_storage/slurmdbd"   # sacct, hence submitit states
    assert "cred_expire=10" in conf["AuthInfo"]
    parts = {r["PartitionName"]: r for r in slurm_tools.parse_records(
        subprocess.run(["scontrol", "show", "-o", "partition"], capture_output=True, text=True).stdout)}
    low, high = parts[PROFILE.partition], parts[slurm_helpers.PREEMPT_PARTITION]
    assert low["PreemptMode"] == "REQUEUE" and int(low["GraceTime"]) > 0
    assert int(high["PriorityTier"]) > int(low["PriorityTier"])
    assert PROFILE.signal_lead_s < int(low["GraceTime"])
    assert subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True).returncode == 0


def test_two_task_gloo_allreduce(executor, slurm):
    executor.update_parameters(tasks_per_node=2)
    job = executor.submit(_allreduce)
    res = sorted(job.results(), key=lambda r: r["rank"])
    assert [r["rank"] for r in res] == [0, 1] and [r["procid"] for r in res] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in res)
    slurm.wait_sacct(job.job_id, "COMPLETED")


def test_usr2_checkpoint_requeue_keeps_job_id(executor, slurm, tmp_path):
    prog = tmp_path / "progress.txt"
    job = executor.submit(Counter(), str(prog), 10)
    slurm.wait_for(lambda: len(slurm.progress_steps(prog)) >= 3, 60, "step 3")
    # USR2 alone, not job._interrupt(): its extra SIGTERM can kill the handler's `scontrol requeue` child
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    slurm.wait_done_kicking(job)
    res = job.result()
    assert res["step"] == 10 and res["job_id"] == job.job_id
    assert res["starts"][0] == (0, 0) and res["starts"][1][0] == 1 and res["starts"][1][1] >= 3
    steps = slurm.progress_steps(prog)
    assert steps == sorted(set(steps)) and steps[-1] == 10, f"steps repeated after resume: {steps}"
    assert slurm.wait_sacct(job.job_id, "COMPLETED") == ["REQUEUED", "COMPLETED"]   # one id, two runs
    assert slurm.scontrol_job(job.job_id)["Restarts"] == "1"


def test_preemption_by_high_partition_requeues_and_resumes(executor, slurm, tmp_path):
    prog = tmp_path / "progress.txt"
    executor.update_parameters(cpus_per_task=2)   # the whole node: the high job can start only by preempting
    job = executor.submit(Counter(), str(prog), 10)
    slurm.wait_for(lambda: len(slurm.progress_steps(prog)) >= 3, 60, "step 3")
    hi = subprocess.check_output(["sbatch", "--parsable", "-p", slurm_helpers.PREEMPT_PARTITION, "-c", "2",
                                  "-o", "/dev/null", "--wrap", "sleep 2"], text=True).strip()
    slurm.wait_done_kicking(job)
    res = job.result()
    assert res["step"] == 10 and res["job_id"] == job.job_id
    assert len(res["starts"]) == 2 and res["starts"][1][1] >= 3, res["starts"]
    assert slurm.wait_sacct(hi, "COMPLETED") == ["COMPLETED"]
    low_states = slurm.wait_sacct(job.job_id, "COMPLETED")
    assert low_states[0] in ("REQUEUED", "PREEMPTED") and len(low_states) == 2, low_states
    # the high job ran before the preempted one finished
    assert slurm.scontrol_job(hi)["StartTime"] <= slurm.scontrol_job(job.job_id)["StartTime"]


def test_validate_request(slurm_cluster):
    slurm_tools.validate_request(PROFILE.partition, nodes=1, tasks_per_node=2, cpus_per_task=1, gpus_per_node=0)
    with pytest.raises(ValueError, match=r"unknown partition 'nosuch'.*'debug'"):
        slurm_tools.validate_request("nosuch", nodes=1, tasks_per_node=1, cpus_per_task=1, gpus_per_node=0)
    with pytest.raises(ValueError, match=r"3 tasks x 1 cpus = 3 CPUs per node asked.*has 2"):
        slurm_tools.validate_request(PROFILE.partition, nodes=1, tasks_per_node=3, cpus_per_task=1,
                                     gpus_per_node=0)
    with pytest.raises(ValueError, match=r"2 nodes asked"):
        slurm_tools.validate_request(PROFILE.partition, nodes=2, tasks_per_node=1, cpus_per_task=1,
                                     gpus_per_node=0)
    with pytest.raises(ValueError, match=r"1 GPUs per node asked"):
        slurm_tools.validate_request(PROFILE.partition, nodes=1, tasks_per_node=1, cpus_per_task=1,
                                     gpus_per_node=1)
    with pytest.raises(ValueError) as err:
        slurm_tools.validate_request(PROFILE.partition, nodes=1, tasks_per_node=4, cpus_per_task=1,
                                     gpus_per_node=0)
    assert "\n" not in str(err.value)


def test_job_info_and_release_on_plain_jobs(tmp_path):
    assert slurm_tools.job_info(987654321) == {}
    jid = subprocess.check_output(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "true"], text=True).strip()
    t0 = time.monotonic()
    while slurm_tools.job_info(jid).get("JobState") != "COMPLETED":
        assert time.monotonic() - t0 < 30, slurm_tools.job_info(jid)
        time.sleep(0.2)
    info = slurm_tools.job_info(jid)
    assert info["JobId"] == jid and info["Partition"] == PROFILE.partition and info["Restarts"] == "0"
    assert slurm_helpers.release_if_held(jid) is False   # not held: nothing to release


def test_parsers_on_real_world_strings():
    rec = slurm_tools.parse_kv("NodeName=g1 OS=Linux 6.1.0 #1 SMP PREEMPT_DYNAMIC Gres=gpu:h100:8(S:0-1) CPUTot=96 "
                               "Partitions=gpu,long State=MIXED")
    assert rec["OS"] == "Linux 6.1.0 #1 SMP PREEMPT_DYNAMIC" and rec["CPUTot"] == "96"
    assert [slurm_tools.parse_gpus(g) for g in ("gpu:8", "gpu:h100:8(S:0-1)", "gpu:a:2,gpu:b:2", "(null)")] == \
        [8, 8, 4, 0]
    parts = slurm_tools.partitions_from([rec], [{"PartitionName": "gpu", "TotalNodes": "1", "TotalCPUs": "96",
                                                 "State": "UP"}])
    assert parts["gpu"] == {"nodes": 1, "cpus": 96, "state": "UP", "cpus_per_node": 96, "gpus_per_node": 8}
    slurm_tools.check_request(parts, "gpu", 1, 8, 12, 8)
    with pytest.raises(ValueError, match="9 GPUs per node asked"):
        slurm_tools.check_request(parts, "gpu", 1, 8, 12, 9)
    held = {"JobState": "PENDING", "Reason": "BeginTime", "Restarts": "1", "SubmitTime": "2026-01-01T00:00:10"}
    assert slurm_helpers.held_seconds(held, now=datetime(2026, 1, 1, 0, 0, 13)) == 2   # 1 s taken off: truncation
    assert slurm_helpers.held_seconds({**held, "Restarts": "0"}) is None              # --begin, not a requeue
    assert slurm_helpers.held_seconds({**held, "Reason": "Priority"}) is None


def test_a_followed_job_is_asked_about_at_most_once_a_period(tmp_path):
    """Issue 28 item 4: squeue while the job lives, sacct once it left the queue, never more than one round of
    questions per period; the end is known in the round that finds the job gone."""
    from cratescale.launch.slurm_watch import SlurmWatch

    jid = subprocess.check_output(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 6"], text=True).strip()
    watch, seen, t0 = SlurmWatch(jid, period_s=2.0), [], time.monotonic()
    while watch.poll() != "COMPLETED":
        assert time.monotonic() - t0 < 60, (watch.state, watch.history)
        seen.append(watch.state)
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    gaps = [b - a for a, b in zip(watch.asked_at, watch.asked_at[1:])]
    assert "RUNNING" in seen and watch.left_queue and watch.history[-1] == "COMPLETED"
    assert min(gaps) >= 2.0 and watch.queries <= elapsed / 2.0 + 1, (gaps, elapsed)
    assert len(seen) > 10 * watch.queries   # polled every 50 ms, answered from the last question in between
