"""Checkpoint save/load through CheckpointStore vs plain sequential file I/O of the same bytes, same run.

    .venv/bin/python -m bench.checkpoint [--reps 3] [--root DIR] [--model crate_mae_base|linear]

One process, DeepSpeed ZeRO-2 (world 1, gloo, CPU), fp32 CRATE-MAE-Base (44M params) + torch AdamW after
one step: ~0.7 GB of checkpoint. Measured --reps times, alternating with the baseline (best and median):
  save: begin + engine.save_checkpoint(tag="ds") + rank RNG file + store.commit (fsync, crc32, COMMITTED,
        rename, latest, catalog, retention)      vs  the same file sizes written in 8 MiB blocks + fsync
  load: store.latest() + load_into_engine (engine.load_checkpoint with DeepSpeed's torch.load set to mmap;
        also without it)                         vs  reading the same files in 8 MiB blocks into RAM
        (one preallocated buffer per file), and through one reused 8 MiB buffer
        (page cache dropped per file with posix_fadvise DONTNEED before each; verify() timed the same way)
Target: save and load <= 1.5x the plain baseline.

    .venv/bin/python -m bench.checkpoint --async-commit [--reps 5]     (issue 18)
Per commit, alternating in each rep: the synchronous commit (engine.state.save_state), the asynchronous one
(engine.commit_async.AsyncCommitter: stall = the step-boundary snapshot to host memory; total = snapshot
until sealed, drained at once, no training beside it), and torch.save + fsync of the same state objects.
Targets: stall <= 0.15x the synchronous commit; total <= 1.2x torch.save + fsync. The verdict uses the median of
the per-rep (paired) ratios; the table also shows the medians of the times and their ratio (med/med).
`--json PATH` keeps every rep's times, the rows and the machine (bench/record.py), in both modes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench.record import Run, add_json_arg
from cratescale.checkpoint import CheckpointStore
from cratescale.checkpoint.universal import load_into_engine

BLOCK = 8 << 20
TARGET = 1.5
STALL_TARGET, TOTAL_TARGET = 0.15, 1.2


def build_model(kind: str) -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    if kind == "crate_mae_base":
        from cratescale.models import create_model

        model = create_model("crate_mae_base")
        images = torch.randn(1, 3, model.img_size, model.img_size)
        return model, lambda m: m(images)[0]
    # Same parameter count as CRATE-MAE-Base (44.0M) as a plain stack of Linear layers.
    model = nn.Sequential(*[nn.Linear(1915, 1915) for _ in range(12)])
    x = torch.randn(1, 1915)
    return model, lambda m: m(x).square().mean()


def make_engine(kind: str):
    from cratescale.compat.deepspeed import skip_shm_op_build
    from cratescale.distributed.rendezvous import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                      DS_ACCELERATOR="cpu")
    skip_shm_op_build()  # no 30 s JIT on gloo
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model, loss_fn = build_model(kind)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    config = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    engine.backward(loss_fn(engine))  # one step so AdamW's moments exist (they are 2/3 of the bytes)
    engine.step()
    return engine, sum(p.numel() for p in model.parameters())


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_of(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def plain_write(out: Path, sizes: list[int]) -> float:
    buf = memoryview(bytearray(os.urandom(1 << 20)) * 8)  # 8 MiB of incompressible bytes
    t0 = time.perf_counter()
    out.mkdir()
    for i, size in enumerate(sizes):
        with open(out / f"f{i}.bin", "wb", buffering=0) as f:
            left = size
            while left:
                left -= f.write(buf[:min(left, BLOCK)])
            os.fsync(f.fileno())
    return time.perf_counter() - t0


def plain_read(paths: list[Path], into_ram: bool) -> float:
    """Sequential 8 MiB reads; into_ram: into one preallocated buffer per file (the bytes end up in memory,
    as any load needs), else into one reused 8 MiB buffer (bytes discarded, stays in CPU cache)."""
    bufs = [bytearray(p.stat().st_size if into_ram else BLOCK) for p in paths]
    for b in bufs:
        b[::4096] = b"\1" * len(b[::4096])  # touch every page first: allocation is not read time
    t0 = time.perf_counter()
    for p, buf in zip(paths, bufs):
        with open(p, "rb", buffering=0) as f, memoryview(buf) as view:
            off = 0
            while n := f.readinto(view[off:off + BLOCK] if into_ram else view):
                off += n if into_ram else 0
    return time.perf_counter() - t0


def store_save(engine, store: CheckpointStore, step: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    path = store.begin(step)
    engine.save_checkpoint(str(path), tag="ds")
    torch.save({"torch": torch.get_rng_state()}, path / "rank0_rng.pt")
    t1 = time.perf_counter()
    commit = store.commit(step, {"world_size": 1, "samples_seen": step})
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1, commit.bytes


def store_load(engine, store: CheckpointStore, mmap: bool) -> float:
    t0 = time.perf_counter()
    load_into_engine(engine, store.latest(), mmap=mmap)
    return time.perf_counter() - t0


def verify(store: CheckpointStore) -> float:
    t0 = time.perf_counter()
    store.verify(store.latest())
    return time.perf_counter() - t0


def torch_save_fsync(root: Path, parts: list[tuple[str, object]]) -> float:
    """torch.save + fsync of the same state objects the commit writes (one file each), nothing else."""
    t0 = time.perf_counter()
    root.mkdir()
    for i, (_, obj) in enumerate(parts):
        with open(root / f"f{i}.pt", "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t0


def bench_async(engine, root: Path, reps: int) -> list[dict]:
    from cratescale.engine.commit_async import AsyncCommitter, _snapshotting
    from cratescale.engine.state import save_state

    sync_store, async_store = CheckpointStore(root / "sync", keep_last=1), CheckpointStore(root / "async", keep_last=1)
    done: list[dict] = []
    committer = AsyncCommitter(engine, async_store, 0, on_done=done.append)
    out = []
    for rep in range(reps):
        step = rep + 1
        t0 = time.perf_counter()
        commit = save_state(engine, sync_store, step, {"world_size": 1}, 0)
        sync_s = time.perf_counter() - t0
        committer.commit(step, {"world_size": 1}, final=True)
        parts: list = []
        with _snapshotting(engine, parts, pin=False):  # the same state_dicts, written plainly
            engine.save_checkpoint(str(root / "scratch"), tag="ds", save_latest=False)
        plain_s = torch_save_fsync(root / f"plain{rep}", parts)
        shutil.rmtree(root / f"plain{rep}")
        shutil.rmtree(root / "scratch", ignore_errors=True)
        out.append({"sync": sync_s, "stall": done[-1]["stall_s"], "total": done[-1]["seconds"], "plain": plain_s,
                    "bytes": commit.bytes})
    return out


ASYNC_ROWS = (("stall: async snapshot / synchronous commit", "sync", "stall", STALL_TARGET),
              ("total: async commit / torch.save + fsync of the same state", "plain", "total", TOTAL_TARGET),
              ("synchronous commit / torch.save + fsync (reference)", "plain", "sync", None))


def summarize_async(reps: list[dict]) -> list[dict]:
    """Per row: the medians of the baseline and measured times, their ratio (ratio of medians), and the median of
    the per-rep ratios (paired: load from other processes hits both alike); the verdict uses the paired one."""
    med = statistics.median
    out = []
    for label, base, meas, target in ASYNC_ROWS:
        paired = med([r[meas] / r[base] for r in reps])
        out.append({"what": label, "baseline_median_s": med([r[base] for r in reps]),
                    "measured_median_s": med([r[meas] for r in reps]),
                    "ratio_of_medians": med([r[meas] for r in reps]) / med([r[base] for r in reps]),
                    "median_of_paired_ratios": paired, "target": target,
                    "verdict": None if target is None else ("met" if paired <= target else "missed")})
    return out


def print_async(reps: list[dict], kind: str, n_params: int, run: Run, json_out: Path | None = None) -> None:
    gb = reps[0]["bytes"] / 1e9
    load = os.getloadavg()[0]
    print(f"async commit bench: {kind} {n_params / 1e6:.1f}M params, ZeRO-2 world 1 fp32 + AdamW, {gb:.3f} GB, "
          f"{len(reps)} reps; 2-core CPU VM, no GPU, load average {load:.1f} "
          f"(other processes: {os.cpu_count()} cores shared)")
    print(f"{'what':<58}{'baseline s':>11}{'measured s':>11}{'med/med':>8}{'paired':>8}{'target':>8}")
    rows = summarize_async(reps)
    for row in rows:
        target = f"<= {row['target']}" if row["target"] else ""
        print(f"{row['what']:<58}{row['baseline_median_s']:>11.3f}{row['measured_median_s']:>11.3f}"
              f"{row['ratio_of_medians']:>8.3f}{row['median_of_paired_ratios']:>8.3f}{target:>8} "
              f"{row['verdict'] or ''}")
    run.save(json_out, {"model": kind, "params": n_params, "gb": gb, "reps": reps, "rows": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--root", type=Path, default=None, help="where to write (default: a tmp dir on /tmp's disk)")
    ap.add_argument("--model", default="crate_mae_base", choices=["crate_mae_base", "linear"])
    ap.add_argument("--async-commit", action="store_true", help="the issue-18 rows (stall and total time)")
    add_json_arg(ap, "checkpoint")
    args = ap.parse_args()
    run = Run()
    kind = args.model
    try:
        engine, n_params = make_engine(kind)
    except ImportError:  # cratescale.models not there: the same parameter count as plain Linear layers
        kind = "linear"
        engine, n_params = make_engine(kind)
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.root))
    if args.async_commit:
        try:
            print_async(bench_async(engine, root, args.reps), kind, n_params, run, args.json)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    store = CheckpointStore(root / "store", keep_last=1)
    saves, commits, plains, loads, ds_loads, reads, scans, verifies = [], [], [], [], [], [], [], []
    try:
        for rep in range(args.reps):
            total, commit_s, nbytes = store_save(engine, store, rep + 1)
            saves.append(total)
            commits.append(commit_s)
            sizes = [p.stat().st_size for p in files_of(store.latest().path)]
            plain_dir = root / f"plain{rep}"
            plains.append(plain_write(plain_dir, sizes))
            ckpt_files, plain_files = files_of(store.latest().path), files_of(plain_dir)
            for fn, out in ((lambda: plain_read(plain_files, into_ram=True), reads),
                            (lambda: store_load(engine, store, mmap=True), loads),
                            (lambda: store_load(engine, store, mmap=False), ds_loads),
                            (lambda: plain_read(plain_files, into_ram=False), scans),
                            (lambda: verify(store), verifies)):
                drop_cache(ckpt_files + plain_files)
                out.append(fn())
            shutil.rmtree(plain_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best, med = min, statistics.median
    gb = nbytes / 1e9
    print(f"checkpoint bench: {kind} {n_params / 1e6:.1f}M params, ZeRO-2 world 1 fp32 + AdamW, "
          f"{gb:.3f} GB, {len(sizes)} files, {args.reps} reps; 2-core CPU VM, no GPU, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("per rep the measured run and its baseline run back to back; ratio = median of the per-rep ratios "
          "(paired, so load from other processes hits both alike); times: median [best]")
    print(f"{'what':<52}{'baseline s':>14}{'measured s':>14}{'ratio':>7}{'target':>8}")
    rows = [("save: store (DeepSpeed+commit) / plain write+fsync", plains, saves),
            ("load: latest+load_into_engine (mmap) / read into RAM", reads, loads),
            ("load: same, DeepSpeed's own torch.load / read to RAM", reads, ds_loads),
            ("load (mmap) / read through one 8 MiB buffer", scans, loads),
            ("verify (re-read + crc32) / read through 8 MiB buf", scans, verifies)]
    table = []
    for label, base, meas in rows:
        ratio = med([m / b for m, b in zip(meas, base)])
        cells = [f"{med(base):.3f} [{best(base):.2f}]", f"{med(meas):.3f} [{best(meas):.2f}]"]
        print(f"{label:<52}{cells[0]:>14}{cells[1]:>14}{ratio:>7.2f}{'<= ' + str(TARGET):>8}")
        table.append({"what": label, "baseline_s": base, "measured_s": meas, "baseline_median_s": med(base),
                      "measured_median_s": med(meas), "median_of_paired_ratios": ratio, "target": TARGET})
    print(f"save split: DeepSpeed save_checkpoint + rng file {med([a - b for a, b in zip(saves, commits)]):.3f} s, "
          f"commit() (fsync + crc32 + marker + rename + latest + catalog) {med(commits):.3f} s (medians); "
          f"plain write {gb / med(plains):.2f} GB/s, read into RAM {gb / med(reads):.2f} GB/s, "
          f"through 8 MiB {gb / med(scans):.2f} GB/s (median)")
    run.save(args.json, {"model": kind, "params": n_params, "gb": gb, "files": len(sizes), "rows": table,
                         "commit_s": commits})

if __name__ == "__main__":
    main()
