"""Ingest of every source kind into a Parquet manifest, with rejects, reruns and re-sharding."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline.ingest import IngestError, ingest, main, run_ingest
from data_pipeline.reader import ByteReader
from tests.unit.data_fixtures import (IMAGENET_TAR, add_tar_member, bad_files, build_tar_of_tars, build_wds_shards,
                                      cifar_subset_tgz, imagenet_folder, imagenet_members)


def _rows(manifest: Path) -> list[dict]:
    return pq.read_table(manifest).to_pylist()


def _reasons(out: Path) -> dict[str, str]:
    return {(Path(r["path"]).name + ("|" + r["member"] if r["member"] else "")): r["reason"]
            for r in pq.read_table(out / "rejected.parquet").to_pylist()}


def _check_bytes(rows: list[dict], originals: dict[str, bytes] | None = None) -> None:
    """Every row's (path, offset, size) reads back a decodable image of the recorded size."""
    reader = ByteReader()
    for r in rows:
        data = reader.read(r["path"], r["offset"], r["size"])
        assert len(data) == r["size"]
        assert Image.open(io.BytesIO(data)).size == (r["width"], r["height"])
        if originals is not None:
            assert data == originals[r["key"]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = imagenet_folder(tmp_path_factory.mktemp("in") / "tree", n=50)
    bad_dir = root / "n09999999"
    bad_dir.mkdir()
    good = (root / "n01440764" / "n01440764_tench.JPEG").read_bytes()
    for name, data in bad_files(good).items():
        (bad_dir / name).write_bytes(data)
    outside = root.parent / "outside.jpg"
    outside.write_bytes(good)
    os.symlink(outside, bad_dir / "escape.jpg")
    os.symlink(root / "n01440764" / "n01440764_tench.JPEG", bad_dir / "inside_link.jpg")
    return root


def test_folder_ingest_lists_rejects_and_numbers_stably(folder, tmp_path):
    res = run_ingest(str(folder), tmp_path, workers=0, progress=False)
    rows = _rows(res.manifest)
    reasons = _reasons(tmp_path)
    assert res.samples == len(rows) == 52 + 1  # 50 + 2 greyscale photos + the in-tree symlink
    assert reasons["zero.jpg"] == "zero-byte file"
    assert reasons["truncated.jpg"].startswith("decode failed")
    assert reasons["random.jpg"].startswith("not a decodable image")
    assert reasons["notes.txt"].startswith("not a decodable image")
    assert reasons["png_named.jpg"].startswith("not JPEG content (PNG)")
    assert reasons["bomb.jpg"].startswith("decompression bomb")
    assert reasons["escape.jpg"].startswith("symlink points outside the tree")
    assert len(reasons) == 7
    assert [r["sample_id"] for r in rows] == list(range(len(rows)))
    order = [(r["class_name"], r["key"]) for r in rows]
    assert order == sorted(order)
    classes = sorted({r["class_name"] for r in rows})
    assert all(r["label"] == classes.index(r["class_name"]) for r in rows)
    assert all(r["offset"] == -1 and r["split"] == "train" for r in rows)
    _check_bytes(rows)


def test_rerun_through_ray_writes_identical_bytes(folder, tmp_path, ray_session):
    first = ingest(str(folder), tmp_path, workers=2, progress=False, val_per_class=1)
    before = first.read_bytes(), (tmp_path / "rejected.parquet").read_bytes()
    second = ingest(str(folder), tmp_path, workers=0, progress=False, val_per_class=1)
    assert (second.read_bytes(), (tmp_path / "rejected.parquet").read_bytes()) == before
    rows = _rows(second)
    assert sum(r["split"] == "val" for r in rows) == len({r["class_name"] for r in rows})
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_imagenet_tar_direct_offsets(tmp_path):
    res = run_ingest(str(IMAGENET_TAR), tmp_path, workers=0, progress=False)
    rows = _rows(res.manifest)
    assert res.samples == 1000 and res.classes == 1000 and res.rejected_count == 0
    assert all(r["class_name"].startswith("n") and len(r["class_name"]) == 9 for r in rows)
    assert all(r["path"] == str(IMAGENET_TAR) and r["offset"] > 0 for r in rows)
    with tarfile.open(IMAGENET_TAR) as tf:
        for r in rows[::97]:
            assert tf.extractfile(r["key"]).read() == ByteReader().read(r["path"], r["offset"], r["size"])
    assert sum(min(r["width"], r["height"]) < 224 for r in rows) > 0


def test_tar_with_unsafe_members(tmp_path):
    good = imagenet_members(3, with_greyscale=False)
    src = tmp_path / "src.tar"
    with tarfile.open(src, "w") as tf:
        for name, data in good:
            add_tar_member(tf, name, data)
        add_tar_member(tf, "imagenet-sample/../../evil.jpg", good[0][1])
        add_tar_member(tf, "/abs/n01/abs.jpg", good[0][1])
        link = tarfile.TarInfo("imagenet-sample/n01/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../../etc/passwd"
        tf.addfile(link)
    res = run_ingest(str(src), tmp_path / "out", workers=0, progress=False)
    reasons = {r["member"]: r["reason"] for r in pq.read_table(res.rejected).to_pylist()}
    assert res.samples == 3
    assert "'..'" in reasons["imagenet-sample/../../evil.jpg"]
    assert "absolute" in reasons["/abs/n01/abs.jpg"]
    assert "symlink" in reasons["imagenet-sample/n01/link.jpg"]


def test_truncated_archive_keeps_what_it_can(tmp_path):
    src = tmp_path / "src.tar"
    with tarfile.open(src, "w") as tf:
        for name, data in imagenet_members(8, with_greyscale=False):
            add_tar_member(tf, name, data)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) * 3 // 5])
    res = run_ingest(str(src), tmp_path / "out", workers=0, progress=False)
    assert 0 < res.samples < 8
    reasons = [r["reason"] for r in pq.read_table(res.rejected).to_pylist()]
    assert any(r.startswith("damaged archive") for r in reasons)
    _check_bytes(_rows(res.manifest))


def test_tar_of_tars_absolute_offsets(tmp_path):
    members = imagenet_members(12, with_greyscale=False)
    members.append(("imagenet-sample/n01440764/broken.JPEG", members[0][1][:5000]))
    outer = build_tar_of_tars(members, tmp_path / "fall11.tar")
    res = run_ingest(str(outer), tmp_path / "out", workers=0, progress=False)
    rows = _rows(res.manifest)
    assert res.source_kind == "tar_of_tars" and res.samples == 12
    originals = {f"{Path(n).parent.name}/{Path(n).name}": d for n, d in members}
    assert all(r["path"] == str(outer) for r in rows)
    _check_bytes(rows, originals)  # inner offsets are absolute offsets into the outer file
    reasons = {r["member"]: r["reason"] for r in pq.read_table(res.rejected).to_pylist()}
    assert reasons["n01440764.tar:broken.JPEG"].startswith("decode failed")


def test_directory_of_class_tars(tmp_path):
    members = imagenet_members(6, with_greyscale=False)
    outer = build_tar_of_tars(members, tmp_path / "outer.tar")
    inner_dir = tmp_path / "synsets"
    inner_dir.mkdir()
    with tarfile.open(outer) as tf:
        for m in tf:
            (inner_dir / m.name).write_bytes(tf.extractfile(m).read())
    res = run_ingest(str(inner_dir), tmp_path / "out", workers=0, progress=False)
    assert res.source_kind == "class_tars" and res.samples == 6
    assert {r["class_name"] for r in _rows(res.manifest)} == {Path(n).parent.name for n, _ in members}


def test_webdataset_shards_dir_and_glob(tmp_path):
    members = imagenet_members(10, with_greyscale=False)
    shards = build_wds_shards(members, tmp_path / "wds", per_shard=4)
    with tarfile.open(shards[-1], "a") as tf:  # a sample with no label and a corrupt one
        add_tar_member(tf, "nolabel.jpg", members[0][1])
        add_tar_member(tf, "corrupt.jpg", members[0][1][:3000])
        add_tar_member(tf, "corrupt.cls", b"3")
    for source in (str(tmp_path / "wds"), str(tmp_path / "wds" / "shard-*.tar")):
        res = run_ingest(source, tmp_path / "out", workers=0, progress=False)
        rows = _rows(res.manifest)
        assert res.source_kind == "webdataset" and res.samples == 10
        classes = sorted({Path(n).parent.name for n, _ in members})
        by_key = {f"{i:06d}": classes.index(Path(n).parent.name) for i, (n, _) in enumerate(members)}
        assert all(int(r["class_name"]) == by_key[r["key"]] == r["label"] for r in rows)
        reasons = {r["member"]: r["reason"] for r in pq.read_table(res.rejected).to_pylist()}
        assert "without .cls" in reasons["nolabel.jpg"] and reasons["corrupt.jpg"].startswith("decode failed")
        _check_bytes(rows)


def test_compressed_tar_is_repacked_into_shards(tmp_path):
    tgz, originals = cifar_subset_tgz(tmp_path / "cifar.tgz", per_class=6)
    out = tmp_path / "out"
    res = run_ingest(str(tgz), out, workers=0, shard_size=16, progress=False)
    rows = _rows(res.manifest)
    assert res.samples == 60 and res.classes == 10
    assert all(Path(r["path"]).parent == out / "shards" and r["offset"] >= 0 for r in rows)
    _check_bytes(rows, originals)
    reasons = {r["member"]: r["reason"] for r in pq.read_table(res.rejected).to_pylist()}
    assert "'..'" in reasons["../evil/escape.jpg"] and "symlink" in reasons["train/cat/link.jpg"]
    assert reasons["train/cat/picture.png.jpg"].startswith("not JPEG content")
    shards = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    assert len(shards) == 4  # 63 streamed members in units of 16
    manifest = res.manifest.read_bytes()
    run_ingest(str(tgz), out, workers=0, shard_size=16, progress=False)
    assert res.manifest.read_bytes() == manifest
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == shards


def test_reshard_reencodes_and_accepts_png(folder, tmp_path):
    res = run_ingest(str(folder), tmp_path, workers=0, reshard=48, shard_size=16, progress=False)
    rows = _rows(res.manifest)
    assert res.samples == 53 + 1  # the PNG is re-encoded now
    assert "png_named.jpg" not in _reasons(tmp_path)
    reader = ByteReader()
    for r in rows:
        img = Image.open(io.BytesIO(reader.read(r["path"], r["offset"], r["size"])))
        assert img.format == "JPEG" and img.mode == "RGB"
        assert min(img.size) == min(48, min(r["width"], r["height"])) and img.size == (r["width"], r["height"])
    assert len(list((tmp_path / "shards").glob("*.tar"))) >= 4
    shard_bytes = sorted(p.read_bytes() for p in (tmp_path / "shards").glob("*.tar"))
    run_ingest(str(folder), tmp_path, workers=0, reshard=48, shard_size=16, progress=False)
    assert sorted(p.read_bytes() for p in (tmp_path / "shards").glob("*.tar")) == shard_bytes


def test_synthetic_shapes_are_learnable(tmp_path):
    from sklearn.linear_model import RidgeClassifier

    res = run_ingest("synthetic://shapes?n=600&classes=10&size=32&seed=1", tmp_path, workers=0,
                     shard_size=256, progress=False)
    rows = _rows(res.manifest)
    assert res.samples == 600 and res.classes == 10 and len(list((tmp_path / "shards").glob("*.tar"))) == 3
    reader = ByteReader()
    x = np.stack([np.asarray(Image.open(io.BytesIO(reader.read(r["path"], r["offset"], r["size"])))
                  .resize((16, 16)), dtype=np.float32).ravel() / 255 for r in rows])
    y = np.array([r["label"] for r in rows])
    idx = np.random.default_rng(0).permutation(len(rows))
    tr, te = idx[:400], idx[400:]
    acc = RidgeClassifier(alpha=1.0).fit(x[tr], y[tr]).score(x[te], y[te])
    assert acc > 0.25, acc  # a linear probe on raw pixels; chance is 0.10


def test_cli_main(tmp_path, capsys):
    assert main([str(IMAGENET_TAR), str(tmp_path), "--workers", "0", "--no-progress"]) == 0
    assert "ingested 1000 samples in 1000 classes" in capsys.readouterr().out
    assert main([str(tmp_path / "missing"), str(tmp_path / "o"), "--workers", "0"]) == 2
    assert "not found" in capsys.readouterr().err


def test_source_with_no_good_images_fails_clearly(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.jpg").write_bytes(b"")
    with pytest.raises(IngestError, match="no decodable images"):
        ingest(str(tmp_path / "src"), tmp_path / "out", workers=0, progress=False)
    assert (tmp_path / "out" / "rejected.parquet").exists() and not (tmp_path / "out" / "manifest.parquet").exists()
    (tmp_path / "empty").mkdir()  # nothing to list at all (the listing once divided its jobs by zero)
    with pytest.raises(IngestError, match="no decodable images"):
        ingest(str(tmp_path / "empty"), tmp_path / "out2", workers=0, progress=False)
