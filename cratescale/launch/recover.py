"""What a SLURM job does when its training step fails, decided inside the allocation (issue 28 item 1).

The job asks SLURM for `--nodes=MIN-MAX` (cluster.min_nodes to cluster.nodes) with `--requeue`: after a lost node
SLURM requeues it by itself onto the nodes it can get, and the batch script runs the step on the largest node count
of the allocation whose ranks split the global batch (config/batching.py); while fewer than cluster.nodes train, it
looks for idle nodes once every cluster.slurm_poll_s and, when they would allow more, stops the step with USR2
(commit, then rank 0 requeues the job, which then gets the full count). The batch script runs the step with
`srun --kill-on-bad-exit=1` (a dead rank ends its peers at once) and, when it fails, asks `python -m cratescale.launch.recover RUN_DIR --rc RC` for a verdict:

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

from cratescale.config import JobConfig, load_job
from cratescale.config.batching import no_fit_line, resumable_node_counts
from cratescale.engine.metrics import read_metrics
from cratescale.files import replace_durable
from cratescale.launch.failures import classify_failure, clear_failures, job_failure, may_retry
from cratescale.launch.progress import run_summary

RECORD = "recovery.json"
GROWN = "grow_requested_from"  # the allocation's node count when the batch script last requeued to grow
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


def node_counts(run_dir: Path) -> str:
    """The node counts the job may train on (ascending, space separated), for the batch script's choice."""
    return " ".join(map(str, resumable_node_counts(load_job(run_dir / "config.yaml"))))


def no_fit(run_dir: Path, allocated: int) -> str:
    """What to do when no node count of an allocation of `allocated` nodes splits the global batch: "wait: ..."
    (requeue once more nodes are idle) or "stop: ..." (cluster.when_no_fit), with the numbers."""
    job = load_job(run_dir / "config.yaml")
    line = no_fit_line(job, allocated, "node(s) in this allocation")
    if job.cluster.when_no_fit == "stop":
        record = read_record(run_dir)
        record.update({"job": os.environ.get("SLURM_JOB_ID"), "verdict": "stop", "why": line})
        replace_durable(run_dir / RECORD, json.dumps(record, indent=1))
    return f"{job.cluster.when_no_fit}: {line}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cratescale.launch.recover", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rc", type=int, help="the failed step's exit code")
    parser.add_argument("--attempt", type=int, help="failed steps in this allocation so far")
    parser.add_argument("--counts", action="store_true", help="print the node counts the batch splits over")
    parser.add_argument("--no-fit", type=int, metavar="NODES", help="no count fits NODES: print wait|stop: why")
    args = parser.parse_args(argv)
    if args.counts:
        print(node_counts(args.run_dir))
        return 0
    if args.no_fit is not None:
        print(no_fit(args.run_dir, args.no_fit))
        return 0
    try:
        verdict, why = decide(args.run_dir, args.rc, args.attempt)
    except Exception as err:  # noqa: BLE001 - the batch script needs a verdict: never retry blindly
        verdict, why = "stop", f"recovery check failed: {type(err).__name__}: {err}"
    print(f"{verdict}: {why}")
    return 0


def batch_lines(job: JobConfig) -> list[str]:
    """The sbatch setup lines that run the training step (submitit's `srun`, below them) on the node count the
    allocation holds and the global batch splits over, retry it in the allocation when it fails, and grow back
    (a commit and a requeue) when idle nodes would allow a larger count (SLURM does not grow a running job)."""
    run_dir = Path(job.run_dir)
    recover = f"{shlex.quote(sys.executable)} -m cratescale.launch.recover {shlex.quote(str(run_dir))}"
    per_node, poll = job.cluster.tasks_per_node, max(10, int(job.cluster.slurm_poll_s))
    return [
        "# cratescale: the training step runs on the largest node count of this allocation that splits the global",
        "# batch, is retried here or the job requeued when it fails, and grows back when idle nodes allow",
        "# (cratescale/launch/recover.py)",
        "cs_fit() { local best=0 c; for c in $1; do [ \"$c\" -le \"$2\" ] && best=$c; done; echo \"$best\"; }",
        "cs_idle() { sinfo -h -p \"$SLURM_JOB_PARTITION\" -t idle -o %D 2>/dev/null | awk '{n += $1} END {print n + 0}'; }",
        "srun() {",
        "  local attempt=0 rc verdict counts nodes pid waited more grow=1",
        f"  local grown={shlex.quote(str(run_dir / GROWN))}",
        "  # a requeue to grow that got no more nodes (others took them, or the request cannot fit more): not again",
        '  [ -f "$grown" ] && [ "$SLURM_JOB_NUM_NODES" -le "$(cat "$grown")" ] && grow=0; rm -f "$grown"',
        "  while true; do",
        f'    counts=$({recover} --counts); [ -n "$counts" ] || counts=$SLURM_JOB_NUM_NODES',
        '    nodes=$(cs_fit "$counts" "$SLURM_JOB_NUM_NODES")',
        '    if [ "$nodes" -eq 0 ]; then',
        f'      verdict=$({recover} --no-fit "$SLURM_JOB_NUM_NODES"); echo "cratescale: $verdict" >&2',
        '      case "$verdict" in stop*) return 1 ;; esac',
        f'      until [ "$(cs_fit "$counts" $((SLURM_JOB_NUM_NODES + $(cs_idle))))" -gt 0 ]; do sleep {poll}; done',
        '      scontrol requeue "$SLURM_JOB_ID"; sleep 600; return 1',
        "    fi",
        '    [ "$nodes" -lt "$SLURM_JOB_NUM_NODES" ] && echo "cratescale: $SLURM_JOB_NUM_NODES nodes allocated;' +
        ' training on $nodes (the global batch splits over: $counts)" >&2',
        f'    command srun --kill-on-bad-exit=1 --nodes="$nodes" --ntasks=$((nodes * {per_node})) '
        f'--ntasks-per-node={per_node} "$@" & pid=$!',
        "    waited=0",
        '    while kill -0 "$pid" 2>/dev/null; do',
        "      sleep 2; waited=$((waited + 2))",
        f'      if [ "$grow" = 1 ] && [ "$waited" -ge {poll} ] && [ "$nodes" -lt {job.cluster.nodes} ]; then',
        '        waited=0; more=$(cs_fit "$counts" $((SLURM_JOB_NUM_NODES + $(cs_idle))))',
        '        if [ "$more" -gt "$nodes" ]; then',
        '          echo "cratescale: idle nodes allow $more nodes: stopping with a commit to requeue on them" >&2',
        '          echo "$SLURM_JOB_NUM_NODES" > "$grown"; kill -USR2 "$pid"; grow=0',
        "        fi",
        "      fi",
        "    done",
        '    wait "$pid"; rc=$?',
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
