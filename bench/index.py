"""Nearest-neighbour index over an embedding store: build and query time, recall@10 and peak memory vs rows.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.index [--rows 10000 100000 1000000] [--dim 64] [--queries 200]
        [--data clustered|gaussian] [--out bench/results/index.json]

For each row count: a real store (EmbeddingStore, float32 as the demo extracts, shards of 65,536 rows) of
synthetic features, then in fresh processes (so each peak RSS is its own) the exact index and the IVF-PQ index
through cratescale.embeddings.index.build_index, each followed by `--queries` single-vector searches (k=10; IVF-PQ
includes its re-rank). Peak RSS is the whole process (build and queries); rss_before_build_mb is the same process
after its imports (numpy, pandas, pyarrow, zarr, faiss), before the build. Recall@10 = share of the exact index's
10 nearest that the IVF-PQ index returns, for queries drawn fresh from the same distribution (not stored rows).
Prints one JSON line per measurement; all of them go to --out.

Data: "clustered" = 1,000 Gaussian centres, each row a centre + 0.6 x N(0, 1) noise (embeddings of a labelled
set cluster); "gaussian" = isotropic N(0, 1), where every row is nearly equidistant from every other: the worst
case for any partitioning index.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.record import Run

REPO = Path(__file__).resolve().parents[1]
SHARD = 65536


def synthetic(rows: int, dim: int, data: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if data == "gaussian":
        return rng.standard_normal((rows, dim), dtype=np.float32)
    centres = np.random.default_rng(12345).standard_normal((1000, dim)).astype(np.float32)
    return centres[rng.integers(0, 1000, rows)] + 0.6 * rng.standard_normal((rows, dim), dtype=np.float32)


def make_store(root: Path, rows: int, dim: int, data: str) -> float:
    """A complete float32 store of `rows` synthetic rows, written shard by shard; returns seconds."""
    from cratescale.embeddings.store import EmbeddingStore, StoreInfo

    t = time.perf_counter()
    info = StoreInfo(num_rows=rows, dims={"cls": dim}, dtype="float32", shard_rows=SHARD, chunk_rows=1024)
    store = EmbeddingStore.create(root, info)
    for k in range(info.num_shards):
        a, b = info.shard_range(k)
        meta = pd.DataFrame({"sample_id": np.arange(a, b), "key": "k", "label": 0, "split": "train"})
        store.write_shard(k, {"cls": synthetic(b - a, dim, data, seed=k)}, meta)
    return time.perf_counter() - t


def one(root: Path, kind: str, queries: int, data: str) -> dict:
    """In its own process: build the index of `kind`, time single-vector searches, report the peak RSS."""
    from cratescale.embeddings.index import NeighbourIndex, build_index
    from cratescale.embeddings.store import EmbeddingStore

    store = EmbeddingStore(root)
    start_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the interpreter and libraries
    t = time.perf_counter()
    meta = build_index(store, "cls", kind=kind)
    build_s = time.perf_counter() - t
    index = NeighbourIndex(store, "cls")
    q = synthetic(queries, store.info.dims["cls"], data, seed=10**6)
    found, t = [], time.perf_counter()
    for vector in q:
        found.append(index.search(vector[None], 10)[1][0])
    query_ms = (time.perf_counter() - t) / queries * 1e3
    np.save(root / f"found_{kind}.npy", np.stack(found))
    row = {"rows": store.info.num_rows, "dim": store.info.dims["cls"], "data": data, "kind": kind,
           "build_s": round(build_s, 3), "query_ms": round(query_ms, 3),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "rss_before_build_mb": round(start_mb, 1),
           "params": {k: meta[k] for k in ("nlist", "m", "nbits", "nprobe", "shortlist", "train_rows") if k in meta}}
    if kind == "ivfpq":
        exact = np.load(root / "found_flat.npy")
        row["recall_at_10"] = round(float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])), 4)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--data", choices=["clustered", "gaussian"], default="clustered")
    p.add_argument("--out", default=None)
    p.add_argument("--one", nargs=2, metavar=("STORE", "KIND"), help=argparse.SUPPRESS)
    args = p.parse_args()
    run = Run()
    if args.one:
        print(json.dumps(one(Path(args.one[0]), args.one[1], args.queries, args.data)))
        return
    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="bench_index_") as tmp:
            store = Path(tmp) / "store"
            write_s = make_store(store, rows, args.dim, args.data)
            print(json.dumps({"rows": rows, "dim": args.dim, "data": args.data, "store_write_s": round(write_s, 2)}),
                  flush=True)
            for kind in ("flat", "ivfpq"):
                done = subprocess.run([sys.executable, "-m", "bench.index", "--one", str(store), kind, "--queries",
                                       str(args.queries), "--data", args.data], capture_output=True, text=True,
                                      check=True, cwd=REPO)
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
    threads = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    run.save(Path(args.out) if args.out else None, {"threads": threads, "rows": results})


if __name__ == "__main__":
    main()
