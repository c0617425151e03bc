"""Ingest scaling through Ray: 2 workers vs 1 on the 1,000-photo ImageNet sample tar.

    .venv/bin/python bench/ingest.py [--repeats 2]

One local Ray (2 CPUs, 256 MB object store) is started first and warmed up, so the timings are
the ingest itself: header scan, validation (decode checks) and, with --reshard 256, re-encoding
into tar shards. Best of `repeats` runs each (the machine is shared).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_pipeline.ingest import _start_ray, run_ingest  # noqa: E402

SOURCE = "/work/shared/data/imagenet-sample.tar"


def timed(out: Path, workers: int, repeats: int, **kw) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = run_ingest(SOURCE, out, workers=workers, progress=False, **kw)
        best = min(best, time.perf_counter() - t0)
        assert res.samples == 1000
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    ray, _ = _start_ray(None, 2)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        run_ingest("synthetic://shapes?n=64&classes=4&size=32", out / "warm", workers=2, shard_size=16,
                   progress=False)  # start both Ray workers and import data_pipeline in them
        for name, kw in (("validate only (offsets into the tar)", {}),
                         ("--reshard 256 --shard-size 125", {"reshard": 256, "shard_size": 125})):
            t1 = timed(out / "w1", 1, a.repeats, **kw)
            t2 = timed(out / "w2", 2, a.repeats, **kw)
            t0 = timed(out / "w0", 0, a.repeats, **kw)
            rows.append((name, t0, t1, t2))
            assert (out / "w1" / "manifest.parquet").read_bytes() != b""
    ray.shutdown()
    print(f"\nbench/ingest.py  1000 ImageNet photos, local Ray 2 CPUs  (machine: {os.cpu_count()}-core CPU)")
    print(f"{'mode':<40} {'inline':>8} {'1 worker':>9} {'2 workers':>10} {'ratio':>6} {'target':>7} {'files/s':>8}")
    for name, t0, t1, t2 in rows:
        print(f"{name:<40} {t0:>7.2f}s {t1:>8.2f}s {t2:>9.2f}s {t1 / t2:>5.2f}x {'>=1.6x':>7} {1000 / t2:>8.0f}")


if __name__ == "__main__":
    main()
