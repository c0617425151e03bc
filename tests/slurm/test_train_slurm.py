"""Training on the real dev SLURM cluster (issue 5): TrainTask through the slurm executor, stopped by every
kind of signal SLURM sends, requeued under the same job id, resumed exactly from the commit saved at the stop.

Every run trains the tiny job of tests/dist/tiny.yaml for STEPS steps on 2 ranks; its final weights are compared
bitwise with one uninterrupted run of the same config by the tests/dist harness (local processes, no SLURM).
Signals are sent once the metrics show the run is mid-way, so the tests poll files and SLURM, never sleep fixed
amounts. Requeued jobs are held cred_expire s; the waits release them after 2 s (slurm_helpers.release_if_held).
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import queued, sacct_states, wait_done_kicking, wait_sacct
from cratescale.checkpoint import CheckpointStore
from cratescale.config import dump_job, load_job, load_profile
from cratescale.engine.metrics import read_metrics
import slurm_helpers
from cratescale.launch import slurm_tools
from cratescale.launch.entry import TrainTask
from cratescale.launch.executors import make_executor
from cratescale.launch.progress import run_summary
from cratescale.launch.recover import read_record
from tests.dist.harness import (assert_same_tree, assert_within_elastic_bound, consumed_samples, final_weights,
                                start_ranks, write_config)
from train_helpers import (BASE_JOB, COMMON, REPO, RESTART_TIMEOUT, STEPS, job_overrides, last_step, launch_cli,
                           launcher_job_ids, log_tail, mid_run, restarted, rows, wait_until)

PROFILE = load_profile("local")


def submit(run_dir: Path, manifest: Path, name: str, extra: list[str] = ()):
    """What the supervisor does, without Ray: config into the run dir, TrainTask through make_executor."""
    job = load_job(BASE_JOB, job_overrides(run_dir, manifest, name, list(extra)))
    config = run_dir / "config.yaml"
    dump_job(job, config)
    executor = make_executor(job, PROFILE, run_dir / "submitit" / "%j")
    return executor.submit(TrainTask(str(config), str(manifest), PROFILE.peak_flops_per_gpu))


def check_resumed_at_stop(run_dir: Path, start_index: int, what: str, job_id: str) -> int:
    """Start `start_index` resumed at the step the stop before it committed, in the same job. Returns it."""
    all_rows = read_metrics(run_dir)
    at = [i for i, r in enumerate(all_rows) if r.get("kind") == "start"]
    before = all_rows[at[start_index - 1]:at[start_index]]
    start = all_rows[at[start_index]]
    ends = [r for r in before if r["kind"] == "end"]
    assert ends and ends[-1]["status"] == "preempted", f"{what}: no preempted end row before restart: {ends}"
    stop = ends[-1]["step"]
    assert any(r["kind"] == "commit" and r["step"] == stop for r in before), f"{what}: step {stop} not committed"
    assert start["resumed"] and not start["elastic"] and start["step"] == stop, f"{what}: {start} (stop {stop})"
    assert start["job_id"] == job_id, f"{what}: restarted as job {start['job_id']}, not {job_id}"
    return stop


def assert_matches_reference(run_dir: Path, reference: "Reference", exact_samples: bool = True) -> None:
    step, weights = final_weights(run_dir)
    ref_step, ref_weights = reference.weights()
    assert step == ref_step == STEPS
    assert_same_tree(weights, ref_weights)
    got, want = consumed_samples(run_dir), consumed_samples(reference.run_dir)
    if not exact_samples:   # a kill -9 recomputes the steps after the last commit: their ids appear twice
        got = {s: sorted(set(ids)) for s, ids in got.items()}
    assert got == want, "the sample order differs from the uninterrupted run"


class Reference:
    """The uninterrupted run, trained by local processes in the background while the SLURM tests start."""

    def __init__(self, run_dir: Path, manifest: Path) -> None:
        self.run_dir = run_dir
        config = write_config(BASE_JOB, run_dir, [*COMMON, "checkpoint.every_steps=50"])
        self.procs = start_ranks(config, manifest, 2)
        self.outputs: list[str] = ["", ""]
        # Drain the pipes now: a full pipe would stall the ranks.
        self.threads = [threading.Thread(target=self._drain, args=(i,), daemon=True) for i in range(2)]
        for thread in self.threads:
            thread.start()
        self._weights = None

    def _drain(self, i: int) -> None:
        self.outputs[i] = self.procs[i].communicate()[0]

    def weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        if self._weights is None:
            for proc, thread, i in zip(self.procs, self.threads, range(2)):
                thread.join(timeout=600)
                assert proc.returncode == 0, f"reference rank {i} failed:\n{self.outputs[i][-3000:]}"
            self._weights = final_weights(self.run_dir)
        return self._weights


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_manifest):
    ref = Reference(tmp_path_factory.mktemp("reference") / "run", tiny_manifest)
    yield ref
    for proc in ref.procs:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------------------------------------- tests
def test_slurm_run_completes_and_matches_local_run(tmp_path, tiny_manifest, reference, job_names):
    run_dir = tmp_path / "run"
    job = submit(run_dir, tiny_manifest, job_names.new("clean"), ["checkpoint.every_steps=50"])
    wait_done_kicking(job, timeout=RESTART_TIMEOUT)
    results = sorted(job.results(), key=lambda r: r["rank"])
    assert results == [{"status": "completed", "step": STEPS, "rank": rank} for rank in (0, 1)]
    assert wait_sacct(job.job_id, "COMPLETED") == ["COMPLETED"]
    starts = rows(run_dir, "start")
    assert len(starts) == 1 and not starts[0]["resumed"] and starts[0]["job_id"] == job.job_id
    assert starts[0]["world_size"] == 2
    summary = run_summary(run_dir)
    assert summary["finished"] and summary["restarts"] == 0 and summary["step"] == STEPS
    assert summary["first_step_s"] > starts[0]["setup_s"] > 0  # start-up, measured where the rank ran
    assert_matches_reference(run_dir, reference)


def test_usr2_sigterm_and_preemption_requeue_under_the_same_id_and_resume_exactly(tmp_path, tiny_manifest,
                                                                                   reference, job_names):
    run_dir = tmp_path / "run"
    high = job_names.new("high")
    legs = [
        ("USR2 (the time-limit signal)", lambda jid: ["scancel", "--signal=USR2", jid]),
        ("scontrol requeue (SIGTERM)", lambda jid: ["scontrol", "requeue", jid]),
        ("preemption by a job in the high partition",   # the whole node: it can start only by preempting us
         lambda jid: ["sbatch", "--parsable", "-p", slurm_helpers.PREEMPT_PARTITION, "-c", "2", "-J", high,
                      "-o", "/dev/null", "--wrap", "sleep 2"]),
    ]
    job = submit(run_dir, tiny_manifest, job_names.new("signals"), ["checkpoint.every_steps=50"])
    high_id = None
    for k, (what, command) in enumerate(legs, start=1):
        wait_until(lambda: mid_run(run_dir, k), RESTART_TIMEOUT, f"start {k} mid-run", run_dir, job.job_id)
        out = subprocess.run(command(job.job_id), capture_output=True, text=True, check=True)
        high_id = out.stdout.strip() or high_id
        wait_until(lambda: restarted(run_dir, k + 1), RESTART_TIMEOUT, f"the restart after {what}",
                   run_dir, job.job_id)
        check_resumed_at_stop(run_dir, k, what, job.job_id)
    wait_done_kicking(job, timeout=RESTART_TIMEOUT)
    results = job.results()
    assert [r["status"] for r in results] == ["completed"] * 2 and {r["step"] for r in results} == {STEPS}
    states = wait_sacct(job.job_id, "COMPLETED")
    assert len(states) == 4 and set(states[:3]) <= {"REQUEUED", "PREEMPTED"}, states   # one id, four runs
    assert wait_sacct(high_id, "COMPLETED") == ["COMPLETED"]
    summary = run_summary(run_dir)
    assert summary["restarts"] == 3 and summary["preempted"] == 3 and summary["lost_steps"] == 0
    assert summary["finished"]
    assert_matches_reference(run_dir, reference)


def _storm(job_id: str, run_dir: Path, timeout: float = 90) -> list[float]:
    """USR2 again and again until the stop is saved (its end row); returns when each was sent.

    scancel retries by itself for seconds when the job is in transition ("Job can not be altered now") and
    would then hit the restarted job before it can handle USR2: each scancel gets 1 s, then it is killed.
    """
    sent, t0 = [], time.monotonic()
    ends_before = len(rows(run_dir, "end"))
    while len(rows(run_dir, "end")) == ends_before:
        assert time.monotonic() - t0 < timeout, f"no stop after {len(sent)} USR2\n{log_tail(run_dir)}"
        if slurm_tools.job_info(job_id).get("JobState") != "RUNNING":
            time.sleep(0.05)
            continue
        try:
            subprocess.run(["scancel", "--signal=USR2", job_id], capture_output=True, timeout=1)
            sent.append(time.time())
        except subprocess.TimeoutExpired:
            pass
    return sent


def test_signals_during_checkpoint_writes_and_kill9_lose_no_committed_step(tmp_path, tiny_manifest, reference,
                                                                          job_names, processes):
    run_dir = tmp_path / "run"
    # A commit at every step: most of the wall time is spent writing checkpoints, where the signals land.
    proc = launch_cli(run_dir, tiny_manifest, job_names.new("storm"), ["checkpoint.every_steps=1"], processes)
    job_id = lambda: (launcher_job_ids(run_dir) or [None])[-1]  # noqa: E731
    wait_until(lambda: mid_run(run_dir, 1), RESTART_TIMEOUT, "start 1 mid-run", run_dir, job_id)
    first = job_id()
    sent = _storm(first, run_dir)
    wait_until(lambda: restarted(run_dir, 2), RESTART_TIMEOUT, "the restart after the storm",
               run_dir, job_id)
    check_resumed_at_stop(run_dir, 1, "USR2 storm", first)
    windows = [(r["time"] - r["seconds"], r["time"]) for r in rows(run_dir, "commit")]
    hits = [t for t in sent if any(a <= t <= b for a, b in windows)]
    assert hits, f"no signal was sent while a checkpoint was written ({len(sent)} sent)"

    # kill -9 of every rank of the running step: no save; the batch script asks launch/recover.py, which retries
    # the step in the same allocation (issue 28: no launcher needed), resuming from the newest commit.
    wait_until(lambda: mid_run(run_dir, 2, ahead=3), RESTART_TIMEOUT, "start 2 mid-run", run_dir, job_id)
    subprocess.run(["scancel", "--signal=KILL", f"{first}.0"], check=True)
    wait_until(lambda: read_record(run_dir).get("verdict"), 120, "the in-job recovery's verdict", run_dir)
    # What is on disk now is what survived the kill (the kill may fall between a commit and its metrics row).
    store = CheckpointStore(run_dir / "checkpoints")
    survived = store.latest().step
    killed_at = last_step(run_dir)
    record = read_record(run_dir)
    assert record["verdict"] == "retry" and record["job"] == first and record["attempt"] == 1, record
    wait_until(lambda: restarted(run_dir, 3), RESTART_TIMEOUT, "the retry after kill -9", run_dir, job_id)
    third = rows(run_dir, "start")[2]
    assert third["resumed"] and third["step"] == survived, f"{third} (newest commit {survived})"
    assert killed_at - survived <= 1, f"killed at step {killed_at}, newest commit {survived} (every_steps=1)"
    assert third["job_id"] == first == job_id()   # the same job: retried inside its allocation
    proc.wait(timeout=RESTART_TIMEOUT)
    assert proc.returncode == 0, (tmp_path / "run-launcher.log").read_text()[-3000:]
    state = json.loads((run_dir / "launch.json").read_text())
    assert state["job_ids"] == [first] and state["resubmits"] == 0
    # The follower asked SLURM once a period (10 s here) at most, plus its first question (issue 28 item 4)
    asked = sorted(state["slurm_queries"])
    assert len(asked) <= (asked[-1] - asked[0]) / 10 + 1, asked
    assert wait_sacct(first, "COMPLETED") == ["REQUEUED", "COMPLETED"]
    summary = run_summary(run_dir)
    assert summary["finished"] and summary["restarts"] == 2 and summary["lost_steps"] <= 1   # every_steps=1
    store.verify(store.latest())
    assert not list((run_dir / "checkpoints").glob("*.tmp*")), "a half-written checkpoint was left behind"
    assert_matches_reference(run_dir, reference, exact_samples=False)


def test_requeue_onto_fewer_tasks_resumes_elastically(tmp_path, tiny_manifest, reference, job_names):
    run_dir = tmp_path / "run"
    job = submit(run_dir, tiny_manifest, job_names.new("two"), ["checkpoint.every_steps=50"])
    wait_until(lambda: mid_run(run_dir, 1), RESTART_TIMEOUT, "start 1 mid-run", run_dir)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    # The job requeues itself (2 tasks); cancel it while SLURM holds it, and resubmit the run on 1 task.
    wait_until(lambda: slurm_tools.job_info(job.job_id).get("JobState") == "PENDING", 60, "the requeue", run_dir)
    subprocess.run(["scancel", job.job_id], check=True)
    wait_until(lambda: not queued(job_names.names[0]), 30, "the cancel", run_dir)
    stop = rows(run_dir, "end")[-1]
    assert stop["status"] == "preempted" and rows(run_dir, "commit")[-1]["step"] == stop["step"]

    one = submit(run_dir, tiny_manifest, job_names.new("one"), ["checkpoint.every_steps=50",
                                                                "cluster.tasks_per_node=1"])
    wait_done_kicking(one, timeout=RESTART_TIMEOUT)
    assert [r["status"] for r in one.results()] == ["completed"]
    start = rows(run_dir, "start")[-1]
    assert start["elastic"] and start["resumed"] and start["world_size"] == 1 and start["step"] == stop["step"]
    assert run_summary(run_dir)["lost_steps"] == 0
    step, weights = final_weights(run_dir)
    _, ref_weights = reference.weights()
    assert step == STEPS
    assert_within_elastic_bound(weights, ref_weights, f"2 -> 1 rank after a stop at step {stop['step']}")
    # the global sample sequence does not depend on the world size
    assert consumed_samples(run_dir) == consumed_samples(reference.run_dir)


def test_scancel_saves_and_stays_cancelled(tmp_path, tiny_manifest, job_names):
    # scancel sends SIGTERM, as an outside `scontrol requeue` does: the ranks save, but only USR2 makes the job
    # requeue itself; otherwise a user's cancel would be undone.
    run_dir = tmp_path / "run"
    job = submit(run_dir, tiny_manifest, job_names.new("cancel"), ["checkpoint.every_steps=50"])
    wait_until(lambda: mid_run(run_dir, 1), RESTART_TIMEOUT, "start 1 mid-run", run_dir)
    subprocess.run(["scancel", job.job_id], check=True)
    # A self-requeue would happen before the ranks exit: once SLURM is done with the job it would show.
    wait_until(lambda: slurm_tools.job_info(job.job_id).get("JobState") not in ("RUNNING", "COMPLETING"), 60,
               "the job's end", run_dir)
    info = slurm_tools.job_info(job.job_id)
    assert info.get("JobState") == "CANCELLED" and info.get("Restarts") == "0", info
    assert wait_sacct(job.job_id, "CANCELLED") == ["CANCELLED"]
    stop = rows(run_dir, "end")[-1]
    assert stop["status"] == "preempted" and CheckpointStore(run_dir / "checkpoints").latest().step == stop["step"]
    assert len(rows(run_dir, "start")) == 1


def _profile_missing_a_field(tmp_path: Path) -> str:
    text = (REPO / "cluster" / "profiles" / "local.yaml").read_text()
    path = tmp_path / "broken.yaml"
    path.write_text("\n".join(line for line in text.splitlines() if not line.startswith("peak_flops_per_gpu")))
    return str(path)


@pytest.mark.parametrize("case, extra, message, subprocess_cli", [
    ("partition", ["cluster.partition=nope"], "unknown partition 'nope'", True),
    ("profile", ["cluster.profile={broken}"], "peak_flops_per_gpu: Field required", False),
    ("cpus", ["cluster.tasks_per_node=4", "schedule.micro_batch=4"], "4 tasks x 1 cpus = 4 CPUs per node asked",
     False),
    ("array", ["cluster.array=[{model.overrides.mask_ratio: 0.5}, {schedule.micro_batch: -1}]"],
     "cluster.array[1]: schedule.micro_batch", False),
])
def test_bad_cluster_input_exits_2_with_one_line_and_queues_nothing(case, extra, message, subprocess_cli, tmp_path,
                                                                   tiny_manifest, job_names, capsys):
    name = job_names.new(case)
    extra = [e.replace("{broken}", _profile_missing_a_field(tmp_path)) for e in extra]
    run_dir = tmp_path / "run"
    # the later override wins: the bad value replaces job_overrides' own one
    argv = [str(BASE_JOB), *job_overrides(run_dir, tiny_manifest, name, extra)]
    if subprocess_cli:   # the real command once; in-process main() (the same code, no 5-10 s start) otherwise
        res = subprocess.run([sys.executable, "-m", "cratescale.launch", *argv], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL)
        code, err, out = res.returncode, res.stderr.strip(), res.stdout
    else:
        from cratescale.launch.__main__ import main

        code = main(argv)
        captured = capsys.readouterr()
        err, out = captured.err.strip(), captured.out
    assert code == 2, out[-2000:] + err[-2000:]
    assert "\n" not in err and err.startswith("error: ") and message in err, err
    assert queued(name) == [] and not (run_dir / "submitit").exists()


def test_deterministic_rank_error_ends_at_once_with_its_line(tmp_path, tiny_manifest, job_names):
    """Issue 14.2 / 13.6 on SLURM: a rank's ExportError (the same on every attempt) is not requeued or
    resubmitted, and the console shows that rank's own error line under its log path."""
    name = job_names.new("determ")
    export = tmp_path / "bad_export"
    export.mkdir()
    (export / "export.json").write_text("{}")   # passes the launcher's preflight; every rank refuses it
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "cratescale.launch", str(BASE_JOB),
                          *job_overrides(run_dir, tiny_manifest, name, ["cluster.max_requeues=5",
                                                                         f"checkpoint.start_fresh_from_weights={export}"])],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("error: pretrain: job"))
    assert "ended FAILED, not retried" in lines[head] and "_log.err" in lines[head], lines[head]
    assert lines[head + 1].startswith("  rank 0: ExportError: export: "), lines[head:head + 2]
    ids = launcher_job_ids(run_dir)
    assert len(ids) == 1 and sacct_states(ids[0]) == ["FAILED"], (ids, sacct_states(ids[0]))
