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

from cratescale.checkpoint.export import export_weights, load_model
from cratescale.embeddings.extract import _shard_batches, extract, group_shards
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


def test_evaluate_stage_writes_report_with_baselines_and_layers(setup):
    from cratescale.evaluation.knn import knn_eval
    from cratescale.evaluation.report import evaluate
    from data_pipeline.loader import make_eval_loader

    root, manifest = setup
    torch.manual_seed(1)
    init = create_model("crate_mae_debug")
    export_weights(init.state_dict(), init.config, {"step": 0}, root / "export_init")
    extract(root / "export", manifest, root / "eval_store", actors=0, layers=(0, 1), **OPTS)
    extract(root / "export_init", manifest, root / "eval_init", actors=0, layers=(0, 1), **OPTS)
    written = evaluate(root / "export", root / "eval_store", manifest, root / "report", features=("cls", "mean"),
                       diagnostic_images=4, loader_kind="pil", init_export=root / "export_init",
                       init_store=root / "eval_init")
    metrics = json.loads(written["metrics.json"].read_text())
    assert set(metrics["results"]) == {"cls/knn", "cls/linear_probe", "mean/knn", "mean/linear_probe"}
    assert set(metrics["baselines"]["init"]) == set(metrics["results"])
    assert set(metrics["baselines"]["pixels"]) == {"pixels/knn", "pixels/linear_probe"}
    for r in [*metrics["results"].values(), *metrics["baselines"]["init"].values(),
              *metrics["baselines"]["pixels"].values()]:
        assert 0.0 <= r["top1"] <= 1.0 and r["n_train"] == 32 and r["n_test"] == 8
    # The pixel baseline is exactly the kNN protocol on the decoded images of the same rows.
    splits = pd.read_parquet(manifest, columns=["split"]).split.to_numpy()
    arrays = {}
    for split in ("train", "val"):
        batch = next(iter(make_eval_loader(manifest, np.flatnonzero(splits == split), N, 32, kind="pil")))
        arrays[split] = (batch["images"].flatten(1).numpy(), batch["labels"].numpy())
    direct = knn_eval(*arrays["train"], *arrays["val"])
    assert metrics["baselines"]["pixels"]["pixels/knn"]["top1"] == direct["top1"]
    assert metrics["baselines"]["pixels"]["pixels/knn"]["dim"] == 3 * 32 * 32
    row = metrics["comparison"]["mean/linear_probe"]
    assert row["pretrained"] == 100 * metrics["results"]["mean/linear_probe"]["top1"]
    assert row["vs_init"] == row["pretrained"] - 100 * metrics["baselines"]["init"]["mean/linear_probe"]["top1"]
    assert row["vs_pixels"] == row["pretrained"] - row["pixels"]
    # Per layer: both stored layers of both models, the best one named; init diagnostics beside the trained.
    assert set(metrics["layers"]["pretrained"]) == set(metrics["layers"]["init"]) == {"1", "2"}
    assert metrics["best_layer"]["layer"] in (1, 2) and metrics["best_layer"]["method"] == "linear_probe"
    for key in ("diagnostics", "diagnostics_init"):
        assert len(metrics[key]["curves"]["coding_rate_subspace"]) == 2
    assert metrics["diagnostics"]["curves"] != metrics["diagnostics_init"]["curves"]
    for name in ("results.png", "layers.png", "attention.png", "pca.png", "reconstructions.png"):
        data = written[name].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    md = written["results.md"].read_text()
    assert "| cls | knn |" in md and "raw pixels (%)" in md and "Best layer (pretrained, linear_probe)" in md


def test_grouping_does_not_change_the_bytes(setup):
    # One loader per task of several shards must give the same features as one loader per shard.
    root, manifest = setup
    extract(root / "export", manifest, root / "g1", actors=0, shards_per_task=1, **{**OPTS, "batch_size": 3})
    extract(root / "export", manifest, root / "g3", actors=0, shards_per_task=3, **{**OPTS, "batch_size": 3})
    assert _files(root / "g1") == _files(root / "g3")


def test_shard_batches_and_groups():
    loader = [{"images": torch.arange(i, min(i + 4, 11)).float(), "valid": torch.arange(i, min(i + 4, 11)) != 6}
              for i in range(0, 11, 4)]                                  # 11 rows in batches of 4, row 6 invalid
    got = [(i, x.tolist(), ok.tolist(), last) for i, x, ok, last in _shard_batches(loader, [5, 6], 3)]
    assert got == [(0, [0, 1, 2], [True] * 3, False), (0, [3, 4], [True] * 2, True),
                   (1, [5, 6, 7], [True, False, True], False), (1, [8, 9, 10], [True] * 3, True)]
    with pytest.raises(RuntimeError, match="early"):
        list(_shard_batches(loader, [5, 7], 3))
    assert group_shards([0, 1, 2, 3, 4], actors=2) == [[0, 1], [2, 3], [4]]
    assert group_shards(list(range(100)), actors=2)[0] == list(range(8))  # capped at 8 shards a task
    assert group_shards([3, 9], actors=0, shards_per_task=5) == [[3, 9]]


def test_undecodable_rows_are_marked_nan_and_left_out_by_evaluate(setup, tmp_path, capsys):
    """Two files damaged after ingest (one train, one val row): extraction stores NaN and valid=False for them
    (never the features of a stand-in image), evaluate leaves them out and says how many."""
    import pyarrow.parquet as pq

    from cratescale.embeddings.extract import run_extraction
    from cratescale.evaluation.report import evaluate_store

    root, manifest = setup
    rows = pq.read_table(manifest).to_pylist()
    bad = [next(i for i, r in enumerate(rows) if r["split"] == s) for s in ("train", "val")]
    for i in bad:
        copy = tmp_path / f"{i}.tar"
        data = bytearray(Path(rows[i]["path"]).read_bytes())
        data[rows[i]["offset"]:rows[i]["offset"] + rows[i]["size"]] = b"\0" * rows[i]["size"]
        copy.write_bytes(bytes(data))
        rows[i]["path"] = str(copy)
    damaged = tmp_path / "manifest.parquet"
    pq.write_table(pq.read_table(manifest).from_pylist(rows, schema=pq.read_schema(manifest)), damaged)
    store_dir, records = run_extraction(root / "export", damaged, tmp_path / "store", features=("cls",), layers=(),
                                        dtype="float32", actors=0, image_size=None, ray_address=None, split=None,
                                        num_cpus_per_actor=1, num_gpus_per_actor=0, amp=None, threads_per_actor=None,
                                        **OPTS)
    assert sum(r["invalid"] for r in records) == 2
    store = EmbeddingStore(store_dir)
    meta = store.metadata()
    assert meta.loc[~meta.valid, "row"].tolist() == bad  # all rows: store row == manifest row
    cls = store.read("cls")
    assert np.isnan(cls[bad]).all() and not np.isnan(np.delete(cls, bad, axis=0)).any()
    results = evaluate_store(store_dir, features=("cls",), probe=False)
    assert results["cls/knn"]["left_out"] == {"train": 1, "val": 1}
    assert (results["cls/knn"]["n_train"], results["cls/knn"]["n_test"]) == (31, 7)
    assert "left out 1 train and 1 val rows whose image could not be decoded" in capsys.readouterr().out

