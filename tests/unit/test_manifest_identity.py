"""A manifest records its source, its directory and a content fingerprint; the ingest stage rebuilds a manifest
of another source, rebases one moved with its root, and never trains from a stale one; ingest runs one task per
CPU of the Ray cluster by default."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cratescale.config import ConfigError, load_job, load_profile
from cratescale.launch.run import preflight, resolve
from cratescale.launch.stages import ingest_stage
from data_pipeline.ingest import run_ingest
from data_pipeline.manifest import manifest_action, manifest_info, read_manifest
from data_pipeline.synthetic import parse_spec, render

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "dist" / "tiny.yaml"
SHAPES = "synthetic://shapes?n=24&classes=3&size=32&seed=2"


def image_folder(dest: Path, n: int = 18, first: int = 0) -> Path:
    """An ImageFolder source (dest/<class>/<i>.jpg) of synthetic shapes: a dataset that can be moved."""
    spec = parse_spec(SHAPES)
    for i in range(n):
        data, name = render(first + i, spec)
        (dest / name).mkdir(parents=True, exist_ok=True)
        (dest / name / f"{i:04d}.jpg").write_bytes(data)
    return dest


def test_fingerprint_follows_the_samples_not_their_paths(tmp_path):
    src = image_folder(tmp_path / "src")
    first = run_ingest(str(src), tmp_path / "out_a", workers=0, progress=False).manifest
    info = manifest_info(first)
    assert (info.source, info.root) == (str(src), str(tmp_path / "out_a")) and len(info.fingerprint) == 16
    moved = tmp_path / "elsewhere" / "src"
    shutil.move(src, moved)
    again = run_ingest(str(moved), tmp_path / "out_b", workers=0, progress=False).manifest
    assert manifest_info(again).fingerprint == info.fingerprint  # same samples, other paths
    assert read_manifest(again)["path"].to_pylist() != read_manifest(first)["path"].to_pylist()
    one = next(moved.rglob("0003.jpg"))
    one.write_bytes(render(99, parse_spec(SHAPES))[0])  # one sample's bytes change, same name and class
    changed = run_ingest(str(moved), tmp_path / "out_c", workers=0, progress=False).manifest
    assert manifest_info(changed).fingerprint != info.fingerprint


def _job(tmp_path: Path, source: str, root: Path, stages: str = "[ingest,pretrain]"):
    job = load_job(TINY, [f"run_dir={tmp_path / 'run'}", f"data.source={source}", f"data.root={root}",
                          f"stages={stages}", "data.ingest_workers=0", "logging.progress=false"])
    return resolve(job)


def test_ingest_stage_rebuilds_another_source_rebases_a_moved_root(tmp_path):
    other = SHAPES.replace("n=24", "n=30")
    profile = load_profile("local")
    job, paths = _job(tmp_path, SHAPES, tmp_path / "root")
    ingest_stage(job, paths, profile)
    built = paths.manifest.stat()
    ingest_stage(job, paths, profile)  # current: left as it is
    assert paths.manifest.stat().st_mtime_ns == built.st_mtime_ns

    job, paths = _job(tmp_path, other, tmp_path / "root")  # another dataset, the same data.root
    ingest_stage(job, paths, profile)
    assert manifest_info(paths.manifest).source == other and read_manifest(paths.manifest).num_rows == 30
    fingerprint = manifest_info(paths.manifest).fingerprint

    shutil.move(tmp_path / "root", tmp_path / "moved_root")  # the root (manifest + shards) moves
    job, paths = _job(tmp_path, other, tmp_path / "moved_root")
    assert manifest_action(paths.manifest, other, paths.data_root)[0] == "rebase"
    ingest_stage(job, paths, profile)
    rows = read_manifest(paths.manifest)["path"].to_pylist()
    assert all(p.startswith(str(tmp_path / "moved_root" / "shards")) and os.path.exists(p) for p in rows)
    assert manifest_info(paths.manifest).fingerprint == fingerprint
    assert manifest_action(paths.manifest, other, paths.data_root)[0] == "keep"

    # without the ingest stage, a manifest of another source is refused before anything starts
    job, paths = _job(tmp_path, SHAPES, tmp_path / "moved_root", stages="[pretrain]")
    with pytest.raises(ConfigError, match=r"data.root: .* was built from synthetic://shapes\?n=30.*, the job reads "
                                          r"synthetic://shapes\?n=24.*and the ingest stage is not in the job"):
        preflight(job, profile, paths, ["pretrain"])


def test_ingest_defaults_to_one_task_per_cpu_of_the_ray_cluster(tmp_path):
    """A Ray cluster of 5 CPUs (more than this machine has: Ray takes the number it is given) gets 5 in flight."""
    code = ("from data_pipeline.local_ray import start_or_join_ray; start_or_join_ray(num_cpus=5)\n"
            "from data_pipeline.ingest import run_ingest\n"
            f"res = run_ingest({SHAPES!r}, {str(tmp_path)!r}, shard_size=4, progress=False)\n"
            "print('workers', res.workers)\nprint(res.summary())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "workers 5\n" in out.stdout and "5 Ray tasks in flight" in out.stdout, out.stdout
