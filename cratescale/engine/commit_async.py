"""The asynchronous collective commit: the state is copied to host memory at a step boundary, training goes
on, a background thread per rank writes it; the COMMITTED marker, rename and `latest` follow once every
rank's bytes are durable (DESIGN.md section 5).

Why our own writer, not DeepSpeed 0.19.8's: its DecoupledCheckpointEngine queues the live state_dict to a
spawned process (no copy: the ranks then train on the tensors it serialises, and a GPU tensor is shared, not
staged), reports a failed write only as "process died" at the next save, never fsyncs, and has no hook where
the marker could follow durability; DataStatesCheckpointEngine needs the `datastates` package (not on this
platform's index) and also only offers wait(). Both stop at "the files are written"; the commit protocol
(every rank's sums, marker, rename, pointer, errors on every rank) lives here either way.

Protocol, every rank in the same order (the in-flight state is the same on every rank: it only changes on
the outcome of an all-reduce):
    start(step, meta)   rank 0 makes step_N.tmp; save_checkpoint runs with the checkpoint engine's save()
                        replaced by a snapshot (storages copied once to host memory, pinned on GPUs, views
                        and sharing kept: the bytes torch.save writes are those of a synchronous save);
                        the thread writes the snapshots through ChecksumWriter (crc32 while writing, fsync).
    poll()              at each step boundary while a commit is in flight: (busy, failed) reduced over the
                        ranks (inside the trainer's one agreement per step, engine/agreement.py). A failure raises on every rank (rank 0 removes the tmp dir).
                        All written: the sums are gathered and rank 0's thread seals (store.commit with
                        sealed=...). Sealed: the commit is done (metrics: stall_s, write_s, seconds).
    drain()             wait for the commit in flight (before the next one, a stop, the end of the run).
A kill at any moment leaves no marker on a half-written step (the marker is the sealing thread's last file).
On an exception the writer threads (not daemons) finish their file before the interpreter exits; nothing
is sealed without every rank's agreement, so the unmarked tmp dir is removed by the next begin() or tidy().
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from cratescale.checkpoint import DS_TAG, CheckpointStore, Commit
from cratescale.checkpoint.durable import ChecksumWriter
from cratescale.compat import deepspeed as ds_compat
from cratescale.engine.state import (_agree_or_raise, _attempt, _rng_state, collective_device, gather_sums,
                                     with_filename)

log = logging.getLogger(__name__)


def snapshot(obj: Any, pin: bool = False, memo: dict | None = None, pool: dict | None = None) -> Any:
    """A host-memory copy of a state_dict: every tensor storage copied once (shared storages stay shared,
    views keep their offset and strides), containers rebuilt, other leaves deep-copied. `pool`: host
    buffers of an earlier snapshot, by size, reused (allocating and faulting in fresh memory for every
    commit costs more than the copy itself)."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        # Empty storages all have data_ptr 0 (ZeRO-3's parameter placeholders): each stays its own.
        key = (storage.data_ptr(), storage.nbytes(), str(storage.device)) if storage.nbytes() else id(obj)
        host = memo.get(key)
        if host is None:
            free = (pool or {}).get(storage.nbytes())
            host = free.pop() if free else torch.empty(storage.nbytes(), dtype=torch.uint8,
                                                        pin_memory=pin).untyped_storage()
            host.copy_(storage, non_blocking=pin)
            memo[key] = host
        out = torch.empty(0, dtype=obj.dtype).set_(host, obj.storage_offset(), obj.size(), obj.stride())
        if isinstance(obj, torch.nn.Parameter):
            return torch.nn.Parameter(out, requires_grad=obj.requires_grad)
        return out.requires_grad_(obj.requires_grad) if obj.requires_grad else out
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the type (OrderedDict, defaultdict)
        for k, v in obj.items():
            out[k] = snapshot(v, pin, memo, pool)
        return out
    if isinstance(obj, list):
        return [snapshot(v, pin, memo, pool) for v in obj]
    if isinstance(obj, tuple):
        items = [snapshot(v, pin, memo, pool) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.dtype, torch.device)):
        return obj
    return copy.deepcopy(obj)


