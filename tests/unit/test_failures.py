"""Failure classification (issue 14.2): what a rank records, which rank's reason is shown, retry or stop."""
from __future__ import annotations

from cratescale.config import ConfigError
from cratescale.engine.state import ResumeError
from cratescale.launch.failures import (classify_failure, clear_failures, job_failure, may_retry, record_failure)


class NoJob:
    """A submitit job whose tasks left no result (killed): what job_failure falls back to."""

    def task(self, rank):
        raise RuntimeError("no such task")


def test_recorded_reasons_deterministic_first(tmp_path):
    record_failure(tmp_path, 0, RuntimeError("Connection closed by peer [127.0.0.1]:2345"))
    record_failure(tmp_path, 1, ResumeError("checkpoint saved with global batch 64, the job asks for 32\nmore"))
    failure = job_failure(tmp_path, NoJob(), 2)
    assert failure.rank == 1 and failure.line == "ResumeError: checkpoint saved with global batch 64, the job asks " \
                                                 "for 32"
    assert classify_failure(failure) == "deterministic"
    clear_failures(tmp_path)
    record_failure(tmp_path, 1, RuntimeError("Connection closed by peer"))
    assert classify_failure(job_failure(tmp_path, NoJob(), 2)) == "transient"
    clear_failures(tmp_path)
    assert job_failure(tmp_path, NoJob(), 2) is None and classify_failure(None) == "transient"  # killed: requeue


def test_config_and_data_errors_are_deterministic(tmp_path):
    for err in [ConfigError("data.source: gone"), ValueError("fewer training samples"),
                ImportError("no module named nvidia.dali")]:
        clear_failures(tmp_path)
        record_failure(tmp_path, 1, err)
        failure = job_failure(tmp_path, NoJob(), 2)
        assert failure.deterministic and failure.line == f"{type(err).__name__}: {err}", failure


def test_no_progress_is_retried_once_deterministic_never():
    assert may_retry("transient", progressed=False, stalled=0, resubmits=0, max_requeues=5) == (True, 1)
    assert may_retry("transient", progressed=False, stalled=1, resubmits=1, max_requeues=5) == (False, 2)
    assert may_retry("transient", progressed=True, stalled=1, resubmits=1, max_requeues=5) == (True, 0)
    assert may_retry("transient", progressed=True, stalled=0, resubmits=5, max_requeues=5) == (False, 0)
    assert may_retry("deterministic", progressed=True, stalled=0, resubmits=0, max_requeues=5)[0] is False


def test_a_rank_killed_by_a_signal_is_reported_with_the_signal(tmp_path):
    """Issue 29.5: a rank that dies by a signal (DALI's executor thread segfaulting) raises nothing; before, the
    console said only "job ... ended FAILED". A real process armed as TrainTask arms its ranks, then SIGSEGV."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import os, signal\n"
            "from cratescale.launch.failures import arm_crash_record\n"
            f"arm_crash_record({str(tmp_path)!r}, 1)\n"
            "def decode():\n"
            "    os.kill(os.getpid(), signal.SIGSEGV)\n"
            "decode()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -11, proc.stderr
    failure = job_failure(tmp_path, NoJob(), 2)
    assert failure.rank == 1 and failure.line.startswith("killed by SIGSEGV (Segmentation fault) in "), failure
    assert 'line 5 in decode' in failure.line and "\n" not in failure.line
    assert classify_failure(failure) == "transient"  # retried at most once without progress (may_retry)


def test_the_data_pipelines_limits_are_bad_data_and_deterministic(tmp_path):
    """DALI's limits (more than 64 recoveries in a batch, a failure no single sample causes) and the budget's
    stop end with the bad-data line, not retried (before: RuntimeErrors, classified transient, retried)."""
    from cratescale.engine.data_budget import BadDataError
    from data_pipeline.dali_loader import UndecodableData

    for i, err in enumerate([UndecodableData("bad data: 64 undecodable samples within one batch from sample 8"),
                             BadDataError("bad data: 3 sample(s) found no decodable replacement")]):
        record_failure(tmp_path / str(i), 0, err)
        failure = job_failure(tmp_path / str(i), NoJob(), 1)
        assert failure.line.startswith(f"{type(err).__name__}: bad data: ")
        assert classify_failure(failure) == "deterministic"
