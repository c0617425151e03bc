"""Stages that refresh (issue 29.4): a finished run launched again with a longer schedule trains on, and its
export, embedding stores and report follow the new weights; launched once more unchanged, it submits nothing
and redoes nothing. The launcher end to end: local Ray, submitit's local executor, 2 DeepSpeed ranks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cratescale.launch.quiet import NATIVE_LINE

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.dist

SMALL = ["data.source=synthetic://shapes?n=128&classes=4&size=32&seed=0", "data.val_per_class=4",
         "schedule.global_batch=16", "schedule.micro_batch=8", "schedule.warmup_steps=2",
         "checkpoint.every_steps=10", "logging.every_steps=10", "extract.batch_size=64", "extract.actors=1",
         "evaluate.layers=false", "evaluate.diagnostic_images=4", "evaluate.baselines=[init]"]


def launch(run_dir: Path, steps: int) -> str:
    res = subprocess.run([sys.executable, "-m", "cratescale.launch", str(REPO / "jobs/demo.yaml"),
                          f"run_dir={run_dir}", *SMALL, f"schedule.steps={steps}"],
                         capture_output=True, text=True, timeout=900, cwd=run_dir.parent, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    native = [line for line in res.stderr.splitlines() if NATIVE_LINE.match(line.encode())]
    assert not native, native  # Ray's core-worker line at the extraction pool's start: launcher.log's
    return " ".join(res.stdout.split())  # rich wraps long lines


def outputs(run_dir: Path) -> dict[str, Path]:
    return {"export": run_dir / "export/export.json", "store": run_dir / "embeddings/pretrain/store.json",
            "init_store": run_dir / "embeddings/pretrain.init/store.json",
            "report": run_dir / "report/pretrain/inputs.json", "results": run_dir / "report/pretrain/results.md",
            "metrics": run_dir / "metrics.jsonl", "launch": run_dir / "launch.json",
            "latest": run_dir / "checkpoints/latest"}


def steps_made(run_dir: Path) -> tuple:
    export = json.loads((run_dir / "export/export.json").read_text())["provenance"]
    store = json.loads((run_dir / "embeddings/pretrain/store.json").read_text())["provenance"]
    report = run_dir / "report/pretrain/inputs.json"  # what the report was made from
    return export["step"], store["step"], json.loads(report.read_text())["export_step"] if report.exists() else None


def test_training_longer_refreshes_every_stage_and_a_finished_run_redoes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    launch(run_dir, 20)
    assert steps_made(run_dir)[:2] == (20, 20)
    assert "core_worker.cc" in (run_dir / "logs/launcher.log").read_text()  # kept, off the console
    init_store = outputs(run_dir)["init_store"].stat().st_mtime_ns

    out = launch(run_dir, 30)  # before: FileExistsError at the export, a traceback
    assert steps_made(run_dir) == (30, 30, 30)
    history = json.loads((run_dir / "export/export.json").read_text())["provenance"]["history"]
    assert [h["step"] for h in history] == [20] and "history" not in history[0]
    assert "was made from the export of step 20, the export is now step 30: extracting again" in out, out
    assert outputs(run_dir)["init_store"].stat().st_mtime_ns == init_store  # the init export did not change
    assert "is complete for this export and manifest, skipping" in out  # ... so its store is kept
    assert not list((run_dir / "embeddings").glob("*.next")) and not (run_dir / "export.tmp").exists()
    assert "| pretrained" in (run_dir / "report/pretrain/results.md").read_text()

    before = {name: (p.stat().st_mtime_ns, p.read_bytes()) for name, p in outputs(run_dir).items()}
    out = launch(run_dir, 30)
    after = {name: (p.stat().st_mtime_ns, p.read_bytes()) for name, p in outputs(run_dir).items()}
    assert after == before, [name for name in before if before[name] != after[name]]
    for line in ("ingest: ", "is current", "pretrain: step 30 is committed", "nothing submitted",
                 "export: step 30 is already exported", "evaluate: pretrain: its inputs did not change"):
        assert line in out, (line, out)
    assert out.count("is complete for this export and manifest, skipping") == 2, out
