"""DeepSpeed ZeRO checkpoints through CheckpointStore, resumed at another world size via universal checkpoints.

Real DeepSpeed on CPU (gloo, torch.multiprocessing spawn). Three spawns, shared by the tests below:
  A: 2 ranks train a 2-layer MLP 3 steps under ZeRO-0/1/2/3 (torch AdamW), save through the store, then
     run a 4th step and record the weights (the reference for "the resumed run continues identically");
  B: 1 rank loads each via ensure_universal + load_universal, records weights/Adam state, runs step 4;
     it also trains + saves a ZeRO-2 run at world 1;
  C: 2 ranks load B's world-1 checkpoint (1 -> 2); both call ensure_universal at once (lock + rename).
A also reloads each commit into a fresh engine at the same world size (native load, bitwise).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist import ds_tiny
from cratescale.checkpoint import CheckpointStore
from cratescale.checkpoint.export import consolidate_fp32, export_weights, load_export
from cratescale.checkpoint.universal import ensure_universal, load_into_engine, universal_dir
from cratescale.engine.state import save_state

pytestmark = pytest.mark.dist
STAGES = (1, 2, 3)        # universal conversion needs ZeRO partitions
SAVE_STAGES = (0, *STAGES)
STEPS = 3


def _store(out: Path, stage: int, world: int) -> CheckpointStore:
    return CheckpointStore(out / f"z{stage}_w{world}", keep_last=2)


def _save(out: Path, rank: int, world: int, stage: int) -> None:
    engine = ds_tiny.make_engine(stage, world)
    for step in range(STEPS):
        ds_tiny.train_step(engine, step, rank, world)
    save_state(engine, _store(out, stage, world), STEPS, {"world_size": world, "zero_stage": stage}, rank)
    saved = ds_tiny.full_weights(engine)  # collective under ZeRO-3
    record = {"weights": saved, "adam_steps": ds_tiny.adam_steps(engine), "global_steps": engine.global_steps}
    ds_tiny.train_step(engine, STEPS, rank, world)
    record["next"] = ds_tiny.full_weights(engine)
    # Same world size: a fresh engine loads the commit natively (no conversion) and must continue bitwise.
    fresh = ds_tiny.make_engine(stage, world)
    load_into_engine(fresh, _store(out, stage, world).latest())
    record["reload"] = ds_tiny.full_weights(fresh)
    record["reload_adam_steps"] = ds_tiny.adam_steps(fresh)
    ds_tiny.train_step(fresh, STEPS, rank, world)
    record["reload_next"] = ds_tiny.full_weights(fresh)
    if rank == 0:
        torch.save(record, out / f"z{stage}_w{world}_saved.pt")


def _load(out: Path, rank: int, world: int, stage: int, src_world: int) -> None:
    commit = _store(out, stage, src_world).latest()
    engine = ds_tiny.make_engine(stage, world, load_universal=True)
    init = ds_tiny.full_weights(engine)  # must differ from the checkpoint, or the bitwise check proves nothing
    # Every rank: ensure_universal(commit) (the first converts under a lock, the others reuse), then
    # engine.load_checkpoint(str(<root>/step_N.universal), tag="ds", load_module_strict=True).
    load_into_engine(engine, commit)
    record = {"init": init, "weights": ds_tiny.full_weights(engine), "adam_steps": ds_tiny.adam_steps(engine),
              "global_steps": engine.global_steps}
    ds_tiny.train_step(engine, STEPS, rank, world)
    record["next"] = ds_tiny.full_weights(engine)
    if rank == 0:
        torch.save(record, out / f"z{stage}_w{src_world}_to_w{world}.pt")


def _worker(rank: int, world: int, port: int, out: str, actions: list[tuple]) -> None:
    ds_tiny.init_dist(rank, world, port)
    for action in actions:
        if action[0] == "save":
            _save(Path(out), rank, world, action[1])
        else:
            _load(Path(out), rank, world, action[1], action[2])
    ds_tiny.finish()


def _spawn(world: int, out: Path, actions: list[tuple]) -> None:
    ds_tiny.spawn(_worker, out, world, actions)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("universal")
    _spawn(2, out, [("save", s) for s in SAVE_STAGES])
    _spawn(1, out, [("load", s, 2) for s in STAGES] + [("save", 2)])
    _spawn(2, out, [("load", 2, 1)])
    return out


def _records(out: Path, stage: int, src: int, dst: int) -> tuple[dict, dict]:
    return (torch.load(out / f"z{stage}_w{src}_saved.pt"), torch.load(out / f"z{stage}_w{src}_to_w{dst}.pt"))


@pytest.mark.parametrize("stage,src,dst", [(1, 2, 1), (2, 2, 1), (3, 2, 1), (2, 1, 2)])
def test_universal_resume_other_world_size(runs: Path, stage: int, src: int, dst: int) -> None:
    saved, loaded = _records(runs, stage, src, dst)
    assert saved["weights"].keys() == loaded["weights"].keys()
    for k, v in saved["weights"].items():
        assert torch.equal(v, loaded["weights"][k]), f"ZeRO-{stage} {src}->{dst}: {k} differs after load"
    assert not all(torch.equal(v, loaded["init"][k]) for k, v in saved["weights"].items())
    assert saved["adam_steps"] == [float(STEPS)], saved["adam_steps"]
    assert loaded["adam_steps"] == [float(STEPS)], f"Adam step count not carried: {loaded['adam_steps']}"
    assert loaded["global_steps"] == saved["global_steps"] == STEPS
    # Adam moments carried over: the next step matches the uninterrupted run (reduction order differs).
    for k, v in saved["next"].items():
        torch.testing.assert_close(loaded["next"][k], v, rtol=0, atol=1e-6)
    moved = max((saved["next"][k] - saved["weights"][k]).abs().max().item() for k in saved["weights"])
    assert moved > 1e-4  # the step did change the weights, so the comparison above is meaningful


def test_store_holds_committed_sharded_checkpoints(runs: Path) -> None:
    store = _store(runs, 2, 2)
    commit = store.latest()
    assert commit is not None and commit.step == STEPS and commit.meta["world_size"] == 2
    store.verify(commit)
    names = set(commit.files)
    assert {"ds/mp_rank_00_model_states.pt", "rank0_rng.pt", "rank1_rng.pt", "meta.json"} <= names
    assert sum("optim_states" in n for n in names) == 2  # one ZeRO partition per rank
    assert not list(runs.glob("**/*.tmp*"))
    cached = universal_dir(commit)
    stamp = (cached / "latest_universal").stat().st_mtime_ns
    assert ensure_universal(commit) == cached / "ds"  # converted once in the load run, reused now
    assert (cached / "latest_universal").stat().st_mtime_ns == stamp and (cached / "ds" / "zero").is_dir()
    assert store.catalog().to_pylist()[0]["world_size"] == 2


@pytest.mark.parametrize("stage", SAVE_STAGES)
def test_same_world_size_reload_is_bitwise(runs: Path, stage: int) -> None:
    saved = torch.load(runs / f"z{stage}_w2_saved.pt")
    for k, v in saved["weights"].items():
        assert torch.equal(saved["reload"][k], v), f"ZeRO-{stage} reload: {k} differs"
        assert torch.equal(saved["reload_next"][k], saved["next"][k]), f"ZeRO-{stage} reload + step: {k} differs"
    assert saved["reload_adam_steps"] == [float(STEPS)]


@pytest.mark.parametrize("stage", SAVE_STAGES)
def test_consolidate_and_export_match_trained_weights(runs: Path, tmp_path: Path, stage: int) -> None:
    saved = torch.load(runs / f"z{stage}_w2_saved.pt")["weights"]
    commit = _store(runs, stage, 2).latest()
    state = consolidate_fp32(commit)
    assert state.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(state[k], v), f"ZeRO-{stage} zero_to_fp32: {k} differs"
    export_weights(state, {"name": "mlp"}, {"step": commit.step, "run_name": "t", "config_hash": "x"},
                   tmp_path / "export")
    back, config, prov = load_export(tmp_path / "export")
    assert config == {"name": "mlp"} and prov["step"] == STEPS
    assert all(torch.equal(back[k], v) for k, v in saved.items())
