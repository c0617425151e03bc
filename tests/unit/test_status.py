"""`python -m cratescale.launch status RUN`: a table a person reads, or JSON for scripts, from the run's files."""
from __future__ import annotations

import json
import time
from pathlib import Path

from cratescale.checkpoint import CheckpointStore
from cratescale.config import dump_job, load_job
from cratescale.launch.__main__ import main

REPO = Path(__file__).resolve().parents[2]


def _run_dir(tmp_path: Path, *rows: dict) -> Path:
    run = tmp_path / "run"
    dump_job(load_job(REPO / "tests" / "dist" / "tiny.yaml", [f"run_dir={run}"]), run / "config.yaml")
    now = time.time()
    with open(run / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps({"time": now - 5, **row}) + "\n" for row in rows))
    (run / "launch.json").write_text(json.dumps({"executor": "local", "job_ids": ["4242"], "resubmits": 1}))
    return run


START = {"kind": "start", "step": 0, "total_steps": 20, "resumed": False}
TRAIN = {"kind": "train", "step": 10, "loss": 0.5, "images_per_s": 123.4, "data_wait": 0.25}


def _table(capsys, run: Path) -> dict[str, str]:
    assert main(["status", str(run)]) == 0
    lines = [line.strip("│┃ ") for line in capsys.readouterr().out.splitlines()]
    cells = [[c.strip() for c in line.split("│")] for line in lines if "│" in line]
    return {c[0]: c[1] for c in cells if len(c) == 2}


