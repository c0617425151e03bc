"""The shared manifest index (data_pipeline/manifest_index.py): bitwise the rows, ids, labels and byte locations
that reading the Parquet manifest gives (folder and tar-shard manifests, train and val splits), the samples a rank
and a loader worker start from, a rebuild when the manifest changes, and one valid index from concurrent builders."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from data_pipeline.feed import SampleFeed
from data_pipeline.ingest import ingest, run_ingest
from data_pipeline.manifest import ManifestError, read_manifest, rebase_manifest, resplit_manifest, write_manifest
from data_pipeline.manifest_index import INDEX_DIR, ManifestArrays, ManifestIndex, build_index, count_split
from data_pipeline.sampler import GlobalSampler

from .data_fixtures import imagenet_members

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    """A folder manifest read in place and a re-sharded one (tar shards + byte offsets), both with a val split."""
    src = tmp_path_factory.mktemp("src")
    for i, (name, data) in enumerate(imagenet_members(40)):  # 4 classes of about 10 real photos
        (src / f"class{i % 4}").mkdir(exist_ok=True)
        (src / f"class{i % 4}" / Path(name).name).write_bytes(data)
    folder = ingest(str(src), tmp_path_factory.mktemp("folder"), workers=0, progress=False, val_per_class=1)
    tars = run_ingest(str(src), tmp_path_factory.mktemp("tars"), workers=0, reshard=48, shard_size=16,
                      val_per_class=1, progress=False).manifest
    return {"folder": folder, "tars": tars}


def parquet_view(path: Path, split: str | None) -> dict:
    """What the loaders read before the index, straight from the Parquet file (one Python object per row)."""
    t = read_manifest(path)
    splits = np.array(t["split"].to_pylist(), dtype=object)
    rows = np.arange(t.num_rows, dtype=np.int64) if split is None else np.nonzero(splits == split)[0].astype(np.int64)
    return {"rows": rows, "sample_id": t["sample_id"].to_numpy(), "label": t["label"].to_numpy().astype(np.int64),
            "offset": t["offset"].to_numpy(), "size": t["size"].to_numpy(), "width": t["width"].to_numpy(),
            "height": t["height"].to_numpy(), "path": t["path"].to_pylist()}


def assert_same(ma: ManifestArrays, want: dict) -> None:
    assert ma.total_rows == len(want["sample_id"])
    for name in ("rows", "sample_id", "label", "offset", "size", "width", "height"):
        have = np.asarray(getattr(ma, name))
        assert have.dtype == want[name].dtype and np.array_equal(have, want[name]), name
    assert [ma.location(r) for r in range(ma.total_rows)] == \
        [(p, int(o), int(s)) for p, o, s in zip(want["path"], want["offset"], want["size"])]


@pytest.mark.parametrize("kind", ["folder", "tars"])
@pytest.mark.parametrize("split", ["train", "val", None])
def test_index_gives_what_the_parquet_file_gives(manifests, kind, split):
    m = manifests[kind]
    want = parquet_view(m, split)
    assert len(want["rows"]) > 0
    assert_same(ManifestArrays(m, split), want)
    if kind == "tars":
        assert all(o >= 0 for o in want["offset"]) and len(set(want["path"])) < len(want["path"])
    if split is not None:
        assert count_split(m, split) == len(want["rows"])


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_a_rank_and_its_worker_start_from_the_sampler_s_rows(manifests, world_size):
    m, batch = manifests["tars"], 8
    want = parquet_view(m, "train")
    sampler = GlobalSampler(len(want["rows"]), 7, batch)
    for rank in range(world_size):
        feed = SampleFeed(str(m), mode="train", seed=7, global_batch=batch, rank=rank, world_size=world_size,
                          start_step=1, num_patches=4)
        worker = pickle.loads(pickle.dumps(feed))  # what a loader worker gets: no arrays, it maps the index itself
        assert worker._ma is None
        expect = want["rows"][sampler.rank_slice(0, 1, rank, world_size)]
        for f in (feed, worker):
            rows = [f.row(j) for j in range(batch // world_size)]
            assert rows == expect.tolist()
            assert [int(f.sample(j)["sample_id"]) for j in range(len(rows))] == want["sample_id"][expect].tolist()


def _index_dirs(m: Path) -> list[str]:
    return sorted(p.name for p in (m.parent / INDEX_DIR).iterdir())


def test_a_changed_manifest_gets_a_new_index(manifests, tmp_path):
    table = read_manifest(manifests["tars"])
    under_root = pc.replace_substring(table["path"], str(manifests["tars"].parent), str(tmp_path / "data"))
    table = table.set_column(table.schema.get_field_index("path"), "path", under_root)
    m = write_manifest(table, tmp_path / "data", source="x")
    first = _index_dirs(m)
    assert len(first) == 1
    relabelled = table.set_column(table.schema.get_field_index("label"), "label",
                                  pa.array((table["label"].to_numpy() + 1).astype(np.int32)))
    write_manifest(relabelled, tmp_path / "data", source="x")
    assert _index_dirs(m) != first and len(_index_dirs(m)) == 1  # the old index is gone
    assert_same(ManifestArrays(m, "train"), parquet_view(m, "train"))
    # Same content, other paths: the fingerprint stays, the index must not.
    rebase_manifest(m, tmp_path / "moved")
    moved = tmp_path / "moved" / m.name
    assert all(p.startswith(str(tmp_path / "moved")) for p, _, _ in
               (ManifestArrays(moved, None).location(r) for r in range(3)))
    assert_same(ManifestArrays(moved, None), parquet_view(moved, None))
    resplit_manifest(moved, 0)
    assert count_split(moved, "val") == 0 and len(ManifestArrays(moved, "val").rows) == 0
    assert len(ManifestArrays(moved, "train").rows) == table.num_rows


def test_a_manifest_without_an_index_gets_one_when_first_opened(manifests, tmp_path):
    m = tmp_path / "manifest.parquet"
    pq.write_table(read_manifest(manifests["folder"]), m)  # as an older ingest left it: no index beside it
    assert not (tmp_path / INDEX_DIR).exists()
    assert_same(ManifestArrays(m, "val"), parquet_view(m, "val"))
    assert len(_index_dirs(m)) == 1


def test_a_damaged_index_is_named(manifests, tmp_path):
    m = write_manifest(read_manifest(manifests["folder"]), tmp_path, source="x")
    folder = build_index(m)
    (folder / "records.npy").write_bytes(b"not numpy")
    with pytest.raises(ManifestError, match=f"manifest index {folder} is damaged"):
        ManifestIndex(m)


BUILDER = """
import json, sys, time
from data_pipeline.manifest_index import ManifestIndex
start = float(sys.argv[2])
while time.time() < start:
    pass
idx = ManifestIndex(sys.argv[1])
print(json.dumps({"folder": str(idx.folder), "ids": idx.sample_id[:].tolist(), "train": idx.split_rows("train")[:].tolist()}))
"""


def test_concurrent_builders_end_with_one_valid_index(manifests, tmp_path):
    m = tmp_path / "manifest.parquet"
    pq.write_table(pq.read_table(manifests["tars"]), m)  # same metadata (fingerprint), no index yet
    start = time.time() + 3.0  # both interpreters are up and waiting by then: they build at the same moment
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(m), str(start)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out))
    assert results[0] == results[1]
    assert _index_dirs(m) == [Path(results[0]["folder"]).name]  # no second copy, no leftover temp folder
    want = parquet_view(m, "train")
    assert results[0]["ids"] == want["sample_id"].tolist() and results[0]["train"] == want["rows"].tolist()
    assert_same(ManifestArrays(m, "train"), want)
