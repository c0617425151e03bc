"""Each stage's state, read from what it leaves in the run directory (`status RUN`, `runs DIR`): done, not run,
failed, stale (made from an earlier step than the stage before it now holds), running or incomplete."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cratescale.config import JobConfig, RunPaths
from cratescale.launch.failures import stage_failure
from cratescale.launch.order import stage_sets


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _export_step(paths: RunPaths) -> int | None:
    return ((_json(paths.export / "export.json") or {}).get("provenance") or {}).get("step")


def _export_fingerprint(paths: RunPaths) -> str | None:
    from cratescale.checkpoint.export import export_fingerprint

    try:
        return export_fingerprint(paths.export)
    except OSError:
        return None


def _pretrain(state: str, commit_step: int | None, total: int | None) -> tuple[str, str]:
    detail = f"step {commit_step} committed" + (f" of {total}" if total else "") if commit_step is not None else ""
    if state == "COMPLETED":
        return "done", detail
    if state in ("RUNNING", "PENDING", "REQUEUED"):
        return "running", detail
    if state == "NOT STARTED":
        return "not run", detail
    return state.lower(), detail  # PREEMPTED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL: SLURM's word


def _export(paths: RunPaths, commit_step: int | None) -> tuple[str, str]:
    step = _export_step(paths)
    if step is None:
        return "not run", ""
    if commit_step is not None and commit_step != step:
        return "stale", f"step {step}; the newest commit is step {commit_step}"
    return "done", f"step {step}"


def _extract(store: Path, export_step: int | None) -> tuple[str, str]:
    from cratescale.embeddings.store import EmbeddingStore, StoreError

    try:
        s = EmbeddingStore(store)
    except StoreError:
        return "not run", ""
    done, total = s.info.num_shards - len(s.missing()), s.info.num_shards
    step = s.info.provenance.get("step")
    if done < total:
        return "incomplete", f"{done}/{total} shards committed (a rerun resumes it)"
    if export_step is not None and step != export_step:
        return "stale", f"made from the export of step {step}; the export is step {export_step}"
    return "done", f"{total} shards, export step {step}"


def _finetune(arm_dir: Path, export_fingerprint: str | None) -> tuple[str, str]:
    """A fine-tune run (launch/finetune_stage.py): done once exported, with its last top-1; stale when the pretrained
    arm started from another export than the run's current one."""
    from cratescale.checkpoint import CheckpointStore

    made = (_json(arm_dir / "export" / "export.json") or {}).get("provenance")
    if made is None:
        commit = CheckpointStore(arm_dir / "checkpoints").latest() if (arm_dir / "checkpoints").is_dir() else None
        return ("incomplete", f"step {commit.step} committed (a rerun resumes it)") if commit else ("not run", "")
    from cratescale.engine.metrics import read_metrics

    evals = [row for row in read_metrics(arm_dir) if row.get("kind") == "eval"]
    top1 = f", top-1 {100 * evals[-1]['top1']:.1f}% of {evals[-1]['n']}" if evals else ""
    if made.get("arm") == "pretrained" and export_fingerprint and \
            made.get("source_export_fingerprint") != export_fingerprint:
        return "stale", f"step {made.get('step')}{top1}; fine-tuned from an earlier export"
    return "done", f"step {made.get('step')}{top1}"


def _evaluate(report: Path, export_step: int | None) -> tuple[str, str]:
    inputs = _json(report / "inputs.json")
    if inputs is None:
        # metrics.json without inputs.json: a report that was being (re)written when it stopped
        return ("incomplete", "stopped while writing") if (report / "metrics.json").exists() else ("not run", "")
    if export_step is not None and inputs.get("export_step") != export_step:
        return "stale", f"of export step {inputs.get('export_step')}; the export is step {export_step}"
    return "done", f"export step {inputs.get('export_step')}"


def stage_states(job: JobConfig, run: Path, pretrain_state: str, commit_step: int | None,
                 total: int | None) -> list[dict[str, str]]:
    """[{stage, state, detail}] in the job's order, one row per set for extract and evaluate; the stage the
    launcher last recorded as failed (failures/stage.json) reads "failed" with its line."""
    paths = RunPaths(Path(run), RunPaths.of(job).data_root)  # the run as found (it may have been moved)
    export_step = _export_step(paths)
    rows: list[dict[str, str]] = []
    for stage in job.stages:
        if stage == "ingest":
            made = paths.manifest.is_file()
            found = [("", ("done", str(paths.manifest)) if made else ("not run", ""))]
        elif stage == "pretrain":
            found = [("", _pretrain(pretrain_state, commit_step, total))]
        elif stage == "export":
            found = [("", _export(paths, commit_step))]
        elif stage == "finetune":
            fingerprint = _export_fingerprint(paths)
            found = [(f"{n}/{arm}", _finetune(paths.finetune / n / arm, fingerprint))
                     for n in stage_sets(job) for arm in job.finetune.arms]
        elif stage == "extract":
            found = [(n, _extract(paths.embeddings / n, export_step)) for n in stage_sets(job)]
        else:
            found = [(n, _evaluate(paths.report / n, export_step)) for n in stage_sets(job)]
        rows += [{"stage": f"{stage} {name}".strip(), "state": state, "detail": detail}
                 for name, (state, detail) in found]
    if failed := stage_failure(run):
        for row in rows:
            if row["stage"].split()[0] == failed["stage"] and row["state"] != "done":
                row.update(state="failed", detail=failed["line"])
    return rows


def headline(run: Path, job: JobConfig) -> dict[str, dict[str, Any]]:
    """{set: {"probe"|"knn": {"top1", "low", "high", "n_test", "init", "pixels"}, "report": path}} from each
    report's metrics.json: the numbers a reader looks for first."""
    out: dict[str, dict[str, Any]] = {}
    for name in stage_sets(job):
        report = Path(run) / "report" / name
        metrics = _json(report / "metrics.json")
        if not metrics or not (report / "inputs.json").exists():
            continue
        found: dict[str, Any] = {"report": str(report / "results.md")}
        for key, result in metrics.get("results", {}).items():
            method = {"linear_probe": "probe", "knn": "knn"}.get(key.split("/", 1)[1])
            row = metrics.get("comparison", {}).get(key, {})
            if method and method not in found:
                ci = result.get("top1_ci95") or [None, None]
                found[method] = {"top1": 100 * result["top1"], "low": ci[0] and 100 * ci[0],
                                 "high": ci[1] and 100 * ci[1], "n_test": result.get("n_test"),
                                 "init": row.get("init"), "pixels": row.get("pixels"), "feature": key.split("/")[0]}
        out[name] = found
    return out
