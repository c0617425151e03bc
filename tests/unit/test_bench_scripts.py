"""The benchmark scripts in their CPU modes: bench/gpu_bench.py --cpu-smoke (same code paths as on a GPU, debug
models), its time boxes and skips, bench/gpu.sh's wrapper, and bench/scaling.py's arithmetic against
hand-computed cases."""
from __future__ import annotations

import argparse
import importlib
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def _load(name: str):
    return importlib.import_module(f"bench.{name}")


gpu_bench = _load("gpu_bench")
scaling = _load("scaling")
engine_overhead = _load("engine_overhead")


def _jpegs(folder: Path, n: int = 4) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40 + 8 * i, 30), (30 * i, 100, 200)).save(folder / f"im{i}.jpg", quality=90)
    (folder / "notes.txt").write_text("not an image")
    return folder


# ---- gpu_bench.py ------------------------------------------------------------------------------------
def test_cpu_smoke_runs_every_section_and_writes_results(tmp_path):
    data, out = _jpegs(tmp_path / "jpegs"), tmp_path / "out"
    # No wall-clock bound here (the sections' time boxes have their own test below): with two busy loops beside
    # the suite this smoke took over the 60 s it was once held to, on code that had not changed.
    proc = subprocess.run([PY, "bench/gpu_bench.py", "--cpu-smoke", "--data", str(data), "--out-dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| section | what | measured | unit | baseline | ratio | target | mfu | note |" in proc.stdout
    result = json.loads((out / "gpu_results.json").read_text())
    assert (out / "gpu_results.md").read_text().count("\n| ") >= 10
    rows = {r["what"]: r for r in result["rows"] if r["section"] != "profile"}
    assert result["meta"]["peak_tflops"] > 0
    for key in ("vit_mae_debug all eager", "crate_mae_debug all eager", "crate_mae_debug visible eager"):
        assert rows[key]["measured"] > 0 and 0 < rows[key]["mfu"] < 1, rows[key]
        assert rows[key]["extra"]["batch"] == 8 and len(rows[key]["extra"]["probes"]) == 3  # 2, 4, 8
    # the CRATE row is compared with the ViT row of the same layout
    crate, vit = rows["crate_mae_debug all eager"], rows["vit_mae_debug all eager"]
    assert crate["ratio"] == pytest.approx(crate["measured"] / vit["measured"])
    ckpt = [r for r in result["rows"] if r["section"] == "checkpoint"]
    assert len(ckpt) == 3 and all(r.get("measured", 0) > 0 for r in ckpt), ckpt  # torch.save, DeepSpeed, async
    decode = rows["CPU decode, 1 thread (PIL)"] if "CPU decode, 1 thread (PIL)" in rows else \
        rows["CPU decode, 1 thread (torchvision)"]
    assert decode["measured"] > 0 and "4 of 4 decodable" in decode["note"]
    assert rows["GPU nvJPEG batched"]["note"].startswith("skipped")
    skipped = {r["section"]: r["note"] for r in result["rows"] if r["what"] == "(section)"}
    assert skipped["train crate_mae_debug all compile"].startswith("skipped: cpu-smoke")
    assert skipped["engine crate_mae_debug all compile"].startswith("skipped: cpu-smoke")
    # the attention kernels were timed and one was selected for the training rows and the engine's job
    attention = [r for r in result["rows"] if r["section"] == "attention"]
    assert [r["what"] for r in attention[:3]] == [f"SDPA {k} fwd+bwd" for k in ("flash", "cudnn", "efficient")]
    assert attention[-1]["note"] == result["meta"]["sdpa"] in ("flash", "cudnn", "efficient")
    engine = rows["crate_mae_debug all DeepSpeed ZeRO-2 engine"]
    assert engine["measured"] > 0 and engine["extra"]["batch"] == 8 and "job demo.yaml" in engine["note"]
    # activation checkpointing runs at twice the eager batch (the recompute takes the same attention kernel)
    assert rows["crate_mae_debug all eager act-ckpt"]["extra"]["batch"] == 16
    assert rows["crate_mae_debug all eager autocast"]["measured"] > 0
    # issue 20's rows: the MSSA kernel (Triton's interpreter here), small batches, patch embedding, strided view
    kernel = [r for r in result["rows"] if r["section"] == "mssa kernel"]
    assert len(kernel) == 2 and all(r["measured"] > 0 for r in kernel), kernel
    assert skipped["train crate_mae_debug all eager mssa_triton"].startswith("skipped: cpu-smoke (Triton")
    small = [r for r in result["rows"] if r["section"] == "small batch"]
    assert [r["what"].split()[-5] for r in small] == ["default,", "reduce-overhead,"]
    assert all(r["measured"] > 0 and r["ratio"] > 0 for r in small)
    assert {r["what"].split()[0] for r in result["rows"] if r["section"] == "patch embed"} == {"GEMM", "MSSA"}
    profile = [r for r in result["rows"] if r["section"] == "profile"]
    assert profile and profile[0]["measured"] > 0 and "aten::" in profile[0]["note"]
    assert (out / "gpu_profile_crate_mae_debug_all_eager.txt").read_text().count("ms/step") > 5


def _bench(tmp_path, **over) -> "gpu_bench.Bench":
    args = gpu_bench.parse_args(["--cpu-smoke", "--out-dir", str(tmp_path)])
    for k, v in over.items():
        setattr(args, k, v)
    return gpu_bench.Bench(args)


def test_only_runs_the_named_sections(tmp_path):
    proc = subprocess.run([PY, "bench/gpu_bench.py", "--cpu-smoke", "--out-dir", str(tmp_path), "--only",
                           "crate_mae_debug all eager"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_results.json").read_text())["rows"]
    sections = {r["section"] for r in rows}
    assert {"env", "peak", "attention"} <= sections and "decode" not in sections and "checkpoint" not in sections
    whats = {r["what"] for r in rows}
    assert "crate_mae_debug all eager" in whats and "vit_mae_debug all eager" not in whats


def test_section_time_box_error_and_deadline_keep_the_run_going(tmp_path):
    b = _bench(tmp_path, budget=30)
    b.section("slow", 0.3, 0.1, lambda: time.sleep(5))
    b.section("broken", 5, 0.1, lambda: 1 / 0)
    b.section("fine", 5, 0.1, lambda: b.add("fine", "ok", measured=1.0))
    b.deadline = time.monotonic() + 2  # the global deadline is nearly spent
    b.section("late", 60, 10, lambda: b.add("late", "ran"))
    notes = [(r["section"], r.get("note", "")) for r in b.rows]
    assert notes[0][0] == "slow" and notes[0][1].startswith("timed out")
    assert notes[1][0] == "broken" and notes[1][1].startswith("error: ZeroDivisionError")
    assert notes[2] == ("fine", "")
    assert notes[3][0] == "late" and notes[3][1].startswith("skipped:")
    # partial results are on disk after every row
    assert len(json.loads((tmp_path / "gpu_results.json").read_text())["rows"]) == 4


def test_decode_section_skips_with_reason_when_data_is_missing(tmp_path):
    b = _bench(tmp_path, data=str(tmp_path / "nothing-here"))
    gpu_bench.section_decode(b)
    assert b.rows[-1]["note"].startswith("skipped: no JPEG folder/tar at")


def test_prepare_data_tar_round_trip(tmp_path):
    folder = _jpegs(tmp_path / "src", 5)
    dest = tmp_path / ".gpudata" / "sample.tar"
    gpu_bench.prepare_data(folder, dest, 3)
    with tarfile.open(dest) as tar:
        assert len(tar.getnames()) == 3
    blobs = gpu_bench.load_jpegs(dest, 100)
    assert blobs == gpu_bench.load_jpegs(folder, 3)  # same bytes, same (sorted) order
    assert all(b[:2] == b"\xff\xd8" for b in blobs)
    assert gpu_bench.load_jpegs(dest.parent, 100) == blobs  # a folder holding the tar, as gpu.sh passes .gpudata


def test_gpu_sh_runs_the_smoke_through_its_wrapper(tmp_path):
    env = {**os.environ, "PYTHON": PY, "WHL_DIR": str(tmp_path / "no-wheels"), "OUT": str(tmp_path / "out")}
    # a 3 s budget: the env row runs, every later section is skipped by the global deadline, exit 0
    proc = subprocess.run(["bash", "bench/gpu.sh", "--cpu-smoke", "--budget", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    md = (tmp_path / "out" / "gpu_results.md").read_text()
    assert "| env | machine |" in md and "left of the global budget" in md
    assert "| decode | (section) |" in md  # skipped, with its reason, not missing
    # the correctness section ran first: the CUDA-hidden stop checked, the DALI checks skipped for want of JPEGs
    check = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| binding | pass |" in check and "| mixed decode hw_decoder_load 0 | skipped |" in check
    assert proc.stdout.index("[gpu_check]") < proc.stdout.index("| section | what |")


def test_gpu_check_smoke_runs_the_correctness_section_on_real_photos(tmp_path):
    """bench/gpu_check.py --cpu-smoke: every check but Ray extraction runs its code with the CPU routes on both
    sides (the GPU side is what bench/gpu.sh's first section measures on a lent GPU)."""
    from tests.unit.data_fixtures import imagenet_folder

    photos = imagenet_folder(tmp_path / "photos", n=10)
    proc = subprocess.run([PY, "bench/gpu_check.py", "--cpu-smoke", "--data", str(photos), "--out-dir",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = {r["check"]: r for r in json.loads((tmp_path / "out" / "gpu_check.json").read_text())["rows"]}
    assert [r for r in rows.values() if r["status"] != "pass"] == [rows["extraction 2 actors"]]
    assert "CUDA hidden stops: SLURM_GPUS_ON_NODE=1 asks for GPUs" in rows["binding"]["note"]
    assert rows["crop decode routes roi vs full"]["note"].startswith("cpu roi vs full+slice: 2 batches")
    assert "auto picks roi" in rows["gpu_decode auto probe"]["note"]
    assert "grad_accum 2 on cpu vs the cpu route: 4 batches" in rows["grad_accum 2 pixels vs cpu route"]["note"]


def test_gpu_check_a_mismatch_or_crash_is_a_fail_row(tmp_path):
    gpu_check = _load("gpu_check")
    c = gpu_check.Checks(gpu_check.parse_args(["--cpu-smoke", "--out-dir", str(tmp_path)]))
    ids, pixels = torch.arange(4), torch.zeros(4, 3, 8, 8)
    same = [{"sample_ids": ids, "images": pixels + torch.rand(4, 3, 8, 8)}]
    c.run("same", lambda: c.compare(same, same, "same"))
    c.run("shifted", lambda: c.compare(same, [{"sample_ids": ids, "images": same[0]["images"] + 0.2}], "shifted"))
    c.run("other samples", lambda: c.compare(same, [{"sample_ids": ids + 1, "images": pixels}], "ids"))
    c.run("crash", lambda: 1 / 0)
    status = [(r["check"], r["status"]) for r in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]]
    assert status == [("same", "pass"), ("shifted", "FAIL"), ("other samples", "FAIL"), ("crash", "FAIL")]
    assert "mean abs diff 0.2000 (<= 0.05)" in c.rows[1]["note"] and "different samples" in c.rows[2]["note"]


# ---- scaling.py --------------------------------------------------------------------------------------
def test_collective_time_hierarchical_by_hand():
    links = scaling.Links(gpus_per_node=8, nvlink_gbs=100.0, nic_gbs=10.0, efficiency=1.0, latency_us=0.0)
    p = 1_000_000  # values, 2 bytes each = 2 MB
    assert scaling.collective_s(p, 2, 1, links) == 0.0
    assert scaling.collective_s(p, 2, 8, links) == pytest.approx(2e6 * 7 / 8 / 100e9)  # NVLink only
    # 2 nodes: + each GPU's 1/8 share across the NIC, half of it leaves the node
    assert scaling.collective_s(p, 2, 16, links) == pytest.approx(2e6 * 7 / 8 / 100e9 + 2e6 / 2 / 8 / 10e9)
    slow = scaling.Links(8, 100.0, 10.0, efficiency=0.5, latency_us=10.0)
    assert scaling.collective_s(p, 2, 16, slow) == pytest.approx(2 * (2e6 * 7 / 8 / 100e9 + 2e6 / 16 / 10e9)
                                                                + 10e-6 * (7 + 1))


def test_collective_counts_per_stage():
    assert scaling.collectives(2, 1, ds_allreduce=False) == {"overlappable": 1, "exposed": 1}  # textbook 2x
    assert scaling.collectives(2, 1) == {"overlappable": 2, "exposed": 1}  # DeepSpeed all-reduce: 3x
    assert scaling.collectives(2, 4) == {"overlappable": 8, "exposed": 1}  # reduced on every micro-step
    assert scaling.collectives(1, 4) == {"overlappable": 2, "exposed": 1}  # only at the boundary
    assert scaling.collectives(3, 1) == {"overlappable": 3, "exposed": 0}  # gather fwd + bwd, reduce-scatter
    with pytest.raises(ValueError, match="ZeRO stage"):
        scaling.collectives(4, 1)


def test_predict_by_hand():
    links = scaling.Links(8, nvlink_gbs=100.0, nic_gbs=10.0, efficiency=1.0, latency_us=0.0)
    compute = scaling.Compute(rate=100.0, fixed_s=0.1, max_micro=64, source="test")
    one = 2e6 * 7 / 8 / 100e9  # one unit for P = 1e6 bf16 values on one node
    # 1024 images on 8 GPUs = 128 per GPU > 64 fit: 2 micro-steps of 64
    p = scaling.predict(8, 1024, 1_000_000, compute, links, stage=2, nbytes=2, overlap=0.0)
    assert (p["micro"], p["accum"]) == (64, 2)
    assert p["compute_s"] == pytest.approx(2 * (0.1 + 0.64))
    assert p["comm_s"] == pytest.approx(5 * one)  # 2 all-reduces (2 units each) + 1 all-gather
    assert p["step_s"] == pytest.approx(1.48 + 5 * one)
    assert p["images_per_s"] == pytest.approx(1024 / p["step_s"])
    assert p["epoch_h"] == pytest.approx(14_197_122 / p["images_per_s"] / 3600)
    assert p["efficiency"] == pytest.approx(p["images_per_s"] / 800)
    hidden = scaling.predict(8, 1024, 1_000_000, compute, links, stage=2, nbytes=2, overlap=1.0)
    assert hidden["step_s"] == pytest.approx(1.48 + one)  # only the all-gather after the step stays exposed
    assert scaling.split_batch(300, 256) == (150, 2) and scaling.split_batch(8, 256) == (8, 1)


def test_fit_and_compute_from_gpu_results(tmp_path):
    assert scaling.fit_line([(1, 3), (2, 5), (4, 9)]) == pytest.approx((1.0, 2.0))
    with pytest.raises(ValueError):
        scaling.fit_line([(2, 1), (2, 3)])
    probes = [[b, 0.05 + b / 1000] for b in (32, 64, 128, 256)]
    rows = [{"extra": {"model": "crate_mae_base", "layout": "all", "compile": False, "batch": 256,
                       "step_s": 0.306, "probes": probes}}]
    variant = {"extra": {**rows[0]["extra"], "variant": "autocast", "probes": [], "step_s": 9.0}}
    path = tmp_path / "gpu_results.json"
    path.write_text(json.dumps({"rows": rows + [variant]}))
    c = scaling.compute_from_results([path], "crate_mae_base", "all")
    assert (c.rate, c.fixed_s, c.max_micro) == (pytest.approx(1000.0), pytest.approx(0.05), 256)
    with pytest.raises(ValueError, match="no eager training row"):
        scaling.compute_from_results([path], "crate_mae_base", "visible")
    with pytest.raises(ValueError, match="no compiled training row"):
        scaling.compute_from_results([path], "crate_mae_base", "all", compiled=True)
    # compiled: the engine row (in a second file) wins over the plain compiled row; the eager fixed cost stays
    compiled = [{"what": "crate_mae_base all compile", "extra": {"batch": 256, "step_s": 0.178}},
                {"what": "crate_mae_base all DeepSpeed ZeRO-2 engine compile", "extra": {"batch": 256, "step_s": 0.2}}]
    second = tmp_path / "run2.json"
    second.write_text(json.dumps({"rows": compiled}))
    c = scaling.compute_from_results([path, second], "crate_mae_base", "all", compiled=True)
    assert (c.rate, c.fixed_s) == (pytest.approx(256 / 0.15), pytest.approx(0.05))
    assert "engine compile" in c.source


def test_scaling_table_flags_small_per_gpu_batches(capsys):
    scaling.main(["--model", "crate_mae_debug", "--step-ms", "110", "--micro-batch", "256", "--fixed-ms", "10",
                  "--gpus", "8", "512"])
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.strip().split(" ")[0] in ("8", "512")]
    assert len(lines) == 2
    assert "too small" not in lines[0] and "per-GPU batch too small" in lines[1]
    # 8 GPUs: 512 per GPU = 2 x 256, compute 2 x 110 ms; rate 4096 / ~0.22 s
    assert float(lines[0].split()[6]) == pytest.approx(220.0, abs=1.0)


# ---- engine_overhead.py ------------------------------------------------------------------------------
def test_engine_overhead_report_ratio(capsys):
    res = {"demo": {"ddp": {"median": 0.020, "min": 0.021, "params": 1000, "micro": 32},
                    "ds": {"median": 0.022, "min": 0.023, "params": 1000, "micro": 32},
                    "ds+loop": {"median": 0.025, "min": 0.026, "params": 1000, "micro": 32}}}
    rows = engine_overhead.report(res)
    assert [r[3] for r in rows] == pytest.approx([1.1, 1.25])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "ok" in lines[2] and "MISS" in lines[3] and "median fwd/bwd/step" in lines[4]
    with pytest.raises(SystemExit, match="unknown"):
        engine_overhead.main(["--models", "demo,huge"])
    assert math.isfinite(engine_overhead.TARGET)
