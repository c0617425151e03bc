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
