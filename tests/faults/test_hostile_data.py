"""Hostile data at ingest and at train time: every bad file is rejected or handled with a recorded reason,
nothing crashes, nothing is read or written outside the dataset root; a sample damaged after ingest is
replaced deterministically and counted inside the real 2-rank trainer.

chmod 000 is no barrier to root (these tests run as root): such a file is then simply read and accepted, and
a FIFO named .jpg stands in for "a file that cannot be read" (rejected as not a regular file).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.faults.conftest import REPO, TINY_JOB

IS_ROOT = os.geteuid() == 0


def _jpeg(size=(40, 30), mode="RGB", seed=0, exif_orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "CMYK": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
    buf = io.BytesIO()
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _other(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 18), (10, 200, 10)).save(buf, format=fmt)
    return buf.getvalue()


def _bomb() -> bytes:
    data = bytearray(_jpeg((16, 16)))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = (65000).to_bytes(2, "big") + (65000).to_bytes(2, "big")  # 4.2 gigapixels declared
    return bytes(data)


# name -> (bytes, expected reason prefix, or None when the file must be accepted)
HOSTILE = {
    "zero.jpg": (b"", "zero-byte file"),
    "truncated.jpg": (_jpeg((64, 48))[:2000], "decode failed"),        # header intact, scan data cut
    "random.jpg": (np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes(), "not a decodable image"),
    "png.jpg": (_other("PNG"), "not JPEG content (PNG)"),
    "gif.jpg": (_other("GIF"), "not JPEG content (GIF)"),
    "webp.jpg": (_other("WEBP"), "not JPEG content (WEBP)"),
    "bomb.jpg": (_bomb(), "decompression bomb"),
    "cmyk.jpg": (_jpeg(mode="CMYK", seed=2), None),
    "grey.jpg": (_jpeg(mode="L", seed=3), None),
    "exif_rotated.jpg": (_jpeg((40, 30), seed=4, exif_orientation=6), None),
    "one_pixel.jpg": (_jpeg((1, 1), seed=5), None),
}


def _snapshot(root: Path, skip: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if skip not in p.parents and p != skip}


@pytest.fixture
def hostile_tree(tmp_path) -> Path:
    src = tmp_path / "src"
    for i in range(6):
        (src / "good").mkdir(parents=True, exist_ok=True)
        (src / "good" / f"g{i}.jpg").write_bytes(_jpeg(seed=10 + i))
    bad = src / "bad"
    bad.mkdir()
    for name, (data, _) in HOSTILE.items():
        (bad / name).write_bytes(data)
    (bad / "noperm.jpg").write_bytes(_jpeg(seed=6))
    os.chmod(bad / "noperm.jpg", 0)
    os.mkfifo(bad / "fifo.jpg")                                   # reading it would block forever
    (tmp_path / "outside.jpg").write_bytes(_jpeg(seed=7))
    (tmp_path / "outside_dir").mkdir()
    (tmp_path / "outside_dir" / "o.jpg").write_bytes(_jpeg(seed=8))
    os.symlink(tmp_path / "outside.jpg", bad / "escape.jpg")      # a file link out of the tree
    os.symlink("../../outside.jpg", bad / "escape_relative.jpg")
    os.symlink(tmp_path / "outside_dir", bad / "escape_dir")      # a directory link out of the tree
    os.symlink(bad / "missing.jpg", bad / "dangling.jpg")
    (src / "root_file.jpg").write_bytes(_jpeg(seed=9))            # no class folder
    return src


def _ingest_cli(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline.ingest", str(src), str(out), "--workers", "0",
                           "--no-progress", *extra], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def _reasons(out: Path) -> dict[str, str]:
    return {Path(r["path"]).name + (f"|{r['member']}" if r["member"] else ""): r["reason"]
            for r in pq.read_table(out / "rejected.parquet").to_pylist()}


def test_hostile_folder_at_ingest(hostile_tree, tmp_path):
    before = _snapshot(tmp_path, tmp_path / "out")
    res = _ingest_cli(hostile_tree, tmp_path / "out")
    assert res.returncode == 0, res.stderr[-3000:]
    reasons = _reasons(tmp_path / "out")
    for name, (_, why) in HOSTILE.items():
        if why is not None:
            assert reasons[name].startswith(why), (name, reasons.get(name))
    assert reasons["fifo.jpg"] == "not a regular file"
    assert reasons["escape.jpg"].startswith("symlink points outside the tree")
    assert reasons["escape_relative.jpg"].startswith("symlink points outside the tree")
    assert reasons["escape_dir"] == "symlinked directory not followed"
    assert reasons["dangling.jpg"].startswith("symlink points outside the tree") or reasons["dangling.jpg"] == \
        "broken symlink"
    assert reasons["root_file.jpg"].startswith("no class folder")
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    accepted = {Path(r["path"]).name for r in rows}
    want = {f"g{i}.jpg" for i in range(6)} | {n for n, (_, why) in HOSTILE.items() if why is None}
    # root reads a chmod-000 file anyway (accepted); anyone else gets it rejected as unreadable.
    if IS_ROOT:
        want.add("noperm.jpg")
    else:
        assert reasons["noperm.jpg"].startswith("unreadable")
    assert accepted == want
    assert len(reasons) + len(rows) == len(HOSTILE) + 6 + 7  # every file has a verdict
    real_src = os.path.realpath(hostile_tree)
    assert all(os.path.realpath(r["path"]).startswith(real_src + os.sep) for r in rows), "a row escapes the root"
    exif = next(r for r in rows if r["path"].endswith("exif_rotated.jpg"))
    assert (exif["width"], exif["height"]) == (40, 30)  # stored bytes as they are; orientation applied on reshard
    assert _snapshot(tmp_path, tmp_path / "out") == before, "ingest wrote outside its output directory"
    # Re-encoded (--reshard): PNG/GIF/WebP become JPEGs, CMYK/grey become RGB, EXIF orientation is applied.
    res = _ingest_cli(hostile_tree, tmp_path / "out2", "--reshard", "16", "--shard-size", "8")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["key"].split("/")[-1]: r for r in pq.read_table(tmp_path / "out2" / "manifest.parquet").to_pylist()}
    assert {"png.jpg", "gif.jpg", "webp.jpg", "cmyk.jpg", "grey.jpg"} <= set(rows)
    assert (rows["exif_rotated.jpg"]["width"], rows["exif_rotated.jpg"]["height"]) == (16, 21)  # 30x40 upright
    assert (rows["one_pixel.jpg"]["width"], rows["one_pixel.jpg"]["height"]) == (1, 1)
    for r in rows.values():
        with open(r["path"], "rb") as f:
            f.seek(r["offset"])
            img = Image.open(io.BytesIO(f.read(r["size"])))
        assert img.format == "JPEG" and img.mode == "RGB"
        assert Path(r["path"]).parent == tmp_path / "out2" / "shards"


def test_hostile_tar_members_never_escape(tmp_path):
    good = _jpeg(seed=20)
    src = tmp_path / "src.tar.gz"
    with tarfile.open(src, "w:gz") as tf:
        def add(name: str, data: bytes = good, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for i in range(3):
            add(f"train/ok/{i}.jpg", _jpeg(seed=30 + i))
        add("../evil.jpg")
        add("train/ok/../../../evil2.jpg")
        add("/tmp/abs_evil.jpg")
        add("train/ok/link.jpg", kind=tarfile.SYMTYPE, link="../../../../etc/passwd")
        add("train/ok/hard.jpg", kind=tarfile.LNKTYPE, link="train/ok/0.jpg")
        add("train/ok/fifo.jpg", kind=tarfile.FIFOTYPE)
        add("train/ok/bomb.jpg", _bomb())
    before = _snapshot(tmp_path, tmp_path / "out")
    res = _ingest_cli(src, tmp_path / "out", "--shard-size", "4")
    assert res.returncode == 0, res.stderr[-3000:]
    reasons = {r["member"]: r["reason"] for r in pq.read_table(tmp_path / "out" / "rejected.parquet").to_pylist()}
    assert "'..'" in reasons["../evil.jpg"] and "'..'" in reasons["train/ok/../../../evil2.jpg"]
    assert "absolute" in reasons["/tmp/abs_evil.jpg"]
    assert "symlink" in reasons["train/ok/link.jpg"] and "hard link" in reasons["train/ok/hard.jpg"]
    assert reasons["train/ok/fifo.jpg"] == "not a regular file"
    assert reasons["train/ok/bomb.jpg"].startswith("decompression bomb")
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert len(rows) == 3 and all(Path(r["path"]).parent == tmp_path / "out" / "shards" for r in rows)
    assert _snapshot(tmp_path, tmp_path / "out") == before
    assert not Path("/tmp/abs_evil.jpg").exists() and not (tmp_path.parent / "evil.jpg").exists()


# ---- train time ------------------------------------------------------------------------------------------
@pytest.fixture
def folder_manifest(tmp_path, fault_manifest) -> Path:
    """64 synthetic JPEGs as plain files (class/<key>.jpg), ingested: rows point at files we can damage."""
    from data_pipeline.ingest import ingest
    from data_pipeline.reader import ByteReader

    reader = ByteReader()
    for r in pq.read_table(fault_manifest).to_pylist()[:64]:
        path = tmp_path / "src" / r["class_name"] / f"{r['sample_id']:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(reader.read(r["path"], r["offset"], r["size"]))
    return Path(ingest(str(tmp_path / "src"), tmp_path / "data", workers=0, progress=False))


def _damage(manifest: Path) -> tuple[list[int], list[int]]:
    """Damage five files after ingest, in rank 0's and rank 1's slices of epoch 0 (tiny.yaml: seed 3, B 16)."""
    from data_pipeline.sampler import GlobalSampler

    rows = pq.read_table(manifest).to_pylist()
    perm = GlobalSampler(len(rows), 3, 16).permutation(0)
    rank0 = [int(perm[g * 16 + 1]) for g in range(3)] + [int(perm[3 * 16 + 5])]
    rank1 = [int(perm[1 * 16 + 8 + 2])]
    kinds = {rank0[0]: "garbage", rank0[1]: "truncate", rank0[2]: "scramble", rank0[3]: "delete", rank1[0]: "png"}
    for row, kind in kinds.items():
        path = Path(rows[row]["path"])
        data = bytearray(path.read_bytes())
        if kind == "garbage":      # same size, no JPEG markers
            path.write_bytes(np.random.default_rng(row).integers(0, 256, len(data), dtype=np.uint8).tobytes())
        elif kind == "truncate":
            path.write_bytes(bytes(data[: len(data) // 2]))
        elif kind == "scramble":   # same size, SOI and EOI intact: passes the cheap check, the decoder fails
            third = len(data) // 3
            data[third:2 * third] = np.random.default_rng(row).integers(0, 256, third, dtype=np.uint8).tobytes()
            path.write_bytes(bytes(data))
        elif kind == "delete":
            path.unlink()
        else:
            path.write_bytes(_other("PNG"))
    return rank0, rank1


def _train(server, manifest: Path, run_dir: Path):
    from tests.dist.harness import final_weights, write_config

    # tiny.yaml's DALI: the "scramble" JPEG passes the byte check and ends DALI's pipeline (nvImageCodec failure);
    # the backend finds it, replaces it as PIL would and rebuilds the pipeline (dali_loader.DaliBackend._run).
    config = write_config(TINY_JOB, run_dir, ["schedule.steps=4", "logging.every_steps=1",
                                              "checkpoint.every_steps=100"])
    job = server.start(config, manifest, 2)
    codes = job.wait()
    assert codes == [0, 0], f"{codes}\n{job.output(0)}\n{job.output(1)}"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logs = {r: (run_dir / "samples" / f"rank{r}.jsonl").read_text() for r in (0, 1)}
    return metrics, logs, final_weights(run_dir)[1]


@pytest.mark.dist
def test_damaged_after_ingest_is_replaced_in_the_real_trainer(folder_manifest, tmp_path, rank_server):
    from tests.dist.harness import assert_same_tree

    rank0, rank1 = _damage(folder_manifest)
    metrics, logs, weights = _train(rank_server, folder_manifest, tmp_path / "a")
    train = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    # Summed over ranks: rank 0's loader replaced its 4 damaged samples (one per step), rank 1's its 1 at step 2.
    assert [m["bad_samples"] for m in train] == [1, 3, 4, 5]
    assert all(np.isfinite(m["loss"]) for m in train)
    consumed = [i for r in (0, 1) for line in logs[r].splitlines() for i in json.loads(line)["ids"]]
    assert len(consumed) == 64 and not set(consumed) & set(rank0 + rank1)  # replaced, never fed
    # Deterministic: the same damage gives the same replacements and bitwise the same weights.
    _, logs_b, weights_b = _train(rank_server, folder_manifest, tmp_path / "b")
    assert logs_b == logs
    assert_same_tree(weights, weights_b)
