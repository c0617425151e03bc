"""bench/scale.py end to end at a tiny size: every point runs in its own process and reports, a rank and a loader
worker start from the same sample ids, the counts agree with the synthetic manifest's shape, the plot is drawn."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.scale_data import FULL_CLASSES, FULL_ROWS, FULL_SHARDS, VAL_PER_CLASS, manifest_table

REPO = Path(__file__).resolve().parents[2]


def test_the_synthetic_manifest_has_the_target_job_s_shape():
    t = manifest_table(50_000)
    classes = round(FULL_CLASSES * 50_000 / FULL_ROWS)
    assert t.num_rows == 50_000 and len(t["class_name"].unique()) == classes
    assert len(t["path"].unique()) == round(FULL_SHARDS * 50_000 / FULL_ROWS) == 12
    assert t["split"].to_pylist().count("val") == VAL_PER_CLASS * classes
    sizes, offsets, paths = t["size"].to_numpy(), t["offset"].to_numpy(), np.array(t["path"].to_pylist())
    same = paths[1:] == paths[:-1]
    assert (offsets[1:][same] >= offsets[:-1][same] + sizes[:-1][same]).all()  # a shard's members do not overlap
    assert (offsets[1:][~same] < offsets[:-1][~same]).all() and offsets.min() > 0  # each shard starts again


def test_scale_bench_runs_every_point(tmp_path):
    out = tmp_path / "scale.jsonl"
    cmd = [sys.executable, "bench/scale.py", "--rows", "3000", "--worlds", "8", "--global-batch", "256", "--commits", "3", "--tree-files",
           "100", "--node-procs", "2", "--hold", "1", "--work", str(tmp_path / "work"), "--out", str(out),
           "--png", str(tmp_path / "scale.png")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = {(r["what"], r["world"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {("index_build", None), ("rank", 8), ("worker", 8), ("sampler", 8), ("count", None),
                            ("fingerprint", None), ("resume", None), ("ingest_plan", None), ("node_workers", None)}
    for r in records.values():
        assert "error" not in r and r["startup_s"] >= 0 and r["peak_rss_mb"] > 0, r
    rank, worker = records[("rank", 8)], records[("worker", 8)]
    assert rank["first_ids"] == worker["first_ids"] and rank["count"] == rank["train_rows"] == records[("count", None)]["count"]
    assert records[("resume", None)]["step"] == 3000 and records[("ingest_plan", None)]["files"] == 100
    assert records[("node_workers", None)]["sum_pss_mb"] > 0
    assert (tmp_path / "scale.png").stat().st_size > 10_000
