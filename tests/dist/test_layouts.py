"""Every reader of a checkpoint's files against DeepSpeed's real layouts: ZeRO 0/1/2/3 x fp32/bf16 (issue 12).

One spawn of 2 real DeepSpeed ranks (gloo) trains the tiny MLP of ds_tiny under each stage and precision and
commits steps 1, 2 and 3 through CheckpointStore (keep_last=1, keep_every=2: retention deletes step 1). Then, per
layout: the file-name reader (checkpoint/layout.py), consolidation (the fp32 master weights, equal to DeepSpeed's
own zero_to_fp32), universal conversion (its fp32 copies are those master weights), retention, verify and the
catalog.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist import ds_tiny
from cratescale.checkpoint import CheckpointStore
from cratescale.checkpoint.export import ExportError, consolidate
from cratescale.checkpoint.layout import ds_layout
from cratescale.checkpoint.universal import UniversalConversionError, ensure_universal
from cratescale.engine.state import save_state

pytestmark = pytest.mark.dist
LAYOUTS = [(stage, precision) for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")]


def _store(out: Path, stage: int, precision: str) -> CheckpointStore:
    return CheckpointStore(out / f"z{stage}_{precision}", keep_last=1, keep_every=2)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    ds_tiny.init_dist(rank, world, port)
    for stage, precision in LAYOUTS:
        engine = ds_tiny.make_engine(stage, world, bf16=precision == "bf16")
        for step in (1, 2, 3):
            ds_tiny.train_step(engine, step, rank, world)
            save_state(engine, _store(Path(out), stage, precision), step, {"world_size": world}, rank)
        if rank == 0:  # the module weights as the engine holds them (bf16 under bf16; ZeRO-3 gathers)
            torch.save(ds_tiny.full_weights(engine), Path(out) / f"z{stage}_{precision}_module.pt")
        else:
            ds_tiny.full_weights(engine)  # collective under ZeRO-3
    ds_tiny.finish()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layouts")
    ds_tiny.spawn(_worker, out)
    return out


@pytest.mark.parametrize("stage, precision", LAYOUTS)
def test_layout_is_read_from_the_files(runs: Path, stage: int, precision: str) -> None:
    layout = ds_layout(_store(runs, stage, precision).latest().path / "ds")
    assert (layout.partitioned, layout.zero3) == (stage > 0, stage == 3)
    assert layout.precision == (precision if stage else None)
    assert layout.ranks == (2 if stage else 1)


@pytest.mark.parametrize("stage, precision", LAYOUTS)
def test_consolidation_is_the_fp32_master_weights(runs: Path, stage: int, precision: str) -> None:
    commit = _store(runs, stage, precision).latest()
    module = torch.load(runs / f"z{stage}_{precision}_module.pt")
    if stage == 0 and precision == "bf16":
        with pytest.raises(ExportError, match="no ZeRO optimizer partitions with the fp32 master weights"):
            consolidate(commit)
        return
    found = consolidate(commit)
    assert (found.precision, found.zero_stages) == (precision, {0: "0", 3: "3"}.get(stage, "1-2"))
    assert found.state_dict.keys() == module.keys()
    if stage:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        reference = get_fp32_state_dict_from_zero_checkpoint(str(commit.path), tag="ds")
        for name, tensor in reference.items():
            assert found.state_dict[name].dtype == torch.float32 and torch.equal(found.state_dict[name], tensor)
    for name, tensor in found.state_dict.items():
        # bf16: the module holds the master weights rounded to bf16 (and they are not already bf16 values)
        assert torch.equal(tensor.bfloat16().float() if precision == "bf16" else tensor, module[name]), name
    if precision == "bf16":
        assert any(not torch.equal(t, t.bfloat16().float()) for t in found.state_dict.values())


@pytest.mark.parametrize("stage, precision", LAYOUTS)
def test_universal_conversion_carries_the_master_weights(runs: Path, stage: int, precision: str) -> None:
    commit = _store(runs, stage, precision).latest()
    if stage == 0:
        with pytest.raises(UniversalConversionError, match="ZeRO-0"):
            ensure_universal(commit)
        return
    tag_dir = ensure_universal(commit)
    master = consolidate(commit).state_dict
    for name, tensor in master.items():
        saved = torch.load(tag_dir / "zero" / name / "fp32.pt", weights_only=False)
        converted = saved["param"] if isinstance(saved, dict) else saved  # ZeRO-3's converter saves the bare tensor
        assert torch.equal(converted.reshape(tensor.shape), tensor), name


@pytest.mark.parametrize("stage, precision", LAYOUTS)
def test_retention_verify_and_catalog_see_every_file(runs: Path, stage: int, precision: str) -> None:
    store = _store(runs, stage, precision)
    assert [c.step for c in store.commits()] == [2, 3]  # step 1 deleted by retention, 2 kept as every 2nd
    for commit in store.commits():
        store.verify(commit)
        on_disk = {str(p.relative_to(commit.path)): p.stat().st_size for p in commit.path.rglob("*")
                   if p.is_file() and p.name != "COMMITTED"}
        assert set(commit.files) == set(on_disk), "COMMITTED does not list every file of the layout"
        assert any(name.startswith("ds/") and "optim_states" in name for name in on_disk) == (stage > 0)
        assert any(name.startswith("ds/bf16_") for name in on_disk) == (stage > 0 and precision == "bf16")
    rows = {r["step"]: r for r in store.catalog().to_pylist()}
    assert {s: r["present"] for s, r in rows.items()} == {1: False, 2: True, 3: True}
    for commit in store.commits():
        assert rows[commit.step]["bytes"] == commit.bytes == sum(f["size"] for f in commit.files.values())
        assert rows[commit.step]["num_files"] == len(commit.files)
