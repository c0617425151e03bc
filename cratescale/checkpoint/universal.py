"""DeepSpeed universal checkpoints: load a committed ZeRO checkpoint at a different world size.

`ensure_universal(commit)` converts `step_N/ds` (the DeepSpeed tag dir) once into the cached sibling
`step_N.universal/ds` (built in `step_N.universal.tmp-<host>-<pid>/`, renamed when complete) and returns that
tag dir. Load it on every rank with the universal flag in the DeepSpeed config:

    ds_config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=AdamW(...), config=ds_config)
    tag_dir = ensure_universal(commit)            # safe on every rank at once: one converts, the rest wait
    engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=True)
    # i.e. load_dir = <root>/step_<N>.universal, tag = "ds"

Same world size (no conversion, `load_universal` false):
    engine.load_checkpoint(str(commit.path), tag="ds", load_module_strict=True)
`load_into_engine(engine, commit)` makes whichever of the two calls the engine's config asks for. Stages 1
to 3 convert; ZeRO-0 has no partitioned optimizer state to reshard (ds_to_universal does not accept it).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch

from cratescale.checkpoint.commit import Commit, CheckpointError
from cratescale.checkpoint.layout import ds_layout
from cratescale.files import fsync_path

DS_TAG = "ds"             # the DeepSpeed tag every rank saves under: step_N/ds/
UNIVERSAL_TAG = DS_TAG    # the converted tag inside step_N.universal/


class UniversalConversionError(CheckpointError):
    """ds_to_universal failed on a committed checkpoint."""


def universal_dir(commit: Commit) -> Path:
    return commit.path.with_name(f"{commit.path.name}.universal")


def _is_complete(out: Path) -> bool:
    # Only a finished conversion is ever renamed to this name; latest_universal is written last by DeepSpeed.
    return (out / "latest_universal").is_file() and (out / UNIVERSAL_TAG / "zero").is_dir()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, names in os.walk(root, topdown=False):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_path(Path(dirpath))


def convert(src_tag_dir: Path, out_tag_dir: Path, workers: int = 1, timeout_s: float = 3600) -> None:
    """Run `python -m deepspeed.checkpoint.ds_to_universal` on the CPU in a subprocess (keeps the
    trainer's memory and accelerator untouched). --inject_missing_state: ZeRO-1/2 saves lack the
    universal-info block that the converter asserts on."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src_tag_dir),
           "--output_folder", str(out_tag_dir), "--num_extract_workers", str(workers),
           "--num_merge_workers", str(workers), "--inject_missing_state"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise UniversalConversionError(f"ds_to_universal on {src_tag_dir}: no result after {timeout_s} s") from exc
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise UniversalConversionError(f"ds_to_universal on {src_tag_dir} exited {proc.returncode}: {tail}")


def conversion_workers() -> int:
    """ds_to_universal's extract and merge workers: the CPUs this process may use (every rank of the node waits
    for the conversion, so the node's cores are free), at most 16."""
    return max(1, min(16, len(os.sched_getaffinity(0))))


def ensure_universal(commit: Commit, workers: int | None = None, stale_s: float = 120.0,
                     poll_s: float = 1.0) -> Path:
    """The universal tag dir of `commit`, `<root>/step_<N>.universal/ds` (converted on first use, reused after).

    Load with `engine.load_checkpoint(str(p.parent), tag=p.name)` under `"checkpoint": {"load_universal": true}`.
    Every rank of every node may call it at once: one converter per run, chosen by the exclusive creation of
    `step_N.universal.converting` beside the commit (O_EXCL holds on shared file systems where flock is
    node-local, as Lustre's localflock, or unsupported), the others wait for the finished dir. The converter
    touches the marker every few seconds; a marker older than `stale_s` (its converter died) is taken over.
    """
    src = commit.path / DS_TAG
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint step {commit.step}: no DeepSpeed checkpoint in {src}")
    if not ds_layout(src).partitioned:  # raises LayoutError listing the files when the layout is unknown
        raise UniversalConversionError(f"checkpoint step {commit.step}: {src} is a ZeRO-0 checkpoint (no optimizer "
                                       f"partitions); ds_to_universal converts ZeRO 1-3 only")
    out = universal_dir(commit)
    marker = out.with_name(f"{out.name}.converting")
    while not _is_complete(out):
        if _claim(marker, stale_s):
            try:
                if not _is_complete(out):  # finished between our look and our claim
                    with _heartbeat(marker):
                        _convert_into(src, out, workers or conversion_workers())
            finally:
                marker.unlink(missing_ok=True)
        else:
            time.sleep(poll_s)
    return out / UNIVERSAL_TAG


def _claim(marker: Path, stale_s: float) -> bool:
    """True when this process now holds the conversion (created the marker, or replaced a stale one)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            age = time.time() - marker.stat().st_mtime
        except FileNotFoundError:
            return False  # released just now: look again
        if age > stale_s:
            marker.unlink(missing_ok=True)  # a dead converter's; the next look claims it (or another waiter does)
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()} {time.time():.0f}\n")
    return True


@contextmanager
def _heartbeat(marker: Path, every_s: float = 10.0) -> Iterator[None]:
    """Touch `marker` while the conversion runs, so waiters can tell a slow converter from a dead one."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            try:
                os.utime(marker)
            except OSError:
                pass  # taken over or removed: the rename of the finished dir still decides
    thread = threading.Thread(target=beat, daemon=True, name="universal-heartbeat")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _convert_into(src: Path, out: Path, workers: int) -> None:
    tmp = out.with_name(f"{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        convert(src, tmp / UNIVERSAL_TAG, workers=workers)
        if not _is_complete(tmp):
            raise UniversalConversionError(f"ds_to_universal on {src} left no zero/ folder or latest_universal")
        _fsync_tree(tmp)
        if out.exists() and not _is_complete(out):
            shutil.rmtree(out)  # an incomplete leftover (not produced by this code, which renames whole dirs)
        try:
            os.rename(tmp, out)
        except OSError:
            if not _is_complete(out):  # lost the race to an identical conversion: keep the winner's
                raise
        fsync_path(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _mmap_loads(engine: Any) -> Iterator[None]:
    """Let DeepSpeed's torch checkpoint engine map files instead of reading them into fresh buffers: the
    engine copies every tensor into its own (flat) storage anyway, so this saves a full allocate + copy pass
    and DeepSpeed's second read of the model-states file. Loaded tensors are MAP_PRIVATE (copy-on-write)."""
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if type(ckpt_engine).__name__ != "TorchCheckpointEngine":
        yield
        return

    def load(path: str, map_location: Any = None) -> Any:
        # A committed checkpoint of this run; DeepSpeed's own loader unpickles it just the same.
        return torch.load(path, map_location=map_location, weights_only=False, mmap=True)  # trusted: run's commit

    ckpt_engine.load = load
    try:
        yield
    finally:
        del ckpt_engine.load  # back to the class method


def load_into_engine(engine: Any, commit: Commit, strict: bool = True, mmap: bool = True,
                     **load_kwargs: Any) -> dict[str, Any]:
    """Load `commit` into a DeepSpeed engine (call on every rank); returns DeepSpeed's client state.

    Same world size (config `checkpoint.load_universal` false):
        engine.load_checkpoint(str(commit.path), tag="ds", load_module_strict=strict, **load_kwargs)
    Universal (config `checkpoint.load_universal` true; converts on first use, see ensure_universal):
        engine.load_checkpoint(str(commit.path.parent / f"{commit.path.name}.universal"), tag="ds", ...)
    """
    if engine.load_universal_checkpoint():
        tag_dir = ensure_universal(commit)
        load_dir, tag = tag_dir.parent, tag_dir.name
    else:
        load_dir, tag = commit.path, DS_TAG
    with _mmap_loads(engine) if mmap else nullcontext():
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=strict,
                                                    **load_kwargs)
    if path is None:
        raise CheckpointError(f"checkpoint step {commit.step}: DeepSpeed loaded nothing from {load_dir}/{tag}")
    return client_state or {}
