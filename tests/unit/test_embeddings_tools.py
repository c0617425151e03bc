"""The store's tools for other people and programs: `index` (FAISS, exact or IVF-PQ, refused when stale),
`neighbours` (by row and by image, with labels and a picture) and `export` (npy / Parquet), through the CLI on a
store extracted the way the demo's are (synthetic shapes, crate_mae_debug, in-process extraction)."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cratescale.checkpoint.export import export_weights
from cratescale.embeddings.__main__ import main
from cratescale.embeddings.extract import extract
from cratescale.embeddings.index import NeighbourIndex, build_index
from cratescale.embeddings.neighbours import Samples
from cratescale.embeddings.store import EmbeddingStore, StoreError, StoreInfo
from cratescale.models import create_model

REPO = Path(__file__).resolve().parents[2]
N = 40


def _cli(*args: str, child: bool = False) -> subprocess.CompletedProcess:
    """The CLI's exit code, stdout and stderr: in this process (one torch import for the file), or as its own
    process where what a person sees (no traceback) is the point."""
    argv = [str(a) for a in args]
    if child:
        return subprocess.run([sys.executable, "-m", "cratescale.embeddings", *argv], cwd=REPO, text=True,
                              capture_output=True, timeout=120,
                              env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as usage:  # argparse
            code = usage.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def _one_error_line(done: subprocess.CompletedProcess, code: int = 2) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> Path:
    from data_pipeline.ingest import ingest

    root = tmp_path_factory.mktemp("tools")
    manifest = ingest(f"synthetic://shapes?n={N}&classes=4&size=32&seed=0", root / "data", workers=0,
                      val_per_class=2, progress=False)
    torch.manual_seed(0)
    model = create_model("crate_mae_debug")
    export = export_weights(model.state_dict(), model.config, {"step": 3, "run_name": "test"}, root / "export")
    extract(export, manifest, root / "store", actors=0, shard_rows=16, chunk_rows=8, batch_size=16,
            loader_kind="pil", dtype="float32")
    return root / "store"


@pytest.fixture
def store_copy(demo_store, tmp_path) -> Path:
    return Path(shutil.copytree(demo_store, tmp_path / "store"))


def _exact(store: EmbeddingStore, feature: str, row: int) -> np.ndarray:
    """Every row by cosine distance to `row`, nearest first (brute force in numpy)."""
    x = store.read(feature).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.argsort(1.0 - x @ x[row], kind="stable")


def test_index_and_neighbours_by_row(store_copy, tmp_path):
    done = _cli("index", store_copy, "--feature", "mean", child=True)
    assert done.returncode == 0, done.stderr
    assert "flat (exact search: 40 rows <= 2,000,000)" in done.stdout
    meta = json.loads((store_copy / "index" / "mean.json").read_text())
    assert (meta["feature"], meta["kind"], meta["rows"], meta["left_out"]) == ("mean", "flat", N, 0)
    assert meta["metric"].startswith("cosine") and len(meta["store_fingerprint"]) == 64
    out = tmp_path / "n.png"
    done = _cli("neighbours", store_copy, "--row", 5, "-k", 4, "--feature", "mean", "--out", out)
    assert done.returncode == 0, done.stderr
    table = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"], ["4"])]
    store = EmbeddingStore(store_copy)
    want = [r for r in _exact(store, "mean", 5) if r != 5][:4]
    assert [int(t[1]) for t in table] == want  # the exact order, the query row itself left out
    labels = store.metadata().set_index("row").label
    assert [int(t[3]) for t in table] == [int(labels[r]) for r in want]
    manifest = pd.read_parquet(store.info.source["manifest"]).set_index("label").class_name
    assert [t[4] for t in table] == [manifest[labels[r]].iloc[0] for r in want]  # the manifest's class names
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.width > 3 * picture.height > 0


def test_neighbours_by_image_finds_its_own_row(store_copy, tmp_path):
    build_index(EmbeddingStore(store_copy), "cls")
    samples = Samples(EmbeddingStore(store_copy))
    row = 11
    Image.fromarray(samples.image(row)).save(tmp_path / "q.png")  # lossless: the same pixels as stored
    done = _cli("neighbours", store_copy, "--image", tmp_path / "q.png", "-k", 3)
    assert done.returncode == 0, done.stderr
    first = next(line.split() for line in done.stdout.splitlines() if line.split()[:1] == ["1"])
    assert int(first[1]) == row and float(first[5]) < 1e-4, done.stdout


def test_a_stale_index_is_refused(store_copy):
    store = EmbeddingStore(store_copy)
    build_index(store, "cls")
    assert NeighbourIndex(store, "cls").search(store.read("cls", np.array([0])), 1)[1][0, 0] == 0
    start, stop = store.info.shard_range(1)  # a shard extracted again after the index was built (a committed
    rows = store.metadata().iloc[start:stop].drop(columns="row")  # shard is never rewritten in place: uncommit it)
    (store_copy / "commits" / "shard_000001.json").unlink()
    feats = {name: np.random.default_rng(1).standard_normal((stop - start, d)) for name, d in store.info.dims.items()}
    store.write_shard(1, feats, rows)
    line = _one_error_line(_cli("neighbours", store_copy, "--row", 0, child=True))
    assert "cls.faiss: built from an older state of" in line and "rebuild it with" in line
    assert _cli("index", store_copy).returncode == 0
    assert _cli("neighbours", store_copy, "--row", 0).returncode == 0


def test_bad_requests_are_one_line(store_copy, tmp_path):
    assert "no index of feature 'cls'" in _one_error_line(_cli("neighbours", store_copy, "--row", 0))
    assert "no feature 'nope'" in _one_error_line(_cli("index", store_copy, "--feature", "nope"))
    assert _cli("index", store_copy).returncode == 0
    assert "--row 999 is outside [0, 40)" in _one_error_line(_cli("neighbours", store_copy, "--row", 999))
    not_image = _cli("neighbours", store_copy, "--image", store_copy / "store.json")
    assert "not a readable image" in _one_error_line(not_image)
    assert "must be a positive integer" in _cli("neighbours", store_copy, "--row", 1, "-k", 0).stderr
    assert _cli("neighbours", store_copy).returncode == 2  # neither --row nor --image
    assert "not an embedding store" in _one_error_line(_cli("export", tmp_path, tmp_path / "o", "--format", "npy"))


def _clustered_store(root: Path, rows: int = 3000, d: int = 16) -> EmbeddingStore:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, d))
    info = StoreInfo(num_rows=rows, dims={"cls": d}, dtype="float32", shard_rows=512, chunk_rows=128)
    store = EmbeddingStore.create(root, info)
    for k in range(info.num_shards - 1):  # the last shard stays uncommitted: its rows are left out
        a, b = info.shard_range(k)
        x = centres[rng.integers(0, 30, b - a)] + 0.5 * rng.standard_normal((b - a, d))
        meta = pd.DataFrame({"sample_id": np.arange(a, b), "key": [f"s{i}" for i in range(a, b)],
                             "label": np.arange(a, b) % 3, "split": "train", "valid": np.arange(a, b) != 7})
        x[np.arange(a, b) == 7] = np.nan  # an image that did not decode
        store.write_shard(k, {"cls": x}, meta)
    return store


def test_ivfpq_reranked_finds_the_exact_neighbours(tmp_path):
    store = _clustered_store(tmp_path / "s")
    meta = build_index(store, "cls", kind="ivfpq")
    indexed = 5 * 512 - 1
    assert (meta["kind"], meta["rows"], meta["left_out"]) == ("ivfpq", indexed, 3000 - indexed)
    assert meta["m"] == 4 and meta["nlist"] == 64
    index = NeighbourIndex(store, "cls")
    x = store.read("cls", slice(0, 5 * 512)).astype(np.float64)
    ok = ~np.isnan(x).any(axis=1)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    queries = np.flatnonzero(ok)[::25]
    dist, rows = index.search(x[queries].astype(np.float32), 10)
    recall = []
    for q, got in zip(queries, rows):
        exact = np.argsort(np.where(ok, 1.0 - x @ x[q], np.inf), kind="stable")[:10]
        recall.append(len(set(got) & set(exact)) / 10)
    assert np.mean(recall) >= 0.9 and 7 not in rows
    assert np.all(np.diff(dist, axis=1) >= 0)
    with pytest.raises(StoreError, match="older state"):
        store.write_shard(5, {"cls": np.zeros((3000 - 5 * 512, 16))},
                          pd.DataFrame({"sample_id": range(440), "key": "k", "label": 0, "split": "train"}))
        NeighbourIndex(store, "cls")


def test_export_npy_and_parquet(tmp_path):
    store = _clustered_store(tmp_path / "s")
    done = _cli("export", store.root, tmp_path / "npy", "--format", "npy")
    assert done.returncode == 0, done.stderr
    assert "2,559 rows (npy); 441 rows without features left out" in done.stdout
    meta = store.metadata()
    kept = meta.loc[meta.valid].sort_values("row")
    feats = np.load(tmp_path / "npy" / "cls.npy")
    assert feats.dtype == np.float32 and feats.shape == (2559, 16)
    assert np.array_equal(feats, store.read("cls", kept.row.to_numpy()))
    assert np.array_equal(np.load(tmp_path / "npy" / "row.npy"), kept.row.to_numpy())
    assert np.array_equal(np.load(tmp_path / "npy" / "label.npy"), kept.label.to_numpy())
    assert (tmp_path / "npy" / "key.txt").read_text().splitlines() == kept.key.tolist()
    assert _cli("export", store.root, tmp_path / "pq", "--format", "parquet").returncode == 0
    table = pq.read_table(tmp_path / "pq" / "embeddings.parquet")
    assert table.column_names == ["sample_id", "key", "label", "split", "row", "cls"]
    assert np.array_equal(np.stack(table.column("cls").to_numpy(zero_copy_only=False)), feats)
    assert table.column("sample_id").to_pylist() == kept.sample_id.tolist()
    assert "already exists" in _one_error_line(_cli("export", store.root, tmp_path / "pq", "--format", "npy"))
    assert _cli("export", store.root, tmp_path / "x", "--format", "csv").returncode == 2


def test_a_store_without_its_manifest_still_answers(store_copy, tmp_path):
    info = json.loads((store_copy / "store.json").read_text())
    info["source"]["manifest"] = str(tmp_path / "moved" / "manifest.parquet")
    (store_copy / "store.json").write_text(json.dumps(info))
    assert _cli("index", store_copy).returncode == 0
    done = _cli("neighbours", store_copy, "--row", 2, "-k", 3, "--out", tmp_path / "n.png")
    assert done.returncode == 0, done.stderr
    table = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"])]
    assert len(table) == 3 and all(t[4] == t[3] for t in table)  # label numbers stand in for class names
    assert (tmp_path / "n.png").stat().st_size > 0


def test_the_index_benchmark_runs_small(tmp_path):
    out = tmp_path / "index.json"
    done = subprocess.run([sys.executable, "bench/index.py", "--rows", "3000", "--dim", "16", "--queries", "20",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["flat", "ivfpq"] and all(r["rows"] == 3000 for r in rows)
    assert rows[1]["recall_at_10"] >= 0.9 and all(r["peak_rss_mb"] >= r["rss_before_build_mb"] > 0 for r in rows)


def _flip_a_byte(store: Path, feature: str, shard: int, at: int) -> None:
    """Damage one byte of a committed shard's file on disk (at >= 0: in the chunk data, < 0: in the shard index)."""
    path = next((store / "features.zarr" / feature / "c" / str(shard)).iterdir())
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("at", [24, -10], ids=["chunk-data", "shard-index"])
def test_verify_names_a_damaged_chunk_and_evaluate_refuses_it(store_copy, demo_store, at):
    """A flipped byte in a committed shard: `info` no longer says all is well once checksums are read, `verify`
    exits 1 naming the shard, evaluation stops with one line naming the shard and the rerun (before: a flip in the
    data was evaluated silently, one in the index a 100-line zarr traceback), `--drop-damaged` uncommits it and the
    next extraction makes the store byte-identical to the undamaged one."""
    from cratescale.embeddings.store import StoreDamagedError
    from cratescale.evaluation.protocol import evaluate_store

    _flip_a_byte(store_copy, "cls", 1, at)
    assert _cli("info", store_copy).returncode == 0  # the files are all there; checksums are not read by default
    info = _cli("info", store_copy, "--verify")
    assert info.returncode == 1 and "damaged   shard 1: feature 'cls'" in info.stdout, info.stdout
    done = _cli("verify", store_copy, child=True)
    assert "rerun     python -m cratescale.embeddings verify" in _one_error_line(done, code=1)
    assert "damaged   shard 1 (rows 16-31): feature 'cls'" in done.stdout, done.stdout
    assert "verified  2/3 committed shards intact; 0 not committed" in done.stdout
    with pytest.raises(StoreDamagedError, match=r"damaged shard\(s\) 1: shard 1: feature 'cls'.*rerun: python -m "
                                                r"cratescale.embeddings verify .* --drop-damaged"):
        evaluate_store(store_copy, features=("cls",), probe=False)
    dropped = _cli("verify", store_copy, "--drop-damaged")
    assert "dropped   shard(s) 1: uncommitted" in dropped.stdout
    assert "missing   1 (not committed" in _cli("info", store_copy).stdout
    meta = json.loads((store_copy / "store.json").read_text())["source"]
    extract(demo_store.parent / "export", meta["manifest"], store_copy, actors=0, shard_rows=16,
            chunk_rows=8, batch_size=16, loader_kind="pil", dtype="float32")
    assert _cli("verify", store_copy).returncode == 0
    files = {p.relative_to(store_copy): p.read_bytes() for p in store_copy.rglob("*") if p.is_file()}
    assert files == {p.relative_to(demo_store): p.read_bytes() for p in demo_store.rglob("*") if p.is_file()}
