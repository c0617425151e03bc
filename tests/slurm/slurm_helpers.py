"""The tests' SLURM helpers on top of cratescale/launch/slurm_tools.py: is the dev cluster up, and release a
requeued job early. Facts these rely on (SLURM 22.05, see shared/reference/SLURM_DEV.md):
- a requeued job is held PENDING with Reason=BeginTime for cred_expire s; its SubmitTime is reset to the requeue time;
- releasing it (StartTime=now) in the same second as the requeue kills it ("Job credential revoked"), so wait >= 2 s.
"""
from __future__ import annotations

from datetime import datetime

from cratescale.launch.slurm_tools import SlurmError, _run, job_info

# The dev cluster's high-priority partition (cluster/dev/slurm_up.sh, mn_up.sh: PriorityTier=10): a job submitted
# there preempts (USR2 -> checkpoint -> requeue) the training job on `debug`. The tests' knob, not the launcher's.
PREEMPT_PARTITION = "high"


def cluster_available(timeout: float = 10) -> bool:
    """True if the SLURM controller answers (`scontrol ping`) and sinfo lists at least one partition."""
    try:
        # ping first: it fails at once when slurmctld is down, while sinfo retries for ~9 s
        ping = _run("scontrol", "ping", timeout=timeout)
        if ping.returncode != 0 or " is UP" not in ping.stdout:
            return False
        res = _run("sinfo", "-h", "-o", "%R", timeout=timeout)
    except SlurmError:
        return False
    return res.returncode == 0 and bool(res.stdout.strip())


def held_seconds(info: dict[str, str], now: datetime | None = None) -> float | None:
    """Seconds a requeued job has been held for BeginTime (a lower bound), or None if it is not such a job.

    SubmitTime is reset to the requeue time but truncated to the second, so one second is taken off.
    """
    if info.get("JobState") != "PENDING" or info.get("Reason") != "BeginTime":
        return None
    if int(info.get("Restarts", "0") or 0) < 1:   # an explicit --begin, not a requeue: not ours to release
        return None
    try:
        submitted = datetime.fromisoformat(info["SubmitTime"])
    except (KeyError, ValueError):
        return None
    return ((now or datetime.now()) - submitted).total_seconds() - 1


def release_if_held(job_id: str | int, min_held_s: float = 2) -> bool:
    """Start a requeued job now instead of after cred_expire, once it has been held >= min_held_s.

    Returns True if it released the job. Releasing within the requeue's second makes SLURM kill the job with
    "Job credential revoked" (state FAILED), hence the wait; call this from a polling loop.
    """
    held = held_seconds(job_info(job_id))
    if held is None or held < min_held_s:
        return False
    res = _run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    if res.returncode != 0:   # it may have started or ended between the two calls
        if held_seconds(job_info(job_id)) is None:
            return False
        raise SlurmError(f"scontrol update JobId={job_id} StartTime=now failed: {res.stderr.strip()}")
    return True