@contextmanager
def _snapshotting(engine: Any, parts: list[tuple[str, Any]], pin: bool, memo: dict | None = None,
                  pool: dict | None = None) -> Iterator[list[BaseException]]:
    """save_checkpoint with the checkpoint engine's save() taking a host snapshot instead of writing. A failed
    copy (host memory) is recorded, not raised: save_checkpoint holds barriers the other ranks wait in."""
    memo, errors = {} if memo is None else memo, []

    def save(state_dict: Any, path: str) -> None:
        try:
            if not errors:
                parts.append((path, snapshot(state_dict, pin, memo, pool)))
        except Exception as exc:  # noqa: BLE001 - raised once save_checkpoint returned
            errors.append(exc)

    with ds_compat.replaced_checkpoint_writes(engine, save):
        yield errors


@dataclass
class _InFlight:
    step: int
    meta: dict[str, Any]
    started: float
    stall_s: float  # training time lost: waiting for the previous commit + the snapshot
    waited_s: float
    thread: threading.Thread | None = None
    sums: dict[str, dict[str, int]] = field(default_factory=dict)
    error: BaseException | None = None
    sealing: bool = False


class AsyncCommitter:
    """One commit in flight at most; see the module docstring."""

    def __init__(self, engine: Any, store: CheckpointStore, rank: int, when_busy: str = "wait",
                 on_done: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.engine, self.store, self.rank = engine, store, rank
        self.when_busy, self.on_done = when_busy, on_done
        self.inflight: _InFlight | None = None
        # Host buffers of the last snapshot (size -> storages), reused by the next once its write is done
        # (start() runs only with nothing in flight): one state's worth of host memory, held for the run.
        self._staging: dict[int, list[Any]] = {}
        self.skipped = 0
        self.pin = torch.cuda.is_available() and collective_device().type == "cuda"
        self.zipfile = ds_compat.zipfile_serialization(engine)

    # ---- the step boundary -----------------------------------------------------------------
    def commit(self, step: int, meta: dict[str, Any], final: bool = False) -> bool:
        """Start the commit of `step` (after waiting for the one in flight, or skipping it when
        when_busy="skip" and not final); final=True also waits for it. False when skipped."""
        if self.inflight is not None and not final and self.when_busy == "skip":
            self.skipped += 1
            if self.on_done:
                self.on_done({"kind": "commit_skipped", "step": step, "writing": self.inflight.step,
                              "skipped": self.skipped})
            return False
        t0 = time.perf_counter()
        self.drain()  # waiting for the write in flight is training time lost too: counted in stall_s
        self.start(step, meta, waited_s=time.perf_counter() - t0)
        if final:
            self.drain()
        return True

    def start(self, step: int, meta: dict[str, Any], waited_s: float = 0.0) -> None:
        assert self.inflight is None, "start() with a commit in flight"
        t0 = time.perf_counter()
        store, rank, path = self.store, self.rank, self.store.tmp_path(step)
        _agree_or_raise(store, step, rank, _attempt(store.begin, step) if rank == 0 else None)
        parts: list[tuple[str, Any]] = []
        memo: dict = {}

        def capture() -> None:
            with _snapshotting(self.engine, parts, self.pin, memo, self._staging) as errors:
                self.engine.save_checkpoint(str(path), tag=DS_TAG, save_latest=False)
            if errors:
                raise errors[0]
            if rank == 0:  # DeepSpeed's tag file; tiny, sealed by rank 0's commit
                (path / "latest").write_text(DS_TAG)
            parts.append((str(path / f"rank{rank}_rng.pt"), _rng_state()))

        _agree_or_raise(store, step, rank, _attempt(capture))
        self._staging = {}
        for host in memo.values():
            self._staging.setdefault(host.nbytes(), []).append(host)
        if self.pin:
            torch.cuda.current_stream().synchronize()  # the pinned copies were asynchronous
        flight = _InFlight(step, meta, t0, time.perf_counter() - t0 + waited_s, waited_s)
        flight.thread = threading.Thread(target=self._write, args=(flight, path, parts), daemon=False,
                                         name=f"commit-step{step}")
        self.inflight = flight
        flight.thread.start()

    def _write(self, flight: _InFlight, root: Path, parts: list[tuple[str, Any]]) -> None:
        name = str(root)
        try:
            while parts:
                name, obj = parts.pop(0)
                with ChecksumWriter(Path(name)) as f:
                    torch.save(obj, f, _use_new_zipfile_serialization=self.zipfile)
                size, crc = f.close()
                flight.sums[str(Path(name).relative_to(root))] = {"size": size, "crc32": crc}
                del obj
        except Exception as exc:  # noqa: BLE001 - raised on every rank at the next boundary
            flight.error = with_filename(exc, name)

    def _seal(self, flight: _InFlight, sums: dict[str, dict[str, int]]) -> None:
        try:
            self.store.commit(flight.step, flight.meta, sealed=sums)
        except Exception as exc:  # noqa: BLE001 - raised on every rank at the next boundary
            flight.error = exc

    def flags(self) -> tuple[int, int]:
        """This rank's (busy, failed) for the step's agreement; (0, 0) with nothing in flight."""
        flight = self.inflight
        if flight is None:
            return 0, 0
        return int(flight.thread is not None and flight.thread.is_alive()), int(flight.error is not None)

    def poll(self, agreed: tuple[bool, bool] | None = None) -> Commit | None:
        """At a step boundary: advance the commit in flight; returns it once sealed. Raises its failure.
        `agreed`: (busy, failed) already reduced over ranks (the trainer's step agreement); else one all-reduce."""
        flight = self.inflight
        if flight is None:
            return None
        if agreed is None:
            flags = torch.tensor(self.flags(), dtype=torch.int64, device=collective_device())
            if dist.is_initialized():
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            agreed = (bool(flags[0].item()), bool(flags[1].item()))
        busy_any, failed_any = agreed
        if failed_any:
            self._fail(flight)
        if busy_any:
            return None
        if not flight.sealing:
            self._start_seal(flight)
            return None
        self.inflight = None
        seconds = time.perf_counter() - flight.started  # snapshot until sealed
        if self.on_done:  # write_s: after the snapshot, while training went on
            self.on_done({"kind": "commit", "step": flight.step, "seconds": seconds, "stall_s": flight.stall_s,
                          "wait_s": flight.waited_s, "write_s": seconds - (flight.stall_s - flight.waited_s),
                          "async": True})
        return self.store.load(flight.step) if self.rank == 0 else None

    def _start_seal(self, flight: _InFlight) -> None:
        """Every rank's files are durable: rank 0 seals them in its thread (marker, rename, `latest`)."""
        sums = gather_sums(flight.sums)
        flight.sealing = True
        if self.rank == 0:
            flight.thread = threading.Thread(target=self._seal, args=(flight, sums), daemon=False,
                                             name=f"seal-step{flight.step}")
            flight.thread.start()
        else:
            flight.thread = None

    def _fail(self, flight: _InFlight) -> None:
        """Every rank waits for its own thread (nothing still writes into the tmp dir), then all raise."""
        if flight.thread is not None:
            flight.thread.join()
        self.inflight = None
        _agree_or_raise(self.store, flight.step, self.rank, flight.error)

    def drain(self) -> None:
        """Wait until nothing is in flight (collective: every rank calls it at the same boundary)."""
        while self.inflight is not None:
            if self.inflight.thread is not None:
                self.inflight.thread.join()
            self.poll()
