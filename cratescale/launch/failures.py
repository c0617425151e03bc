"""Why a training job failed, and whether another attempt could succeed (issues 14.2 and 13.6).

A rank that raises writes `<run_dir>/failures/rank<r>.json` (its exception and message, and whether the error
is deterministic) before it exits, so the supervisor reads the reason for the local and the SLURM executor
alike, without parsing logs. `classify_failure` is the one place that decides retry or stop; extend it there
(for example with node-failure states of multi-node SLURM jobs).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from cratescale.distributed.device import GpuSetupError
from cratescale.engine.data_budget import BadDataError
from cratescale.engine.state import ResumeError
from cratescale.files import replace_durable

# Errors that a new attempt on the same config and data repeats: the project's own config, data, resume-identity
# and bad-data errors are ValueErrors (ConfigError, ManifestError, SamplerError, SourceError, ModelConfigError,
# ExportError, StoreError, CheckpointCorruptError) or named here; TypeError/ImportError and kin are code or
# environment errors no requeue cures, and so is GpuSetupError (GPUs asked for, a torch or node without CUDA);
# BadDataError is the bad-data budget's stop (DALI's own limits raise UndecodableData, a ValueError). Anything else (a gloo/NCCL RuntimeError after a peer died, an OSError of a
# flaky file system, a rank killed with no exception at all) is taken as transient and keeps the requeue path.
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, AttributeError, ImportError,
                                                         NotImplementedError, ResumeError, GpuSetupError,
                                                         BadDataError)
Kind = Literal["deterministic", "transient"]


@dataclass(frozen=True)
class RankFailure:
    rank: int
    line: str           # "ResumeError: <its message's first line>"
    deterministic: bool
    log: str = ""       # that rank's stderr log, where the whole traceback is


def failures_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "failures"


def error_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:400]}" if text else type(err).__name__


def record_failure(run_dir: Path | str, rank: int, err: BaseException) -> None:
    """Called by a rank on its way out; never raises (the original exception is what matters)."""
    try:
        folder = failures_dir(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        failure = RankFailure(rank, error_line(err), isinstance(err, DETERMINISTIC_ERRORS))
        replace_durable(folder / f"rank{rank}.json", json.dumps(asdict(failure)))
    except OSError:
        pass


_FATAL_FILES: list = []  # kept open for the process's life: faulthandler writes to them when a signal kills it
# faulthandler's names of the fatal signals it reports
_SIGNALS = {"Segmentation fault": "SIGSEGV", "Bus error": "SIGBUS", "Aborted": "SIGABRT",
            "Floating-point exception": "SIGFPE", "Floating point exception": "SIGFPE", "Illegal instruction": "SIGILL"}


def arm_crash_record(run_dir: Path | str, rank: int) -> None:
    """A rank killed by a fatal signal (a decoder's SIGSEGV in a native thread) raises nothing to record: ask
    faulthandler to write which signal, and where, into `<run_dir>/failures/rank<r>.fatal` instead."""
    import faulthandler

    folder = failures_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _FATAL_FILES.append(open(folder / f"rank{rank}.fatal", "w"))  # noqa: SIM115 - open until the process ends
    faulthandler.enable(file=_FATAL_FILES[-1], all_threads=True)


def crash_line(text: str) -> str | None:
    """One line from a faulthandler report: 'killed by SIGSEGV (Segmentation fault) in <innermost frame>'."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("Fatal Python error: "):
        return None
    fatal = lines[0].removeprefix("Fatal Python error: ")
    frames = [line for line in lines[1:] if line.startswith("File ")]
    where = f" in {frames[0].removeprefix('File ')}" if frames else ""
    return f"killed by {_SIGNALS.get(fatal, 'a fatal signal')} ({fatal}){where}"


def clear_failures(run_dir: Path | str) -> None:
    """Before a new attempt: reasons of an earlier one must not be read as this one's."""
    shutil.rmtree(failures_dir(run_dir), ignore_errors=True)


def job_failure(run_dir: Path | str, submitit_job: Any, world_size: int) -> RankFailure | None:
    """The failing rank's reason: a deterministic one first, then the lowest rank that recorded one, else the
    last line of the first failed task's traceback (submitit), else None (killed: nothing raised)."""
    recorded = []
    for path in sorted(failures_dir(run_dir).glob("rank*.json")):
        try:
            recorded.append(RankFailure(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    recorded.sort(key=lambda f: (not f.deterministic, f.rank))
    if recorded:
        first = recorded[0]
        return RankFailure(first.rank, first.line, first.deterministic, _log_of(submitit_job, first.rank))
    for path in sorted(failures_dir(run_dir).glob("rank*.fatal")):
        try:
            line = crash_line(path.read_text(errors="replace"))
        except OSError:
            continue
        if line:  # a signal: the next attempt may not meet it (a node's fault), or may (retried at most once)
            rank = int(path.stem.removeprefix("rank"))
            return RankFailure(rank, line, False, _log_of(submitit_job, rank))
    for rank in range(world_size):
        line = _traceback_line(submitit_job, rank)
        if line:
            return RankFailure(rank, line, False, _log_of(submitit_job, rank))
    return None


def _log_of(submitit_job: Any, rank: int) -> str:
    try:
        return str(submitit_job.task(rank).paths.stderr)
    except Exception:  # noqa: BLE001 - a path for the message only
        return ""


def _traceback_line(submitit_job: Any, rank: int) -> str | None:
    """Last line of a finished task's traceback (a crash in code that did not record: the pickling, the entry)."""
    from submitit.core.utils import FailedJobError

    try:
        task = submitit_job.task(rank)
        err = task.exception() if task.done() else None
    except Exception:  # noqa: BLE001 - no result to read
        return None
    if not isinstance(err, FailedJobError):
        return None
    trace = str(err).split("----------------------")
    lines = [line for line in (trace[1] if len(trace) > 2 else "").splitlines() if line.strip()]
    return lines[-1].strip()[:500] if lines else None


def classify_failure(failure: RankFailure | None) -> Kind:
    """Deterministic: the same config and data fail the same way; stop at once. Transient: requeue."""
    return "deterministic" if failure is not None and failure.deterministic else "transient"


def may_retry(kind: Kind, progressed: bool, stalled: int, resubmits: int, max_requeues: int) -> tuple[bool, int]:
    """(retry?, consecutive attempts without progress). A failure with no new step since the last attempt is
    retried at most once: a job that fails twice without a step is broken, not unlucky."""
    stalled = 0 if progressed else stalled + 1
    return kind == "transient" and resubmits < max_requeues and stalled <= 1, stalled


STAGE_FAILURE = "stage.json"  # the launcher's own record: which stage of the last launch failed, and its line


def record_stage_failure(run_dir: Path | str, stage: str, line: str) -> None:
    """The launcher's stage error, kept for `status` (the console that showed it may be long gone)."""
    import time

    try:
        failures_dir(run_dir).mkdir(parents=True, exist_ok=True)
        replace_durable(failures_dir(run_dir) / STAGE_FAILURE,
                        json.dumps({"stage": stage, "line": line.splitlines()[0][:500], "time": time.time()}))
    except OSError:
        pass  # the console already said it


def clear_stage_failure(run_dir: Path | str, stage: str) -> None:
    """A stage that has now run through is no longer the failed one."""
    path = failures_dir(run_dir) / STAGE_FAILURE
    if (stage_failure(run_dir) or {}).get("stage") == stage:
        path.unlink(missing_ok=True)


def stage_failure(run_dir: Path | str) -> dict[str, Any] | None:
    try:
        return json.loads((failures_dir(run_dir) / STAGE_FAILURE).read_text())
    except (OSError, ValueError):
        return None


def recorded_failures(run_dir: Path | str) -> list[str]:
    """Every reason in failures/, one line each: the launcher's stage error, then each rank's."""
    lines = [f"{f['stage']}: {f['line']}"] if (f := stage_failure(run_dir)) else []
    for path in sorted(failures_dir(run_dir).glob("rank*.json")):
        try:
            failure = RankFailure(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        lines.append(f"rank {failure.rank}: {failure.line}")
    for path in sorted(failures_dir(run_dir).glob("rank*.fatal")):
        if line := crash_line(path.read_text(errors="replace")):  # empty: armed at start, nothing happened
            lines.append(f"{path.stem.replace('rank', 'rank ')}: {line}")
    return lines
