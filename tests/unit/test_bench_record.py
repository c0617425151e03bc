"""bench/record.py: every CPU benchmark's raw output names the machine, its load at both ends, the command line and
the date, and keeps the per-rep data (BENCHMARKS.md's rows cite these files). Two fast scripts are run end to end
with --json; nothing is timed here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import record

REPO = Path(__file__).resolve().parents[2]


def _check_header(data: dict, script: str) -> None:
    machine = data["machine"]
    assert machine["cores"] == os.cpu_count() and machine["cpu"] and machine["cpu"] != "unknown"
    assert isinstance(machine["load_start"], float) and isinstance(machine["load_end"], float)
    assert data["date"].endswith("Z") and len(data["date"]) == 20
    assert data["command"][1] == script, data["command"]


def test_run_saves_header_and_data_and_nothing_without_a_path(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(REPO / "bench" / "model_step.py"), "--steps", "3"])
    run = record.Run()
    out = run.save(tmp_path / "sub" / "x.json", {"reps": [{"a": 1.0}, {"a": 2.0}]})
    data = json.loads((tmp_path / "sub" / "x.json").read_text())
    assert data == out and data["reps"] == [{"a": 1.0}, {"a": 2.0}]
    _check_header(data, "bench/model_step.py")
    assert data["command"][2:] == ["--steps", "3"] and data["seconds"] >= 0
    run.save(None, {"reps": []})
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub", "x.json"]


def _run(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]


def test_patch_embed_keeps_every_step(tmp_path):
    out = tmp_path / "patch_embed.json"
    _run(["bench.patch_embed", "--batch", "2", "--steps", "2", "--threads", "1", "--device", "cpu", "--json", str(out)])
    data = json.loads(out.read_text())
    _check_header(data, "bench/patch_embed.py")
    assert [r["dtype"] for r in data["rows"]] == ["float32", "bfloat16"]
    for row in data["rows"]:  # warm-up + 2 timed steps each; the ratio follows from the medians shown
        assert len(row["conv_s"]) == len(row["gemm_s"]) == 3
        assert row["ratio_conv_over_gemm"] == row["conv_median_s"] / row["gemm_median_s"]


def test_store_keeps_every_repeat(tmp_path):
    out = tmp_path / "store.json"
    _run(["bench.store", "--rows", "2048", "--dim", "8", "--shard-rows", "1024", "--chunk-rows", "256",
          "--repeats", "2", "--json", str(out)])
    data = json.loads(out.read_text())
    _check_header(data, "bench/store.py")
    assert len(data["repeats"]) == 2
    assert [m["metric"] for m in data["repeats"][0]] == ["write MiB/s", "read MiB/s"]
    assert all(m["store"] > 0 and m["ratio"] == m["store"] / m["baseline_npy"] for r in data["repeats"] for m in r)