def test_status_table_and_json(tmp_path, capsys):
    dali = {"kind": "dali", "device": "cpu", "version": "1.52"}
    run = _run_dir(tmp_path, {**START, "decoder": {"kind": "pil", "version": "11.3"}},
                   {**TRAIN, "step": 8}, {"kind": "commit", "step": 8}, {**TRAIN, "bad_samples": 3},
                   {"kind": "end", "step": 10, "status": "preempted"},
                   {**START, "step": 8, "resumed": True, "decoder": dali},  # the latest process's decoder is shown
                   {**TRAIN, "step": 12, "bad_samples": 4})
    store = CheckpointStore(run / "checkpoints")
    store.save(8, lambda p: (p / "w.bin").write_bytes(b"w"), {"world_size": 2})
    table = _table(capsys, run)
    assert table["state"].startswith("RUNNING (last record 5s ago")
    assert table["step"] == "12 / 20" and table["restarts"] == "1" and table["lost steps"] == "2"
    assert table["last commit"].startswith("step 8 (") and table["last commit"].endswith("s ago)")
    assert (table["img/s"], table["data-wait"], table["bad samples"]) == ("123", "25%", "4")
    assert table["decoder"] == "dali cpu 1.52" and table["jobs"] == "local 4242"

    assert main(["status", str(run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {k: status[k] for k in ("state", "step", "total_steps", "restarts", "lost_steps", "last_commit_step",
                                   "images_per_s", "data_wait", "bad_samples")} == \
        {"state": "RUNNING", "step": 12, "total_steps": 20, "restarts": 1, "lost_steps": 2, "last_commit_step": 8,
         "images_per_s": 123.4, "data_wait": 0.25, "bad_samples": 4}
    assert status["decoder"]["kind"] == "dali" and 0 <= status["last_commit_age_s"] < 60


def test_status_shows_a_dash_for_what_the_run_did_not_record(tmp_path, capsys):
    run = _run_dir(tmp_path, START, TRAIN, {"kind": "end", "step": 20, "status": "completed"})
    table = _table(capsys, run)
    assert table["state"].startswith("COMPLETED")
    assert (table["bad samples"], table["decoder"], table["last commit"]) == ("-", "-", "-")


def _finished(tmp_path: Path, name: str, export_step: int = 20) -> Path:
    """A run whose every stage left its files: manifest, commit at step 20, export, a one-shard store and a report
    (a 200-image test set, the probe below the raw-pixel baseline)."""
    import numpy as np
    import pandas as pd

    from cratescale.embeddings.store import EmbeddingStore, StoreInfo

    run = tmp_path / name
    job = load_job(REPO / "tests" / "dist" / "tiny.yaml", [f"run_dir={run}", f"name={name}",
                                                            "stages=[ingest,pretrain,export,extract,evaluate]"])
    dump_job(job, run / "config.yaml")
    rows = [{**START}, {**TRAIN, "step": 20}, {"kind": "end", "step": 20, "status": "completed"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps({"time": time.time(), **r}) + "\n" for r in rows))
    (run / "data").mkdir()
    (run / "data" / "manifest.parquet").write_bytes(b"PAR1")
    CheckpointStore(run / "checkpoints").save(20, lambda p: (p / "w.bin").write_bytes(b"w"), {"world_size": 2})
    (run / "export").mkdir()
    (run / "export" / "export.json").write_text(json.dumps({"provenance": {"step": export_step}}))
    store = EmbeddingStore.create(run / "embeddings" / "pretrain",
                                  StoreInfo(num_rows=4, dims={"mean": 2}, shard_rows=4, chunk_rows=4,
                                            provenance={"step": export_step}))
    store.write_shard(0, {"mean": np.zeros((4, 2))}, pd.DataFrame({"sample_id": range(4), "key": list("abcd"),
                                                                 "label": [0, 1, 0, 1], "split": ["train"] * 4}))
    report = run / "report" / "pretrain"
    report.mkdir(parents=True)
    probe = {"top1": 0.5, "top1_ci95": [0.431, 0.569], "n_test": 200, "method": "linear_probe"}
    (report / "metrics.json").write_text(json.dumps({
        "results": {"mean/linear_probe": probe, "mean/knn": {**probe, "top1": 0.4, "top1_ci95": None}},
        "comparison": {"mean/linear_probe": {"pretrained": 50.0, "init": 30.0, "pixels": 55.0}}}))
    (report / "inputs.json").write_text(json.dumps({"export_step": export_step, "key": "k"}))
    return run


def _stage_rows(table: dict[str, str]) -> dict[str, str]:
    return {k.strip(): v for k, v in table.items() if k.startswith(("ingest", "pretrain", "export", "extract",
                                                                     "evaluate"))
            and not k.endswith(("probe", "knn", "report"))}


def test_status_of_a_finished_and_a_failed_run_and_the_runs_listing(tmp_path, capsys, monkeypatch):
    """Each stage's state, the headline numbers with their interval, the report's path; a launch that failed at
    a stage reads FAILED with the stage's line and the ranks' recorded reasons (before: COMPLETED, no stages)."""
    import cratescale.launch.run as run_module
    from cratescale.launch.display import StageError
    from cratescale.launch.failures import record_failure

    monkeypatch.setenv("COLUMNS", "300")  # one table row per line: long paths are not wrapped
    finished = _finished(tmp_path / "runs", "good")
    table = _table(capsys, finished)
    assert table["state"].startswith("COMPLETED")
    assert _stage_rows(table) == {
        "ingest": f"done: {finished}/data/manifest.parquet", "pretrain": "done: step 20 committed of 20",
        "export": "done: step 20", "extract pretrain": "done: 1 shards, export step 20",
        "evaluate pretrain": "done: export step 20"}, table
    assert table["pretrain probe"] == "mean: 50.0% [43.1, 56.9] on 200 test images (init 30.0, pixels 55.0)"
    assert table["pretrain knn"] == "mean: 40.0% on 200 test images"
    assert table["pretrain report"] == f"{finished}/report/pretrain/results.md"

    failed = _finished(tmp_path / "runs", "bad", export_step=10)  # an export older than the newest commit
    (failed / "report" / "pretrain" / "inputs.json").unlink()  # the evaluate of that launch never finished
    # The launcher's own loop records the stage that failed (its other stages stubbed: this test is about status).
    stages = {name: (lambda *a: None) for name in run_module.STAGES}
    stages["evaluate"] = lambda *a: (_ for _ in ()).throw(StageError("evaluate: pretrain: damaged shard(s) 0"))
    for attr, value in (("STAGES", stages), ("start_ray", lambda address: None), ("check_data", lambda *a: None),
                        ("check_stage_order", lambda *a: None), ("preflight", lambda *a: None)):
        monkeypatch.setattr(run_module, attr, value)
    assert main([str(failed / "config.yaml"), "--stages", "export,evaluate"]) == 1
    record_failure(failed, 1, ValueError("a rank's own reason"))
    capsys.readouterr()
    table = _table(capsys, failed)
    assert table["state"].startswith("FAILED (evaluate) (last record"), table
    rows = _stage_rows(table)
    assert rows["export"] == "stale: step 10; the newest commit is step 20"
    assert rows["evaluate pretrain"] == "failed: evaluate: pretrain: damaged shard(s) 0"
    assert rows["extract pretrain"].startswith("done") and "pretrain probe" not in table
    assert main(["status", str(failed), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["failures"] == ["evaluate: evaluate: pretrain: damaged shard(s) 0",
                                  "rank 1: ValueError: a rank's own reason"]

    assert main(["runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    good = next(line for line in out.splitlines() if "good" in line)
    bad = next(line for line in out.splitlines() if "bad" in line)
    assert "COMPLETED" in good and "all done" in good and "50.0 / 40.0" in good, out
    assert "FAILED (evaluate)" in bad and "export: stale" in bad, out
    assert main(["runs", str(tmp_path / "nope")]) == 2
