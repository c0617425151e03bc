"""Checkpoint save/load through CheckpointStore vs plain sequential file I/O of the same bytes, same run.

    .venv/bin/python bench/checkpoint.py [--reps 3] [--root DIR] [--model crate_mae_base|linear]

One process, DeepSpeed ZeRO-2 (world 1, gloo, CPU), fp32 CRATE-MAE-Base (44M params) + torch AdamW after
one step: ~0.7 GB of checkpoint. Measured --reps times, alternating with the baseline (best and median):
  save: begin + engine.save_checkpoint(tag="ds") + rank RNG file + store.commit (fsync, crc32, COMMITTED,
        rename, latest, catalog, retention)      vs  the same file sizes written in 8 MiB blocks + fsync
  load: store.latest() + load_into_engine (engine.load_checkpoint with DeepSpeed's torch.load set to mmap;
        also without it)                         vs  reading the same files in 8 MiB blocks
        (page cache dropped per file with posix_fadvise DONTNEED before each; verify() timed the same way)
Target: save and load <= 1.5x the plain baseline.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cratescale.checkpoint import CheckpointStore  # noqa: E402
from cratescale.checkpoint.universal import load_into_engine  # noqa: E402

BLOCK = 8 << 20
TARGET = 1.5


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
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533",
                      DS_ACCELERATOR="cpu")
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no 30 s JIT on gloo
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


def plain_read(paths: list[Path]) -> float:
    buf = bytearray(BLOCK)
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--root", type=Path, default=None, help="where to write (default: a tmp dir on /tmp's disk)")
    ap.add_argument("--model", default="crate_mae_base", choices=["crate_mae_base", "linear"])
    args = ap.parse_args()
    try:
        engine, n_params = make_engine(args.model)
    except ImportError:
        engine, n_params = make_engine("linear")
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.root))
    store = CheckpointStore(root / "store", keep_last=1)
    saves, commits, plains, loads, ds_loads, reads, verifies = [], [], [], [], [], [], []
    try:
        for rep in range(args.reps):
            total, commit_s, nbytes = store_save(engine, store, rep + 1)
            saves.append(total)
            commits.append(commit_s)
            sizes = [p.stat().st_size for p in files_of(store.latest().path)]
            plain_dir = root / f"plain{rep}"
            plains.append(plain_write(plain_dir, sizes))
            ckpt_files, plain_files = files_of(store.latest().path), files_of(plain_dir)
            drop_cache(ckpt_files + plain_files)
            reads.append(plain_read(plain_files))
            loads.append(store_load(engine, store, mmap=True))
            drop_cache(ckpt_files)
            ds_loads.append(store_load(engine, store, mmap=False))
            drop_cache(ckpt_files)
            t0 = time.perf_counter()
            store.verify(store.latest())
            verifies.append(time.perf_counter() - t0)
            shutil.rmtree(plain_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best, med = min, statistics.median
    gb = nbytes / 1e9
    print(f"checkpoint bench: {args.model} {n_params / 1e6:.1f}M params, ZeRO-2 world 1 fp32 + AdamW, "
          f"{gb:.3f} GB, {len(sizes)} files, {args.reps} reps; 2-core CPU VM, no GPU, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("best of reps (shared machine: the best run is the least disturbed); median in brackets")
    print(f"{'what':<52}{'baseline s':>14}{'measured s':>14}{'ratio':>13}{'target':>8}")
    rows = [("save: store (DeepSpeed+commit) / plain write+fsync", plains, saves),
            ("load: latest+load_into_engine (mmap) / plain read", reads, loads),
            ("load: same, DeepSpeed's own torch.load / plain read", reads, ds_loads),
            ("verify (cold re-read + crc32) / plain read", reads, verifies)]
    for label, base, meas in rows:
        cells = [f"{best(base):.3f} [{med(base):.2f}]", f"{best(meas):.3f} [{med(meas):.2f}]",
                 f"{best(meas) / best(base):.2f} [{med(meas) / med(base):.2f}]"]
        print(f"{label:<52}{cells[0]:>14}{cells[1]:>14}{cells[2]:>13}{'<= ' + str(TARGET):>8}")
    print(f"commit() alone (fsync + crc32 + marker + rename + latest + catalog): best {best(commits):.3f} s; "
          f"plain write {gb / best(plains):.2f} GB/s, cold read {gb / best(reads):.2f} GB/s (best)")

if __name__ == "__main__":
    main()
