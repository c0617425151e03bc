"""Embedding store: concurrent shard writers, resume, byte-identical after SIGKILL, plain-library reading."""
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

from cratescale.embeddings.store import EmbeddingStore, StoreError, StoreInfo

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
N, SHARD, CHUNK = 300, 64, 16          # 5 shards, the last one partial (44 rows)
DIMS = {"cls": 12, "mean": 12, "layer_1_cls": 8}

# A stand-alone writer: deterministic features per shard (seeded by the shard index), optionally slow.
WRITER = r"""
import sys, time, numpy as np, pandas as pd
from cratescale.embeddings.store import EmbeddingStore
root, shards, delay = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], float(sys.argv[3])
s = EmbeddingStore(root)
done = s.committed()
for k in shards:
    if k in done:
        continue
    start, stop = s.info.shard_range(k)
    rng = np.random.default_rng(k)
    feats = {name: rng.standard_normal((stop - start, d)) for name, d in sorted(s.info.dims.items())}
    ids = np.arange(start, stop)
    meta = pd.DataFrame({"sample_id": ids, "key": [f"img{i}" for i in ids], "label": ids % 7,
                         "split": "train"})
    s.write_shard(k, feats, meta)
    time.sleep(delay)
"""


def _info(**kw) -> StoreInfo:
    return StoreInfo(num_rows=N, dims=dict(DIMS), dtype="float16", shard_rows=SHARD, chunk_rows=CHUNK,
                     source={"manifest": "synthetic", "fingerprint": "abc"}, provenance={"step": 7}, **kw)


def _run_writer(root: Path, shards: list[int], delay: float = 0.0, wait: bool = True):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [PY, "-c", WRITER, str(root), ",".join(map(str, shards)), str(delay)]
    p = subprocess.Popen(args, env=env, cwd=REPO, stderr=subprocess.PIPE)
    if wait:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    return p


def _expected(k: int) -> dict[str, np.ndarray]:
    start, stop = _info().shard_range(k)
    rng = np.random.default_rng(k)
    return {name: rng.standard_normal((stop - start, d)) for name, d in sorted(DIMS.items())}


def _zarr_files(root: Path) -> dict[str, bytes]:
    base = root / "features.zarr"
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def test_two_processes_write_different_shards(tmp_path):
    store = EmbeddingStore.create(tmp_path / "s", _info())
    assert store.missing() == [0, 1, 2, 3, 4]
    p1 = _run_writer(store.root, [0, 2, 4], wait=False)
    p2 = _run_writer(store.root, [1, 3], wait=False)
    for p in (p1, p2):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert store.is_complete() and store.verify() == []
    for k in range(5):
        start, stop = store.info.shard_range(k)
        for name, want in _expected(k).items():
            np.testing.assert_array_equal(store.read(name, slice(start, stop)), want.astype(np.float16))
    meta = store.metadata()
    assert meta.row.tolist() == list(range(N)) and meta.sample_id.tolist() == list(range(N))
    assert (meta.label == meta.sample_id % 7).all()


def test_rerun_skips_committed_shards(tmp_path):
    store = EmbeddingStore.create(tmp_path / "s", _info())
    _run_writer(store.root, [0, 1])
    marker_times = {k: store.marker_path(k).stat().st_mtime_ns for k in (0, 1)}
    shard0 = store._shard_dir("cls", 0) / "0"
    shard0_time = shard0.stat().st_mtime_ns
    time.sleep(0.05)
    _run_writer(store.root, [0, 1, 2, 3, 4])
    assert {k: store.marker_path(k).stat().st_mtime_ns for k in (0, 1)} == marker_times
    assert shard0.stat().st_mtime_ns == shard0_time
    assert store.is_complete()


