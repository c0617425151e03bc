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
