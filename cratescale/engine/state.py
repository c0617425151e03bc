"""Collective save and resume of the whole training state (DeepSpeed + loader + RNG + counters)."""
from __future__ import annotations

import logging
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from cratescale.checkpoint import (DS_TAG, CheckpointCorruptError, CheckpointError, CheckpointStore,
                                  CheckpointWriteError, Commit)
from cratescale.checkpoint.durable import ChecksumWriter, checksum_file
from cratescale.checkpoint.universal import load_into_engine
from cratescale.compat import deepspeed as ds_compat
from cratescale.config import JobConfig, identity_change, identity_hash

log = logging.getLogger(__name__)


def incarnation_from_env(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Who this job is, for the incarnation rule (DESIGN.md section 5): the SLURM job id and its restart
    count (SLURM_RESTART_COUNT, unset before the first requeue) and the local supervisor's attempt number
    (CRATESCALE_ATTEMPT, set by a supervisor that resubmits the run)."""
    env = os.environ if env is None else env
    out: dict[str, Any] = {"job": env.get("SLURM_JOB_ID") or None}
    for key, name in (("restart", "SLURM_RESTART_COUNT"), ("attempt", "CRATESCALE_ATTEMPT")):
        value = env.get(name, "").strip() or "0"
        if not value.isdigit():
            raise ValueError(f"{name}={env[name]!r}: expected a non-negative integer")
        out[key] = int(value)
    return out


def claim_run(store: CheckpointStore, rank: int, env: dict[str, str] | None = None) -> None:
    """Rank 0 claims the run for this incarnation before anyone resumes; a refusal (a stale incarnation)
    raises on every rank."""
    who = incarnation_from_env(env)
    error = _attempt(lambda: store.claim_incarnation(**who)) if rank == 0 else None
    if any_rank(error is not None):
        reason = _failures(error, rank)
        raise CheckpointWriteError(f"claiming {store.root}: {reason}") from error
    if dist.is_initialized():  # every rank writes into the tmp dir named after rank 0's claim number
        number = [store.incarnation]
        dist.broadcast_object_list(number, src=0)
        store.incarnation = number[0]


class ResumeError(RuntimeError):
    """A checkpoint that this job must not continue from (other model, other global batch)."""


@dataclass
class ResumePlan:
    commit: Commit | None
    elastic: bool
    passed_over: list[str] = field(default_factory=list)  # one line per newer commit that failed verification


def check_identity(commit: Commit, identity: dict[str, Any], allow_config_change: bool) -> None:
    """Refuses (one line) a checkpoint whose training is not this job's: other samples, model, optimizer, seed."""
    why = identity_change(commit.meta, identity)
    if why is None:
        return
    if not allow_config_change:
        raise ResumeError(f"{commit.path}: {why}. Use checkpoint.allow_config_change=true to continue anyway, "
                          f"or start a new run_dir")
    log.warning("resume: %s: %s; continuing (checkpoint.allow_config_change=true)", commit.path, why)


def _verified_choice(store: CheckpointStore) -> dict[str, Any]:
    """Rank 0: the newest commit whose files match their sizes and crc32 in COMMITTED (storage damage, a bad
    disk: DeepSpeed would load a cut-short file, raise, and the run would stop without trying the older commits
    that keep_last kept). Then retention and clean-up relative to it (never deleting it)."""
    store.restore_interrupted()  # a re-save cut short: its complete copy is back under its name first
    passed: list[tuple[int, str]] = []
    chosen = None
    for step in store.newest_first():
        try:
            store.verify(store.load(step))
        except CheckpointCorruptError as exc:
            log.warning("resume: %s", exc)
            passed.append((step, str(exc)))
            continue
        chosen = step
        break
    where = f"resuming from step {chosen} instead" if chosen is not None else "no older commit verifies"
    lines = [f"resume: passed over {why}; {where}" for _, why in passed]
    if chosen is None and passed:
        raise CheckpointCorruptError(f"resume: no commit in {store.root} verifies ({len(passed)} tried); newest: "
                                     f"{passed[0][1]}")
    try:  # what a crash left beside the chosen commit (never the commit itself, which every rank now loads)
        store.tidy(chosen)
    except OSError as exc:
        log.warning("resume: tidying %s failed (%s); the next commit retries", store.root, exc)
    return {"step": chosen, "passed_over": lines}


def choose_commit(store: CheckpointStore) -> tuple[Commit | None, list[str]]:
    """The commit every rank resumes from, verified once by rank 0 (the result broadcast), and the lines of the
    newer ones passed over. Without any commit that verifies: CheckpointCorruptError on every rank."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    result: list[Any] = [None]
    error: BaseException | None = None
    if rank0:
        try:
            result[0] = _verified_choice(store)
        except Exception as exc:  # noqa: BLE001 - the other ranks wait in the broadcast: they raise it too
            error, result[0] = exc, {"error": str(exc), "corrupt": isinstance(exc, CheckpointCorruptError)}
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    choice = result[0]
    if error is not None:
        raise error
    if "error" in choice:  # a damaged run is deterministic (ValueError); a failed read may be transient
        raise (CheckpointCorruptError if choice["corrupt"] else CheckpointError)(choice["error"])
    return (None if choice["step"] is None else store.load(choice["step"])), choice["passed_over"]


def plan_resume(store: CheckpointStore, identity: dict[str, Any], global_batch: int, world_size: int,
                allow_config_change: bool = False) -> ResumePlan:
    commit, passed_over = choose_commit(store)
    if commit is None:
        return ResumePlan(None, False)
    meta = commit.meta
    if meta.get("global_batch") != global_batch:
        raise ResumeError(f"{commit.path}: saved with global batch {meta.get('global_batch')}, the job asks for "
                          f"{global_batch}; the data order would change. Start fresh from its weights instead "
                          f"(checkpoint.start_fresh_from_weights=PATH, new run_dir)")
    check_identity(commit, identity, allow_config_change)
    return ResumePlan(commit, meta.get("world_size") != world_size, passed_over)


def check_decoder(commit: Commit | None, identity: str, why: str, allow_change: bool) -> str | None:
    """Refuse to resume a run under another decoder than the one its samples were decoded with (DALI and PIL,
    cpu and mixed, other versions give other pixels). Returns the saved decoder when it differs and the job
    allows the change (for the start record), else None. Checkpoints from before the record pass."""
    saved = None if commit is None else commit.meta.get("decoder")
    if saved is None or saved == identity:
        return None
    if not allow_change:
        raise ResumeError(f"{commit.path}: its samples were decoded by {saved}, this job decodes with {identity} "
                          f"({why}); pixels differ between decoders. Use checkpoint.allow_decoder_change=true "
                          f"to continue anyway, or run where the same decoder is installed")
    return saved


def _rng_state() -> dict[str, Any]:
    """Every RNG stream as tensors and plain values only, so loading it needs no pickle (weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "python": random.getstate()}


def _set_rng_state(path: Path) -> None:
    if not path.exists():
        return
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def load_state(engine: Any, plan: ResumePlan, rank: int) -> dict[str, Any]:
    """Loads the planned commit into the DeepSpeed engine; returns its metadata (step, loader state, ...)."""
    commit = plan.commit
    assert commit is not None
    # The engine was built with load_universal=plan.elastic: a world-size change goes through the universal form.
    load_into_engine(engine, commit, load_lr_scheduler_states=False)
    if not plan.elastic:  # RNG streams are per rank: only meaningful on the same world size
        _set_rng_state(commit.path / f"rank{rank}_rng.pt")
    return commit.meta


def collective_device() -> torch.device:
    """NCCL reduces only CUDA tensors, gloo only CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on at least one."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError (ENOSPC, EIO, ...) behind an error, if any: torch's zip writer wraps a failed write in
    "RuntimeError: ... unexpected pos", with the OSError as its context."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _describe(error: BaseException) -> str:
    """One line: the OS error behind it if there is one, else the error itself (a store error is unwrapped)."""
    if isinstance(error, CheckpointWriteError) and error.__cause__ is not None:
        error = error.__cause__
    error = _os_error(error) or error
    return " ".join(f"{type(error).__name__}: {error}".split())


def _failures(error: BaseException | None, rank: int) -> str:
    """Every rank learns what failed where ("rank 1: OSError: [Errno 28] No space left on device: ...")."""
    mine = None if error is None else f"rank {rank}: {_describe(error)}"
    if not dist.is_initialized():
        return mine or ""
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return "; ".join(g for g in gathered if g)


def _agree_or_raise(store: CheckpointStore, step: int, rank: int, error: BaseException | None) -> None:
    """Every rank learns whether any rank failed, and why; then all raise together (no rank left in a barrier)."""
    if any_rank(error is not None):
        reason = _failures(error, rank)
        if rank == 0:
            raise store.abort(step, reason) from error
        raise CheckpointWriteError(f"checkpoint step {step}: {reason}") from error


def _attempt(fn: Any, *args: Any) -> BaseException | None:
    try:
        fn(*args)
        return None
    except Exception as exc:  # noqa: BLE001 - every rank must reach the agreement that follows
        return exc


def with_filename(exc: BaseException, path: str | Path) -> BaseException:
    """A failed write() names no file (ENOSPC from the raw write): the error then names `path`."""
    cause = _os_error(exc)
    if cause is None or cause.filename is not None:
        return exc
    named = OSError(cause.errno, cause.strerror, str(path))
    named.__cause__ = exc
    return named


@contextmanager
def _deferred_write_errors(engine: Any, sums: dict[str, tuple[int, int]]) -> Iterator[list[BaseException]]:
    """DeepSpeed's save_checkpoint holds barriers between its writes: a rank whose write raised would leave
    the other ranks in the next barrier for good. So the writes record their first failure and let this
    rank pass every barrier with the others; the caller raises it once save_checkpoint has returned.
    Files are written through Python file objects, so a failed write keeps its errno (torch.save to a path
    turns ENOSPC into "unexpected pos 128 vs 0"); each written file's (size, crc32) goes into `sums` (path ->),
    the rank's own list that the seal checks against the disk."""
    errors: list[BaseException] = []
    real_save, real_copy = ds_compat.checkpoint_save(engine), ds_compat.recovery_script_copy(engine)
    own_writes, zipfile = ds_compat.writes_with_torch_save(engine), ds_compat.zipfile_serialization(engine)

    def save(state_dict: Any, path: str) -> None:
        if errors:
            return  # this rank's part is lost already: write nothing more
        try:
            if own_writes:
                with ChecksumWriter(Path(path)) as f:
                    torch.save(state_dict, f, _use_new_zipfile_serialization=zipfile)
                sums[path] = f.close()
            else:
                real_save(state_dict, path)
                sums[path] = checksum_file(Path(path), fsync=True)
        except Exception as exc:  # noqa: BLE001 - raised after the barriers
            errors.append(with_filename(exc, path))

    def copy_recovery_script(save_path: str) -> None:
        try:
            real_copy(save_path)
        except Exception as exc:  # noqa: BLE001 - raised after the barriers
            errors.append(exc)

    with ds_compat.replaced_checkpoint_writes(engine, save, copy_recovery_script):
        yield errors


def checkpoint_meta(job: JobConfig, step: int, world_size: int, identity: dict[str, Any], total_steps: int,
                    warmup_steps: int, decoder: str, loader_state: dict[str, int]) -> dict[str, Any]:
    """What a commit records beside the DeepSpeed state (DESIGN.md section 5), read back by plan_resume (global
    batch, identity), check_decoder, schedule_note (total and warmup steps), the catalog and the status."""
    global_batch = job.schedule.global_batch
    return {"step": step, "samples_seen": step * global_batch, "world_size": world_size,
            "global_batch": global_batch, "config_hash": identity_hash(identity), "identity": identity,
            "total_steps": total_steps, "warmup_steps": warmup_steps, "job_name": job.name, "decoder": decoder,
            "loader_state": loader_state}


def save_state(engine: Any, store: CheckpointStore, step: int, meta: dict[str, Any], rank: int) -> Commit:
    """Every rank writes its part into this incarnation's step_N.tmp; rank 0 commits once all have succeeded,
    sealing every rank's own list of files (sizes on disk checked against it), never whatever is in the dir."""
    path = store.tmp_path(step)
    _agree_or_raise(store, step, rank, _attempt(store.begin, step) if rank == 0 else None)
    sums: dict[str, tuple[int, int]] = {}

    def write_part() -> None:
        # save_latest=False: DeepSpeed writes its `latest` tag file between two barriers, unguarded; we write
        # the same file below, where a failure goes through the agreement like any other.
        with _deferred_write_errors(engine, sums) as errors:
            engine.save_checkpoint(str(path), tag=DS_TAG, save_latest=False)
        if errors:
            raise errors[0]
        if rank == 0:
            with ChecksumWriter(path / "latest") as f:
                f.write(DS_TAG.encode())
            sums[str(path / "latest")] = f.close()
        with ChecksumWriter(path / f"rank{rank}_rng.pt") as f:
            torch.save(_rng_state(), f)
        sums[str(path / f"rank{rank}_rng.pt")] = f.close()

    _agree_or_raise(store, step, rank, _attempt(write_part))
    mine = {str(Path(p).relative_to(path)): {"size": size, "crc32": crc} for p, (size, crc) in sums.items()}
    sealed = gather_sums(mine)
    _agree_or_raise(store, step, rank, _attempt(store.commit, step, meta, sealed) if rank == 0 else None)
    return store.load(step)


def gather_sums(mine: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Every rank's own list of written files (rel path -> {size, crc32}), merged; what the seal checks."""
    gathered: list[Any] = [mine]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    return {rel: s for part in gathered for rel, s in part.items()}
