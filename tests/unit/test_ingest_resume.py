"""Ingest that resumes (a real SIGKILL half-way, then a rerun: the same bytes) and a folder listed in parallel."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.ingest import run_ingest
from data_pipeline.ingest_units import JOURNAL_DIR, Journal
from data_pipeline.listing import list_folder, ray_map
from data_pipeline.manifest import source_id
from data_pipeline.sources import plan_source
from data_pipeline.work import IngestOptions, process_unit
from tests.unit.data_fixtures import bad_files, cifar_subset_tgz, imagenet_members

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """240 ImageNet photos in 6 class folders."""
    root = tmp_path_factory.mktemp("resume") / "tree"
    for i, (name, data) in enumerate(imagenet_members(240, with_greyscale=False)):
        path = root / f"c{i % 6}" / Path(name).name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file under `out` (manifest, rejects, shards) by relative path; the manifest's shared index is left
    out (its folder is named after the manifest file's mtime, see manifest_index.index_key)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not str(p.relative_to(out)).startswith("manifest.index/")}


def _committed(out: Path) -> list[Path]:
    return [p for p in (out / JOURNAL_DIR).glob("*/*.parquet") if not p.name.startswith(".")]


def _kill_half_way(source: Path, out: Path, *args: str) -> int:
    """Run the ingest CLI (inline) in a subprocess and SIGKILL it once a third of its units are committed;
    returns how many were committed by then."""
    cmd = [sys.executable, "-m", "data_pipeline.ingest", str(source), str(out), "--workers", "0", "--no-progress",
           *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    units = 30 if "--reshard" in args else 15  # 240 photos: 8 per shard, or 16 per listed chunk (_auto_chunk)
    try:
        while len(_committed(out)) < units // 3 and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the ingest ended before the kill: {err.decode()[-500:]}"
    done = len(_committed(out))
    assert 0 < done < units
    return done


@pytest.mark.parametrize("args", [(), ("--reshard", "32", "--shard-size", "8")], ids=["check-only", "reshard"])
def test_killed_ingest_resumes_to_the_same_bytes(photos, tmp_path, ray_session, args):
    out = tmp_path / "out"
    reshard = {"reshard": 32, "shard_size": 8} if args else {}
    whole = run_ingest(str(photos), out, workers=2, progress=False, val_per_class=1, **reshard)
    expected = _outputs(out)
    assert whole.resumed == 0 and sum(k.startswith("shards/") for k in expected) == (30 if args else 0)
    shutil.rmtree(out)

    done = _kill_half_way(photos, out, "--val-per-class", "1", *args)
    res = run_ingest(str(photos), out, workers=0, progress=False, val_per_class=1, **reshard)
    assert (res.resumed, res.units) == (done, whole.units)
    assert res.hosts["resumed"] == done and f"resumed: {done} of {whole.units} units already done" in res.summary()
    assert _outputs(out) == expected  # manifest, rejects and every shard: byte for byte; no journal, no tmp file


def test_other_settings_do_not_reuse_the_journal(photos, tmp_path):
    out = tmp_path / "out"
    _kill_half_way(photos, out, "--max-pixels", "50000000")
    old = {p.parent for p in _committed(out)}
    res = run_ingest(str(photos), out, workers=0, progress=False)  # the default max_pixels: another journal
    assert res.resumed == 0 and res.units == 15
    assert not (out / JOURNAL_DIR).exists() and not any(p.exists() for p in old)


def test_compressed_stream_skips_committed_units(tmp_path):
    """The stream is read again; the units committed before are not processed again."""
    tgz, _ = cifar_subset_tgz(tmp_path / "c.tgz", per_class=4)
    out = tmp_path / "out"
    run_ingest(str(tgz), out, workers=0, progress=False, shard_size=8)
    expected = _outputs(out)
    shutil.rmtree(out)
    # the first half of the units, committed as the driver commits them; then the process "dies"
    opts = IngestOptions(str(out.absolute()), None, 8)
    journal = Journal(source_id(str(tgz)), opts)
    units = list(journal.pending(plan_source(str(tgz), None, 8).stream, lambda u, r: None))
    for unit in units[:len(units) // 2]:
        journal.commit(unit, process_unit(unit, opts))
    journal.flush()
    res = run_ingest(str(tgz), out, workers=0, progress=False, shard_size=8)
    assert (res.resumed, res.units) == (len(units) // 2, len(units)) and len(units) >= 4
    assert _outputs(out) == expected


def _walk_listing(root: Path) -> tuple[list[str], list[dict]]:
    """The serial os.walk listing the folder source had before it went parallel (the oracle)."""
    real_root, files, rejects = os.path.realpath(root), [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        rejects += [{"path": os.path.join(dirpath, d), "member": "", "reason": "symlinked directory not followed"}
                    for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            why = None
            if os.path.islink(full):
                target = os.path.realpath(full)
                if not (target + os.sep).startswith(real_root + os.sep) or target == real_root:
                    why = f"symlink points outside the tree ({os.readlink(full)})"
                elif not os.path.isfile(target):
                    why = "broken symlink"
            elif not os.path.isfile(full):
                why = "not a regular file"
            if why is None and "/" not in rel:
                why = "no class folder: file at the root"
            if why:
                rejects.append({"path": full, "member": "", "reason": why})
            else:
                files.append(rel)
    return sorted(files), rejects


def test_parallel_listing_equals_the_serial_walk(photos, tmp_path, ray_session):
    root = tmp_path / "hostile"
    shutil.copytree(photos, root)
    good = next((root / "c0").iterdir()).read_bytes()
    for cls in ("a", "a-b", "a.b", "z"):  # "a-b/x" sorts before "a/x": per-directory order is not the global one
        (root / cls / "deep" / "er").mkdir(parents=True)
        (root / cls / "x.jpg").write_bytes(good)
        (root / cls / "deep" / "er" / "y.jpg").write_bytes(good)
    for name, data in bad_files(good).items():
        (root / "a" / name).write_bytes(data)
    (root / "at_root.jpg").write_bytes(good)
    os.mkfifo(root / "a" / "fifo.jpg")
    os.symlink("/etc", root / "a" / "dir_out")
    os.symlink("../../../..", root / "z" / "deep" / "rel_dir_out")
    os.symlink(root / "c1", root / "linked_class")
    os.symlink("/etc/hostname", root / "z" / "abs_out.jpg")
    os.symlink("../../outside.jpg", root / "z" / "rel_out.jpg")
    os.symlink(root / "a" / "gone.jpg", root / "z" / "dangling.jpg")
    os.symlink(root / "a" / "x.jpg", root / "z" / "inside.jpg")
    os.symlink(root / "a" / "x.jpg", root / "root_link.jpg")

    serial = list_folder(str(root))
    parallel = list_folder(str(root), ray_map(ray_session))
    assert parallel == serial == _walk_listing(root)
    reasons = {Path(r["path"]).name: r["reason"] for r in serial[1]}
    assert reasons["fifo.jpg"] == "not a regular file" and reasons["dangling.jpg"] == "broken symlink"
    assert reasons["dir_out"] == reasons["rel_dir_out"] == reasons["linked_class"] == "symlinked directory not followed"
    assert reasons["abs_out.jpg"].startswith("symlink points outside") and "z/inside.jpg" in serial[0]
    assert len(serial[0]) == 240 + 8 + len(bad_files(good)) + 1
