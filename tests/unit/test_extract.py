"""Extraction: Ray actor pool over a small synthetic manifest equals a direct encode; SIGKILL + rerun is
byte-identical; the evaluate stage runs on the result."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cratescale.checkpoint.export import export_weights
from cratescale.embeddings.extract import _shard_batches, extract, group_shards, load_model
from cratescale.embeddings.store import EmbeddingStore
from cratescale.models import create_model

REPO = Path(__file__).resolve().parents[2]
N = 40
OPTS = dict(shard_rows=8, chunk_rows=4, batch_size=8, loader_kind="pil")   # 5 shards

# The CLI with a pause after every committed shard, so a SIGKILL lands between shards for sure.
SLOW_CLI = r"""
import sys, time
from cratescale.embeddings import store as st
orig = st.EmbeddingStore.write_shard
def slow(self, *a, **kw):
    r = orig(self, *a, **kw)
    time.sleep(float(sys.argv[-1]))
    return r
st.EmbeddingStore.write_shard = slow
from cratescale.embeddings.__main__ import main
sys.exit(main(sys.argv[1:-1]))
"""


@pytest.fixture(scope="module")
def ray_local():
    """Ray for this module: the session's if one runs, else a fresh local one (address="local", so a stale
    /tmp/ray/ray_current_cluster left by some other `ray start` is never joined)."""
    from data_pipeline.local_ray import start_or_join_ray

    start_or_join_ray()
    import ray

    return ray


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from data_pipeline.ingest import ingest

    root = tmp_path_factory.mktemp("extract")
    manifest = ingest(f"synthetic://shapes?n={N}&classes=4&size=32&seed=0", root / "data", workers=0,
                      val_per_class=2, progress=False)
    torch.manual_seed(0)
    model = create_model("crate_mae_debug")
    export_weights(model.state_dict(), model.config, {"step": 3, "run_name": "test"}, root / "export")
    return root, Path(manifest)


def _direct(export: Path, manifest: Path) -> dict[str, np.ndarray]:
    """Single process, one batch of all rows, no Ray, no store."""
    from data_pipeline.loader import make_eval_loader

    model, _ = load_model(export)
    batch = next(iter(make_eval_loader(manifest, np.arange(N), N, 32, kind="pil")))
    with torch.no_grad():
        out = model.encode(batch["images"], layers=[1])
    tokens = out["layers"][0]
    return {"cls": out["cls"].numpy(), "mean": out["mean"].numpy(), "layer_1_cls": tokens[:, 0].numpy(),
            "layer_1_mean": tokens[:, 1:].mean(1).numpy(), "sample_ids": batch["sample_ids"].numpy()}


def _cli(args: list[str], delay: float = 0.0, wait: bool = True):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args, str(delay)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
    return p


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "store.json"}


def test_ray_actor_pool_matches_direct_encode(setup, ray_local):
    root, manifest = setup
    store_dir = extract(root / "export", manifest, root / "ray_store", layers=(-1,), dtype="float32",
                        actors=2, **OPTS)
    store = EmbeddingStore(store_dir)
    assert store.is_complete() and store.info.num_rows == N and store.verify() == []
    assert sorted(store.info.dims) == ["cls", "layer_1_cls", "layer_1_mean", "mean"]   # -1 -> layer 1
    want = _direct(root / "export", manifest)
    for name in store.info.dims:
        np.testing.assert_allclose(store.read(name), want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    m = pd.read_parquet(manifest)
    meta = store.metadata()
    assert meta.row.tolist() == list(range(N))
    assert meta.sample_id.tolist() == m.sample_id.tolist() == want["sample_ids"].tolist()
    assert meta.label.tolist() == m.label.tolist() and meta.split.tolist() == m.split.tolist()
    assert meta.key.tolist() == m.key.tolist()
    info = json.loads((store_dir / "store.json").read_text())
    assert info["provenance"]["step"] == 3 and info["provenance"]["model_config"]["name"] == "crate_mae_debug"
    assert info["source"]["rows"] == N and len(info["source"]["fingerprint"]) == 64
    # A rerun over a complete store does no work and changes nothing.
    before = _files(store_dir)
    extract(root / "export", manifest, store_dir, layers=(1,), dtype="float32", actors=2, **OPTS)
    assert _files(store_dir) == before


def test_killed_extraction_resumes_byte_identical(setup):
    root, manifest = setup
    common = [str(root / "export"), str(manifest), "--actors", "0", "--layers", "1", "--shard-rows", "8",
              "--chunk-rows", "4", "--batch-size", "8", "--loader", "pil"]
    _cli(["extract", *common[:2], str(root / "ref"), *common[2:]])

    killed = root / "killed"
    p = _cli(["extract", *common[:2], str(killed), *common[2:]], delay=60.0, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "commits").glob("shard_*.json")):
        assert p.poll() is None, p.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    partial = EmbeddingStore(killed)
    assert 1 <= len(partial.committed()) < partial.info.num_shards

    r = subprocess.run([sys.executable, "-m", "cratescale.embeddings", "info", str(killed)], cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    assert f"{len(partial.committed())}/5 shards committed" in r.stdout, r.stdout + r.stderr

    _cli(["extract", *common[:2], str(killed), *common[2:]])
    assert EmbeddingStore(killed).is_complete()
    ref_files, got_files = _files(root / "ref"), _files(killed)
    assert sorted(ref_files) == sorted(got_files)
    assert [k for k in ref_files if ref_files[k] != got_files[k]] == []


def test_refuses_a_store_from_other_settings(setup):
    root, manifest = setup
    extract(root / "export", manifest, root / "s16", actors=0, split="val", **OPTS)
    assert EmbeddingStore(root / "s16").info.num_rows == 8         # 4 classes x 2 val images
    with pytest.raises(ValueError, match="dtype"):
        extract(root / "export", manifest, root / "s16", actors=0, split="val", dtype="float32", **OPTS)
    other = root / "export2"
    torch.manual_seed(1)
    m2 = create_model("crate_mae_debug")
    export_weights(m2.state_dict(), m2.config, {"step": 4}, other)
    with pytest.raises(ValueError, match="another export"):
        extract(other, manifest, root / "s16", actors=0, split="val", **OPTS)
    with pytest.raises(ValueError, match="features"):
        extract(root / "export", manifest, root / "bad", actors=0, features=("patch",), **OPTS)
    with pytest.raises(FileNotFoundError, match="manifest"):
        extract(root / "export", root / "nope.parquet", root / "bad", actors=0, **OPTS)


def test_evaluate_stage_writes_report(setup):
    from cratescale.evaluation.report import evaluate

    root, manifest = setup
    extract(root / "export", manifest, root / "eval_store", actors=0, **OPTS)
    written = evaluate(root / "export", root / "eval_store", manifest, root / "report", features=("cls", "mean"),
                       diagnostic_images=4, loader_kind="pil")
    metrics = json.loads(written["metrics.json"].read_text())
    assert set(metrics["results"]) == {"cls/knn", "cls/linear_probe", "mean/knn", "mean/linear_probe"}
    for r in metrics["results"].values():
        assert 0.0 <= r["top1"] <= 1.0 and r["n_train"] == 32 and r["n_test"] == 8
    curves = metrics["diagnostics"]["curves"]
    assert len(curves["coding_rate_subspace"]) == 2 and len(curves["zero_fraction"]) == 2
    for name in ("results.png", "layers.png", "attention.png", "pca.png", "reconstructions.png"):
        data = written[name].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    assert "| cls | knn |" in written["results.md"].read_text()


def test_grouping_does_not_change_the_bytes(setup):
    # One loader per task of several shards must give the same features as one loader per shard.
    root, manifest = setup
    extract(root / "export", manifest, root / "g1", actors=0, shards_per_task=1, **{**OPTS, "batch_size": 3})
    extract(root / "export", manifest, root / "g3", actors=0, shards_per_task=3, **{**OPTS, "batch_size": 3})
    assert _files(root / "g1") == _files(root / "g3")


def test_shard_batches_and_groups():
    loader = [{"images": torch.arange(i, min(i + 4, 11)).float(), "sample_ids": torch.arange(i, min(i + 4, 11))}
              for i in range(0, 11, 4)]                                  # 11 rows in batches of 4
    got = [(i, sid.tolist(), last) for i, _, sid, last in _shard_batches(loader, [5, 6], 3)]
    assert got == [(0, [0, 1, 2], False), (0, [3, 4], True), (1, [5, 6, 7], False), (1, [8, 9, 10], True)]
    with pytest.raises(RuntimeError, match="early"):
        list(_shard_batches(loader, [5, 7], 3))
    assert group_shards([0, 1, 2, 3, 4], actors=2) == [[0, 1], [2, 3], [4]]
    assert group_shards(list(range(100)), actors=2)[0] == list(range(8))  # capped at 8 shards a task
    assert group_shards([3, 9], actors=0, shards_per_task=5) == [[3, 9]]
