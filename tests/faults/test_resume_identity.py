"""Resume keyed on content, with the real trainer (2 ranks, DeepSpeed on gloo): a dataset moved with its root
resumes (and a longer schedule with it, with a note), changed samples are refused with one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cratescale.config import dump_job, load_job, load_profile
from cratescale.launch.run import resolve
from cratescale.launch.stages import ingest_stage
from data_pipeline.manifest import manifest_info
from data_pipeline.synthetic import parse_spec, render
from tests.faults.conftest import TINY_JOB
from tests.unit.test_manifest_identity import SHAPES, image_folder

pytestmark = pytest.mark.dist


def _prepare(tmp_path: Path, source: Path, root: Path, overrides: list[str]) -> tuple[Path, Path]:
    """What the launcher does before pretrain: resolve, ingest stage, config into the run dir."""
    job, paths = resolve(load_job(TINY_JOB, [f"run_dir={tmp_path / 'run'}", f"data.source={source}",
                                             f"data.root={root}", "data.ingest_workers=0", "logging.progress=false",
                                             "checkpoint.every_steps=1", *overrides]))
    ingest_stage(job, paths, load_profile("local"))
    dump_job(job, paths.config)
    return paths.config, paths.manifest


def _last_line(job, rank: int) -> str:
    return [line for line in job.output(rank).splitlines() if line.strip()][-1]


def test_moved_dataset_resumes_longer_schedule_noted_changed_samples_refused(tmp_path, rank_server):
    image_folder(tmp_path / "a" / "src", n=64)
    config, manifest = _prepare(tmp_path, tmp_path / "a" / "src", tmp_path / "a" / "root", ["schedule.steps=2"])
    job = rank_server.start(config, manifest, 2)
    assert job.wait() == [0, 0], job.output(0)
    fingerprint = manifest_info(manifest).fingerprint

    # The dataset and its root move; the job names the new places and trains longer (2 -> 4 steps).
    shutil.move(tmp_path / "a", tmp_path / "b")
    config, manifest = _prepare(tmp_path, tmp_path / "b" / "src", tmp_path / "b" / "root", ["schedule.steps=4"])
    assert manifest_info(manifest).source == str(tmp_path / "b" / "src")  # rebuilt from the new source
    assert manifest_info(manifest).fingerprint == fingerprint
    job = rank_server.start(config, manifest, 2)
    assert job.wait() == [0, 0], job.output(0)
    assert job.result(0) == {"status": "completed", "step": 4, "rank": 0}
    note = "[cratescale] schedule: the checkpoint at step 2 was trained toward 2 steps (warmup 2), this job runs 4 " \
           "(warmup 2): the learning-rate schedule was recomputed for the new length"
    assert note in job.output(0)
    starts = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"start"' in line]
    assert (starts[-1]["resumed"], starts[-1]["step"], starts[-1]["schedule_note"]) == (True, 2, note[13:])

    # The same files but one sample's bytes changed: another content fingerprint, the resume is refused.
    shutil.copytree(tmp_path / "b" / "src", tmp_path / "c" / "src")
    next((tmp_path / "c" / "src").rglob("0005.jpg")).write_bytes(render(500, parse_spec(SHAPES))[0])
    config, manifest = _prepare(tmp_path, tmp_path / "c" / "src", tmp_path / "c" / "root", ["schedule.steps=6"])
    job = rank_server.start(config, manifest, 2)
    assert job.wait() == [1, 1]
    for rank in (0, 1):
        last = _last_line(job, rank)
        assert last.startswith("cratescale.engine.state.ResumeError: ") and "the samples differ: the checkpoint " \
            f"was trained on a manifest with content fingerprint {fingerprint}, this job's manifest has " \
            f"{manifest_info(manifest).fingerprint}" in last, last
