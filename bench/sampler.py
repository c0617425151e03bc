"""Sampler and manifest at ImageNet-21k scale (14.2M samples, W=512).

    .venv/bin/python -m bench.sampler [--n 14200000] [--world 512] [--batch 4096] [--skip-manifest]

Measures: GlobalSampler construction + one epoch's permutation + every rank's slices (time and
peak traced memory); per-sample augmentation parameters; a 14.2M-row manifest built by the same
columnar code ingest uses (sort + labels), written to Parquet and read back (time, size).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench.record import Run, add_json_arg
from data_pipeline.augment import train_params
from data_pipeline.manifest import ROWS_SCHEMA, build_table, read_manifest, write_manifest
from data_pipeline.sampler import GlobalSampler


def _epoch(n: int, world: int, batch: int) -> tuple[GlobalSampler, np.ndarray]:
    s = GlobalSampler(n, seed=0, global_batch=batch)
    s.permutation(0)
    return s, s.epoch_rank_slices(0, world)  # (steps, W, B/W) view: every rank's slice of every step


def bench_sampler(n: int, world: int, batch: int) -> list[tuple]:
    t0 = time.perf_counter()
    s = GlobalSampler(n, seed=0, global_batch=batch)
    s.permutation(0)
    t_perm = time.perf_counter() - t0
    slices = s.epoch_rank_slices(0, world)
    t_view = time.perf_counter() - t0
    t1 = time.perf_counter()
    for g in range(s.steps_per_epoch):
        for r in range(world):
            s.rank_slice(0, g, r, world)
    t_calls = time.perf_counter() - t1
    t1 = time.perf_counter()
    for g in range(s.steps_per_epoch):
        s.rank_slice(0, g, 7, world)
    t_rank = time.perf_counter() - t1
    flat = np.sort(slices.reshape(-1))  # coverage check, outside the timings
    assert len(flat) == s.steps_per_epoch * batch and (np.diff(flat) > 0).all()
    del s, slices, flat
    tracemalloc.start()
    s2, _ = _epoch(n, world, batch)
    for g in range(s2.steps_per_epoch):
        s2.rank_slice(0, g, 7, world)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    aug = []
    for b in (batch // world, 256):
        ids = np.arange(b)
        t2 = time.perf_counter()
        reps = 200
        for k in range(reps):
            train_params(0, 1, ids + k * b, np.full(b, 500), np.full(b, 375), 196)
        aug.append((f"augment params per sample (batch {b}, 196 patches)",
                    f"{(time.perf_counter() - t2) / (reps * b) * 1e6:.1f} us", ""))
    steps = n // batch
    return [("sampler: construct + epoch permutation", f"{t_perm:.2f} s", "< 2 s"),
            (f"sampler: + all {steps} x {world} rank slices (view)", f"{t_view:.2f} s", "< 2 s"),
            ("sampler: one rank's slices for the epoch", f"{t_rank * 1e3:.1f} ms", ""),
            (f"sampler: {steps * world / 1e6:.2f}M rank_slice() calls", f"{t_calls:.2f} s", ""),
            ("sampler: peak traced memory", f"{peak / 2**20:.0f} MB", "< 500 MB")] + aug


def synthetic_rows(n: int, classes: int = 21841, per_shard: int = 1000) -> pa.Table:
    """Rows like a resharded IN-21k ingest: shard paths, offsets, class names, keys."""
    rng = np.random.default_rng(0)
    cls = np.sort(rng.integers(0, classes, n))
    names = np.array([f"n{10000000 + c:08d}" for c in range(classes)], dtype=object)
    shard = np.arange(n) // per_shard
    paths = pa.array([f"/data/in21k/shards/{i:06d}_000.tar" for i in range(shard[-1] + 1)]).take(pa.array(shard))
    keys = pa.array([f"{names[c]}/{names[c]}_{i}.JPEG" for i, c in enumerate(cls)])
    return pa.table({"path": paths, "offset": (np.arange(n) % per_shard) * 110_000 + 1536,
                     "size": rng.integers(20_000, 200_000, n), "class_name": pa.array(names[cls]),
                     "key": keys, "width": np.full(n, 500, np.int32), "height": np.full(n, 375, np.int32),
                     "crc32": rng.integers(0, 2**32, n)},
                    schema=ROWS_SCHEMA)


def bench_manifest(n: int) -> list[tuple]:
    t0 = time.perf_counter()
    rows = synthetic_rows(n)
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = build_table([rows])
    t_build = time.perf_counter() - t0
    del rows
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        path = write_manifest(table, Path(d))
        t_write = time.perf_counter() - t0
        size = os.path.getsize(path)
        del table
        t0 = time.perf_counter()
        back = read_manifest(path)
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        read_manifest(path, columns=["sample_id", "path", "offset", "size", "label", "split"])
        t_read_loader = time.perf_counter() - t0
        assert back.num_rows == n
    return [(f"manifest {n / 1e6:.1f}M rows: generate rows", f"{t_gen:.1f} s", ""),
            ("manifest: sort + number + label (build_table)", f"{t_build:.1f} s", ""),
            ("manifest: Parquet write (zstd)", f"{t_write:.1f} s", ""),
            ("manifest: Parquet size", f"{size / 2**20:.0f} MB", ""),
            ("manifest: Parquet read, all columns", f"{t_read:.1f} s", ""),
            ("manifest: Parquet read, loader columns", f"{t_read_loader:.1f} s", "")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=14_200_000)
    ap.add_argument("--world", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--skip-manifest", action="store_true")
    add_json_arg(ap, "sampler")
    a = ap.parse_args()
    run = Run()
    rows = bench_sampler(a.n, a.world, a.batch)
    if not a.skip_manifest:
        rows += bench_manifest(a.n)
    print(f"\nbench/sampler.py  N={a.n}  W={a.world}  B={a.batch}  (machine: {os.cpu_count()}-core CPU)")
    print(f"{'what':<52} {'measured':>12} {'target':>10}")
    for what, val, target in rows:
        print(f"{what:<52} {val:>12} {target:>10}")
    run.save(a.json, {"n": a.n, "world": a.world, "batch": a.batch,
                      "rows": [{"what": w, "measured": v, "target": t} for w, v, t in rows]})


if __name__ == "__main__":
    main()