def test_killed_writer_then_rerun_is_byte_identical(tmp_path):
    ref = EmbeddingStore.create(tmp_path / "ref", _info())
    _run_writer(ref.root, list(range(5)))

    store = EmbeddingStore.create(tmp_path / "killed", _info())
    p = _run_writer(store.root, list(range(5)), delay=30.0, wait=False)
    deadline = time.time() + 60
    while not store.committed() and time.time() < deadline:   # kill after the first commit, mid-run
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    assert 1 <= len(store.committed()) < 5
    # Plant what a kill inside a shard write can leave: a zarr tmp file, a stale whole shard file and a
    # metadata file without a marker (for shard 3, which was never committed).
    d = store._shard_dir("cls", 3)
    d.mkdir(parents=True, exist_ok=True)
    (d / "0.deadbeef.partial").write_bytes(b"\x00" * 100)
    (store._shard_dir("mean", 3)).mkdir(parents=True, exist_ok=True)
    (store._shard_dir("mean", 3) / "0").write_bytes((ref._shard_dir("mean", 0) / "0").read_bytes())
    store.metadata_path(3).write_bytes(b"garbage")
    assert 3 not in store.committed()

    _run_writer(store.root, list(range(5)))
    assert store.is_complete()
    assert _zarr_files(store.root) == _zarr_files(ref.root)
    for k in range(5):
        assert store.metadata_path(k).read_bytes() == ref.metadata_path(k).read_bytes()
        assert json.loads(store.marker_path(k).read_text()) == json.loads(ref.marker_path(k).read_text())


def test_opens_with_plain_libraries(tmp_path):
    store = EmbeddingStore.create(tmp_path / "s", _info())
    _run_writer(store.root, list(range(5)))
    code = f"""
import json, sys, numpy as np, pandas as pd, pyarrow.dataset as pads, xarray as xr, zarr
root = {str(store.root)!r}
info = json.load(open(root + "/store.json"))
g = zarr.open_group(root + "/features.zarr", mode="r")
cls = g["cls"][:]
meta = pd.read_parquet(root + "/metadata")
table = pads.dataset(root + "/metadata", format="parquet").to_table()
ds = xr.open_zarr(root + "/features.zarr", consolidated=False)
assert "cratescale" not in sys.modules
assert cls.shape == (info["num_rows"], info["dims"]["cls"]) and cls.dtype == np.float16
assert table.num_rows == len(meta) == info["num_rows"]
assert sorted(ds.data_vars) == sorted(info["dims"]), list(ds.data_vars)
assert ds["cls"].dims == ("row", "cls_dim")
np.testing.assert_array_equal(ds["layer_1_cls"].values, g["layer_1_cls"][:])
np.save(root + "/cls_check.npy", ds["cls"].values.astype("float32"))
"""
    r = subprocess.run([PY, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = np.load(store.root / "cls_check.npy")
    want = np.concatenate([_expected(k)["cls"] for k in range(5)]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_info_cli_reports_coverage_and_missing(tmp_path):
    store = EmbeddingStore.create(tmp_path / "s", _info())
    _run_writer(store.root, [0, 1, 4])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([PY, "-m", "cratescale.embeddings", "info", str(store.root)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "rows      300" in r.stdout
    assert "cls=12" in r.stdout and "layer_1_cls=8" in r.stdout
    assert "3/5 shards committed" in r.stdout
    assert "missing   2-3" in r.stdout
    r = subprocess.run([PY, "-m", "cratescale.embeddings", "info", str(tmp_path / "nope")], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not an embedding store" in r.stderr


def test_mismatch_and_bad_input_are_refused(tmp_path):
    store = EmbeddingStore.create(tmp_path / "s", _info())
    with pytest.raises(StoreError, match="dims"):
        EmbeddingStore.create(store.root, StoreInfo(num_rows=N, dims={"cls": 5}, shard_rows=SHARD,
                                                    chunk_rows=CHUNK))
    with pytest.raises(StoreError, match="another manifest"):
        EmbeddingStore.create(store.root, StoreInfo(num_rows=N, dims=dict(DIMS), shard_rows=SHARD,
                                                    chunk_rows=CHUNK, source={"fingerprint": "zzz"}))
    with pytest.raises(StoreError, match="multiple of"):
        EmbeddingStore.create(tmp_path / "t", StoreInfo(num_rows=N, dims=dict(DIMS), shard_rows=50,
                                                        chunk_rows=16))
    meta = pd.DataFrame({"sample_id": range(64), "key": "k", "label": 0, "split": "train"})
    with pytest.raises(StoreError, match="shape"):
        store.write_shard(0, {"cls": np.zeros((63, 12)), "mean": np.zeros((64, 12)),
                              "layer_1_cls": np.zeros((64, 8))}, meta)
    assert store.missing() == [0, 1, 2, 3, 4]
    # A corrupted committed shard is caught by verify().
    store.write_shard(0, {n: np.ones((64, d)) for n, d in DIMS.items()}, meta)
    store.group["cls"][0:64] = np.zeros((64, 12))
    assert store.verify() == [0]
