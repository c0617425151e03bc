"""What a SLURM job does when its training step fails, decided inside the allocation (issue 28 item 1).

The batch script runs the step with `srun --kill-on-bad-exit=1` (a dead rank ends its peers at once) and, when it
fails, asks `python -m cratescale.launch.recover RUN_DIR --rc RC` for a verdict:

    retry     run the step again in this allocation (a killed rank, an OOM kill, a lost peer)
    requeue   `scontrol requeue` the job (the retries here are spent: fresh nodes may cure it)
    stop      let the job end: the run finished, the ranks stopped on a signal (SLURM requeues or cancels the
              job itself), the failure is deterministic, the requeue budget is spent, or a retry made no progress

The rules are the launcher's (launch/failures.py: classify_failure, may_retry), so nothing outside the allocation
is needed for a crashed rank; `<run_dir>/recovery.json` keeps the counts between two decisions and the last
verdict, which the launcher's supervisor respects (it does not resubmit what the job stopped).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from cratescale.config import load_job
from cratescale.engine.metrics import read_metrics
from cratescale.files import replace_durable
from cratescale.launch.failures import classify_failure, clear_failures, job_failure, may_retry
from cratescale.launch.progress import run_summary

RECORD = "recovery.json"
RETRIES_IN_ALLOCATION = 2  # then requeue: a node that keeps killing ranks is left for fresh ones


def read_record(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _stopped_on_a_signal(run_dir: Path) -> bool:
    """The last process's end row says preempted: USR2 (it requeued itself) or SIGTERM (SLURM decides)."""
    rows = [r for r in read_metrics(run_dir) if r.get("kind") in ("start", "end")]
    return bool(rows) and rows[-1].get("kind") == "end" and rows[-1].get("status") == "preempted"


def decide(run_dir: Path, rc: int, attempt: int, env: dict[str, str] | None = None) -> tuple[str, str]:
    """(verdict, why) for a failed step; records them in recovery.json."""
    env = dict(os.environ if env is None else env)
    job = load_job(run_dir / "config.yaml")
    summary = run_summary(run_dir)
    record = read_record(run_dir)
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    failure = job_failure(run_dir, None, 0)
    if summary["finished"]:
        verdict, why = "stop", "the run finished"
    elif _stopped_on_a_signal(run_dir):
        verdict, why = "stop", "the ranks stopped on a signal; SLURM requeues or cancels the job"
    elif classify_failure(failure) == "deterministic":
        verdict, why = "stop", f"not retried, the same config and data fail the same way: rank {failure.rank}: " \
                               f"{failure.line}"
    else:
        progressed = summary["step"] > record.get("step", -1)
        used = record.get("used", 0)  # retries and requeues of this run so far, all jobs
        retry, stalled = may_retry("transient", progressed, record.get("stalled", 0), used, job.cluster.max_requeues)
        record["stalled"] = stalled
        if not retry:
            verdict, why = "stop", ("no new step since the last retry" if stalled > 1 else
                                    f"cluster.max_requeues {job.cluster.max_requeues} spent")
        else:
            verdict = "retry" if attempt <= RETRIES_IN_ALLOCATION else "requeue"
            why = f"rc {rc}, {failure.line if failure else 'no rank recorded an error (killed)'}"
            record["used"] = used + 1
    record.update({"job": env.get("SLURM_JOB_ID"), "restart": restarts, "attempt": attempt, "rc": rc,
                   "step": summary["step"], "verdict": verdict, "why": why})
    replace_durable(run_dir / RECORD, json.dumps(record, indent=1))
    if verdict != "stop":
        clear_failures(run_dir)  # the next attempt's reasons must not be read as this one's
    return verdict, why


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cratescale.launch.recover", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rc", type=int, required=True, help="the failed step's exit code")
    parser.add_argument("--attempt", type=int, required=True, help="failed steps in this allocation so far")
    args = parser.parse_args(argv)
    try:
        verdict, why = decide(args.run_dir, args.rc, args.attempt)
    except Exception as err:  # noqa: BLE001 - the batch script needs a verdict: never retry blindly
        verdict, why = "stop", f"recovery check failed: {type(err).__name__}: {err}"
    print(f"{verdict}: {why}")
    return 0


def batch_lines(run_dir: Path) -> list[str]:
    """The sbatch setup lines that make the script's `srun` (submitit's, below them) retry in the allocation."""
    recover = f"{shlex.quote(sys.executable)} -m cratescale.launch.recover {shlex.quote(str(run_dir))}"
    return [
        "# cratescale: a failed training step is retried here or the job requeued (cratescale/launch/recover.py)",
        "srun() {",
        "  local attempt=0 rc verdict",
        "  while true; do",
        '    command srun --kill-on-bad-exit=1 "$@"; rc=$?',
        '    [ "$rc" -eq 0 ] && return 0',
        "    attempt=$((attempt + 1))",
        f'    verdict=$({recover} --rc "$rc" --attempt "$attempt")',
        '    echo "cratescale: training step ended with rc $rc: $verdict" >&2',
        '    case "$verdict" in',
        "      retry*) continue ;;",
        '      requeue*) scontrol requeue "$SLURM_JOB_ID"; sleep 600; return "$rc" ;;',
        '      *) return "$rc" ;;',
        "    esac",
        "  done",
        "}",
    ]


if __name__ == "__main__":
    sys.exit(main())
