"""Collective save and resume of the whole training state (DeepSpeed + loader + RNG + counters)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cratescale.checkpoint import DS_TAG, CheckpointStore, CheckpointWriteError, Commit
from cratescale.checkpoint.universal import load_into_engine


class ResumeError(RuntimeError):
    """A checkpoint that this job must not continue from (other model, other global batch)."""


@dataclass
class ResumePlan:
    commit: Commit | None
    elastic: bool


def plan_resume(store: CheckpointStore, config_hash: str, global_batch: int, world_size: int,
                allow_config_change: bool = False) -> ResumePlan:
    commit = store.latest()
    if commit is None:
        return ResumePlan(None, False)
    meta = commit.meta
    if meta.get("global_batch") != global_batch:
        raise ResumeError(f"{commit.path}: saved with global batch {meta.get('global_batch')}, the job asks for "
                          f"{global_batch}; the data order would change. Start fresh from its weights instead "
                          f"(checkpoint.start_fresh_from_weights=PATH, new run_dir)")
    if meta.get("config_hash") != config_hash and not allow_config_change:
        raise ResumeError(f"{commit.path}: saved by a job with config hash {meta.get('config_hash')}, this job's is "
                          f"{config_hash} (model, data, optim or schedule changed). Use "
                          f"checkpoint.allow_config_change=true to continue anyway, or start a new run_dir")
    return ResumePlan(commit, meta.get("world_size") != world_size)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(path: Path) -> None:
    if not path.exists():
        return
    state = torch.load(path, weights_only=False)  # our own file: numpy/python RNG tuples are not tensors
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def load_state(engine: Any, plan: ResumePlan, rank: int) -> dict[str, Any]:
    """Loads the planned commit into the DeepSpeed engine; returns its metadata (step, loader state, ...)."""
    commit = plan.commit
    assert commit is not None
    # The engine was built with load_universal=plan.elastic: a world-size change goes through the universal form.
    load_into_engine(engine, commit, load_lr_scheduler_states=False)
    if not plan.elastic:  # RNG streams are per rank: only meaningful on the same world size
        _set_rng_state(commit.path / f"rank{rank}_rng.pt")
    return commit.meta


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _agree_or_raise(store: CheckpointStore, step: int, rank: int, error: BaseException | None) -> None:
    """Every rank learns whether any rank failed; then all raise together (no rank left in a barrier)."""
    if _any_rank(error is not None):
        if rank == 0:
            raise store.abort(step, error or "another rank failed to write its part")
        raise CheckpointWriteError(f"checkpoint step {step}: {error or 'another rank failed to write its part'}")


def _attempt(fn: Any, *args: Any) -> BaseException | None:
    try:
        fn(*args)
        return None
    except Exception as exc:  # noqa: BLE001 - every rank must reach the agreement that follows
        return exc


def save_state(engine: Any, store: CheckpointStore, step: int, meta: dict[str, Any], rank: int) -> Commit:
    """Every rank writes its part into step_N.tmp; rank 0 commits once all have succeeded."""
    path = store.tmp_path(step)
    _agree_or_raise(store, step, rank, _attempt(store.begin, step) if rank == 0 else None)

    def write_part() -> None:
        engine.save_checkpoint(str(path), tag=DS_TAG)
        torch.save(_rng_state(), path / f"rank{rank}_rng.pt")

    _agree_or_raise(store, step, rank, _attempt(write_part))
    _agree_or_raise(store, step, rank, _attempt(store.commit, step, meta) if rank == 0 else None)
    return store.load(step)
