"""`python -m cratescale.launch status RUN [--json]`: where a run stands, from its own files (the job may run
anywhere, or not at all): metrics.jsonl, the checkpoint store, launch.json, and SLURM when it ran there."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cratescale.checkpoint import CheckpointStore
from cratescale.checkpoint.commit import read_marker
from cratescale.config import ConfigError, RunPaths, load_job
from cratescale.launch.failures import recorded_failures, stage_failure
from cratescale.launch.attach import launch_record
from cratescale.launch.progress import run_summary
from cratescale.launch.stage_state import headline, stage_states


def _slurm_state(job_id: str) -> str | None:
    """The SLURM state of the run's latest job, when the controller still knows it."""
    from cratescale.launch.slurm_tools import SlurmError, job_info

    try:
        return job_info(job_id).get("JobState")
    except (SlurmError, OSError):  # no SLURM here, or the controller is away: the files still tell the rest
        return None


def _state(summary: dict[str, Any], launch_state: dict[str, Any]) -> str:
    ids = launch_state.get("job_ids") or []
    if launch_state.get("executor") == "slurm" and ids and (slurm := _slurm_state(ids[-1])):
        return slurm
    if summary["ended"] == "completed":
        return "COMPLETED"
    if summary["ended"] == "preempted":
        return "PREEMPTED"
    return "RUNNING" if summary["started"] else "NOT STARTED"


def _last_commit(paths: RunPaths) -> tuple[int | None, float | None]:
    commit = CheckpointStore(paths.checkpoints).latest()
    if commit is None:
        return None, None
    marker = read_marker(commit.path) or {}
    return commit.step, marker.get("time")


def run_status(run: Path, now: float | None = None) -> dict[str, Any]:
    """Every field the status table shows, as plain values (None: not known yet)."""
    paths = RunPaths.of_run(run)
    if not paths.config.exists():
        raise ConfigError(f"status: {run} is not a run directory (no config.yaml)")
    now = time.time() if now is None else now
    summary = run_summary(run)
    launch_state = launch_record(paths) or {}
    last = summary["last"] or {}
    commit_step, commit_time = _last_commit(paths)
    age = (lambda t: None if t is None else round(now - t, 1))
    state = _state(summary, launch_state)
    job = load_job(paths.config)
    stages = stage_states(job, run, state, commit_step, summary["total_steps"])
    if failed := stage_failure(run):  # the last launch stopped at a stage: the run is not COMPLETED
        state = f"FAILED ({failed['stage']})"
    return {"run_dir": str(run), "name": job.name, "state": state, "step": summary["step"],
            "total_steps": summary["total_steps"], "restarts": summary["restarts"],
            "lost_steps": summary["lost_steps"], "last_commit_step": commit_step,
            "last_commit_age_s": age(commit_time), "images_per_s": last.get("images_per_s"),
            "data_wait": last.get("data_wait"), "bad_samples": last.get("bad_samples"),
            "decoder": summary["decoder"], "loss": last.get("loss"),
            "last_record_age_s": age(summary["last_record_time"]), "executor": launch_state.get("executor"),
            "job_ids": launch_state.get("job_ids", []), "submitit_dir": launch_state.get("submitit_dir"),
            "stages": stages, "failures": recorded_failures(run), "results": headline(run, job)}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m {s % 60}s ago"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m ago"
    return f"{s // 86400}d {s % 86400 // 3600}h ago"


def _decoder(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):  # e.g. {"kind": "dali", "device": "cpu", "version": "1.52"}
        return " ".join(str(v) for v in value.values() if v not in (None, ""))
    return str(value)


def _rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    dash = (lambda v, fmt="{}": "-" if v is None else fmt.format(v))
    commit = "-" if s["last_commit_step"] is None else \
        f"step {s['last_commit_step']} ({_age(s['last_commit_age_s'])})"
    return [("state", f"{s['state']}" + (f" (last record {_age(s['last_record_age_s'])})"
                                          if s["last_record_age_s"] is not None else "")),
            ("step", f"{s['step']} / {dash(s['total_steps'])}"),
            ("restarts", str(s["restarts"])), ("lost steps", str(s["lost_steps"])), ("last commit", commit),
            ("img/s", dash(s["images_per_s"], "{:.0f}")), ("data-wait", dash(s["data_wait"], "{:.0%}")),
            ("bad samples", dash(s["bad_samples"])), ("decoder", _decoder(s["decoder"])),
            ("loss", dash(s["loss"], "{:.4f}")),
            ("jobs", f"{s['executor'] or '-'} {', '.join(s['job_ids']) or '-'}"),
            *((f"  {r['stage']}", r["state"] + (f": {r['detail']}" if r["detail"] else "")) for r in s["stages"]),
            *(("failure", line) for line in s["failures"]),
            *_result_rows(s["results"])]


def _accuracy(r: dict[str, Any]) -> str:
    ci = f" [{r['low']:.1f}, {r['high']:.1f}]" if r.get("low") is not None else ""
    others = ", ".join(f"{k} {r[k]:.1f}" for k in ("init", "pixels") if r.get(k) is not None)
    return f"{r['top1']:.1f}%{ci} on {r['n_test']} test images" + (f" ({others})" if others else "")


def _result_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """The headline numbers of each report (95% interval in brackets) and where the report is."""
    rows = []
    for name, found in results.items():
        for method in ("probe", "knn"):
            if method in found:
                rows.append((f"{name} {method}", f"{found[method]['feature']}: {_accuracy(found[method])}"))
        rows.append((f"{name} report", found["report"]))
    return rows


def show_status(run_dir: str, as_json: bool = False, console: Console | None = None) -> int:
    """Reattach: what the run did so far, as a table (or JSON for scripts)."""
    status = run_status(Path(run_dir).expanduser().resolve())
    if as_json:
        print(json.dumps(status, indent=1))
        return 0
    table = Table(title=status["run_dir"], show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for name, value in _rows(status):
        table.add_row(name, value)
    (console or Console()).print(table)
    return 0


def _progress(stages: list[dict[str, str]]) -> str:
    """The first stage that is not done, and its state; "all done" when every one is."""
    pending = next((r for r in stages if r["state"] != "done"), None)
    return "all done" if pending is None else f"{pending['stage']}: {pending['state']}"


def show_runs(runs_dir: str = "runs", as_json: bool = False, console: Console | None = None) -> int:
    """`runs [DIR]`: every run directory under DIR (a config.yaml in it) with its state, one row each."""
    root = Path(runs_dir).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"runs: {root} is not a directory")
    found = []
    for run in sorted(p.parent for p in root.glob("*/config.yaml")):
        try:
            found.append(run_status(run))
        except (ConfigError, OSError, ValueError) as err:  # one unreadable run does not hide the others
            found.append({"run_dir": str(run), "name": run.name, "state": "UNREADABLE", "error": str(err)})
    if as_json:
        print(json.dumps(found, indent=1))
        return 0
    table = Table(title=f"{root}: {len(found)} run(s)", title_justify="left")
    for column in ("run", "state", "step", "stages", "probe / kNN (top-1 %)"):
        table.add_column(column)
    for s in found:
        if "error" in s:
            table.add_row(Path(s["run_dir"]).name, s["state"], "-", s["error"], "-")
            continue
        first = next(iter(s["results"].values()), {})
        numbers = " / ".join(f"{first[m]['top1']:.1f}" if m in first else "-" for m in ("probe", "knn"))
        table.add_row(Path(s["run_dir"]).name, s["state"], f"{s['step']} / {s['total_steps'] or '-'}",
                      _progress(s["stages"]), numbers if first else "-")
    (console or Console()).print(table)
    return 0
