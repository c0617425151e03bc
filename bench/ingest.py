"""Ingest scaling through Ray: 2 workers vs 1 on the 1,000-photo ImageNet sample tar.

    .venv/bin/python -m bench.ingest [--repeats 2]

One local Ray (2 CPUs, 256 MB object store) is started first and warmed up, so the timings are
the ingest itself: header scan, validation (decode checks) and, with --reshard 256, re-encoding
into tar shards. Best of `repeats` runs each (the machine is shared).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from bench.record import Run, add_json_arg
from data_pipeline.ingest import _start_ray, run_ingest

SOURCE = "/work/shared/data/imagenet-sample.tar"


def timed(out: Path, workers: int, **kw) -> float:
    t0 = time.perf_counter()
    res = run_ingest(SOURCE, out, workers=workers, progress=False, **kw)
    assert res.samples == 1000
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    add_json_arg(ap, "ingest")
    a = ap.parse_args()
    run = Run()
    ray, _ = _start_ray(None, 2)
    rows, raw = [], []
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        run_ingest("synthetic://shapes?n=64&classes=4&size=32", out / "warm", workers=2, shard_size=16,
                   progress=False)  # start both Ray workers and import data_pipeline in them
        for name, kw in (("validate only (offsets into the tar)", {}),
                         ("--reshard 256 --shard-size 125", {"reshard": 256, "shard_size": 125})):
            times: dict[int, list[float]] = {1: [], 2: [], 0: []}
            for _ in range(a.repeats):  # interleaved, best of `repeats`: the machine is shared
                for w in times:
                    times[w].append(timed(out / f"w{w}", w, **kw))
            rows.append((name, min(times[0]), min(times[1]), min(times[2])))
            raw.append({"mode": name, "seconds_by_workers": {"inline": times[0], "1": times[1], "2": times[2]}})
            same = [pq.read_table(out / f"w{w}" / "manifest.parquet").drop_columns(["path"]) for w in (1, 2)]
            assert same[0].equals(same[1])  # worker count never changes the manifest
    ray.shutdown()
    print(f"\nbench/ingest.py  1000 ImageNet photos, local Ray 2 CPUs  (machine: {os.cpu_count()}-core CPU)")
    print(f"{'mode':<40} {'inline':>8} {'1 worker':>9} {'2 workers':>10} {'ratio':>6} {'target':>7} {'files/s':>8}")
    for name, t0, t1, t2 in rows:
        print(f"{name:<40} {t0:>7.2f}s {t1:>8.2f}s {t2:>9.2f}s {t1 / t2:>5.2f}x {'>=1.6x':>7} {1000 / t2:>8.0f}")
    rows = [{"mode": n, "best_inline_s": t0, "best_1_worker_s": t1, "best_2_workers_s": t2, "ratio_1_over_2": t1 / t2,
             "target": ">= 1.6"} for n, t0, t1, t2 in rows]
    run.save(a.json, {"source": SOURCE, "repeats": a.repeats, "raw": raw, "rows": rows})


if __name__ == "__main__":
    main()
