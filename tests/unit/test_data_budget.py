"""The bad-data budget's rules on a real loader's BadSamples (one process; the 2-rank sum is in tests/faults),
and the decoder check on resume."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cratescale.checkpoint import CheckpointStore
from cratescale.engine.data_budget import BadDataBudget, BadDataError
from cratescale.engine.state import ResumeError, check_decoder
from data_pipeline.feed import DECODE_ERROR, NO_REPLACEMENT, READ_ERROR
from data_pipeline.ingest import ingest
from data_pipeline.loader import BadSamples, make_train_loader
from data_pipeline.manifest_index import ManifestArrays
from data_pipeline.sampler import LoaderState

B = 16


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return ingest("synthetic://shapes?n=64&classes=4&size=32&seed=1", tmp_path_factory.mktemp("budget"),
                  workers=0, progress=False)


def _steps(budget: BadDataBudget, bad: BadSamples, per_step: list[int], code: int = READ_ERROR) -> None:
    for n in per_step:
        bad.record(np.array([code] * n + [0] * (B - n)), np.array([3] * n + [-1] * (B - n)))
        budget.check(bad)


def test_sparse_bad_samples_train_on(manifest):
    budget, bad = BadDataBudget(0.01, 10, B), BadSamples(ManifestArrays(manifest, None))
    _steps(budget, bad, [1] + [0] * 99 + [1] + [0] * 99)  # one bad sample in the first step is no stop
    assert budget.total == 2 and budget.steps == 200


def test_fraction_over_the_samples_seen_stops(manifest):
    budget, bad = BadDataBudget(0.01, 10, B), BadSamples(ManifestArrays(manifest, None))
    _steps(budget, bad, [0] * 20)
    with pytest.raises(BadDataError) as e:
        _steps(budget, bad, [1] * 20)
    assert budget.steps == 24  # 4 of 384 seen: over 1% (3 of 368 was not)
    path, offset, _ = ManifestArrays(manifest, None).location(3)
    first = f"{path}@{offset} (read error)"
    assert str(e.value) == (f"bad data: 4 of 384 samples failed (1.04%), over data.max_bad_fraction=0.01; "
                            f"first: {first}, {first}, {first}, {first}")


def test_mostly_unreadable_window_stops_within_a_few_steps(manifest):
    budget, bad = BadDataBudget(0.5, 4, B), BadSamples(ManifestArrays(manifest, None))
    _steps(budget, bad, [0] * 50)
    with pytest.raises(BadDataError, match=r"^bad data: 36 of the last 4 steps' 64 samples failed "
                                           r"\(mostly unreadable\); first: .*\(decode error\)"):
        _steps(budget, bad, [12] * 10, code=DECODE_ERROR)
    assert budget.steps == 53


def test_no_replacement_stops_at_once(manifest):
    budget, bad = BadDataBudget(1.0, 10, B), BadSamples(ManifestArrays(manifest, None))
    with pytest.raises(BadDataError, match=r"^bad data: 1 sample\(s\) found no decodable replacement \(1 of 16 "
                                           r"samples failed\); first: .* \(read error, no decodable replacement\)"):
        _steps(budget, bad, [1], code=READ_ERROR | NO_REPLACEMENT)


def test_loader_marks_a_sample_without_replacement(manifest, tmp_path):
    """Every file of the dataset unreadable (truncated shard): no replacement exists, the sample is marked."""
    data = tmp_path / "data"
    shutil.copytree(Path(manifest).parent, data)
    m = data / "manifest.parquet"
    table = pq.read_table(m)
    shards = {p.replace(str(Path(manifest).parent), str(data)) for p in table["path"].to_pylist()}
    pq.write_table(table.set_column(1, "path", [[p.replace(str(Path(manifest).parent), str(data))
                                                 for p in table["path"].to_pylist()]]), m)
    for shard in shards:
        open(shard, "r+b").truncate(0)
    with make_train_loader(m, state=LoaderState(0, 0, 0), rank=0, world_size=1, global_batch=B, micro_batch=B,
                           image_size=32, num_patches=16, kind="pil") as ld:
        next(ld)
        assert ld.bad.count == B and ld.bad.lost == B
        assert all(e.endswith("(read error, no decodable replacement)") for e in ld.bad.examples)
        assert len(ld.bad.examples) == BadSamples.KEEP and ld.bad.examples[0].split("@")[0] in shards


def test_resume_under_another_decoder(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    store.begin(2)
    (store.tmp_path(2) / "x").write_text("x")
    store.commit(2, {"step": 2, "decoder": "DALI 2.4.0 cpu"})
    commit = store.latest()
    pil = "PIL 13.0.0 libjpeg-turbo 3.2.0"
    assert check_decoder(commit, "DALI 2.4.0 cpu", "data.loader=dali", False) is None
    with pytest.raises(ResumeError, match=r"its samples were decoded by DALI 2.4.0 cpu, this job decodes with "
                                          r"PIL 13.0.0 libjpeg-turbo 3.2.0 \(data.loader=pil\).*"
                                          r"checkpoint.allow_decoder_change=true"):
        check_decoder(commit, pil, "data.loader=pil", False)
    assert check_decoder(commit, pil, "data.loader=pil", True) == "DALI 2.4.0 cpu"
    assert check_decoder(None, pil, "data.loader=pil", False) is None
