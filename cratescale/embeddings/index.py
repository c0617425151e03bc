"""A FAISS nearest-neighbour index over one feature of an embedding store, kept beside it in `<store>/index/`.

  <store>/index/<feature>.faiss        the index; ids are store rows
  <store>/index/<feature>.vectors.npy  IVF-PQ only: the unit vectors as float16 [rows, d], read back (memory-mapped)
                                       to re-rank a shortlist exactly
  <store>/index/<feature>.json         what it indexes: store fingerprint, feature, metric, kind and its
                                       parameters, rows

Metric: cosine, as the kNN evaluation (evaluation/knn.py). Vectors are L2-normalised and searched by L2, whose
order on unit vectors is the cosine order; the distance reported is 1 - cosine similarity (= |a - b|^2 / 2).

Kind, chosen by size and stated in the .json: exact (IndexFlatL2) up to EXACT_MAX_ROWS rows, which holds every
vector in memory (4 bytes x d per row); above it IVF-PQ (d/4 sub-quantizers of 8 bits: 1 byte per 4 dims, 16x
smaller than float32) whose shortlist of candidates is re-ranked with the float16 vectors kept on disk beside it:
PQ alone found 61% of the exact top 10 on clustered 64-d data (100,000 rows), its top 50 re-ranked 98%. Reading
the shortlist from the store itself instead took 55 ms a query (a 1,024-row chunk decompressed per candidate), the
memory-mapped copy well under 1 ms (BENCHMARKS.md "Nearest-neighbour index"). The index is built shard by shard:
memory is the index plus one shard of float32 (and, for IVF-PQ, its training sample). Rows with NaN features
(undecodable images, uncommitted shards) are left out and counted.

An index whose recorded store fingerprint (store.json and every commit marker) is not the store's now is refused.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import faiss
import numpy as np

from cratescale.embeddings.store import EmbeddingStore, StoreError
from cratescale.files import fsync_path, replace_durable

FORMAT = "cratescale-index"
VERSION = 1
EXACT_MAX_ROWS = 2_000_000  # 0.5 GiB of float32 at d=64, 5.7 GiB at d=768: beyond it, IVF-PQ
TRAIN_PER_LIST = 64         # IVF training rows per list (FAISS warns below 39)
METRIC = "cosine (distance = 1 - cosine similarity)"


class IndexStaleError(StoreError):
    """The index was built from an older state of its store (or another store)."""


def store_fingerprint(store: EmbeddingStore) -> str:
    """sha256 of store.json and every commit marker (each holds its shard's crc32s): changes when a shard is
    (re)written or the store is recreated."""
    h = hashlib.sha256((store.root / "store.json").read_bytes())
    for marker in sorted((store.root / "commits").glob("shard_*.json")):
        h.update(marker.name.encode() + b"\0" + marker.read_bytes())
    return h.hexdigest()


def index_paths(store: EmbeddingStore, feature: str) -> tuple[Path, Path]:
    """(<store>/index/<feature>.faiss, <store>/index/<feature>.json)."""
    base = store.root / "index"
    return base / f"{feature}.faiss", base / f"{feature}.json"


def _vectors_path(index_path: Path) -> Path:
    return index_path.with_name(index_path.name.replace(".faiss", ".vectors.npy"))


def _publish(tmp: Path, final: Path) -> None:
    fsync_path(tmp)
    os.replace(tmp, final)


def plan(rows: int, d: int, kind: str = "auto") -> dict[str, Any]:
    """The index kind and its parameters for `rows` vectors of width d, with the reason."""
    if kind == "auto":
        kind = "flat" if rows <= EXACT_MAX_ROWS else "ivfpq"
        why = f"{rows:,} rows {'<=' if kind == 'flat' else '>'} {EXACT_MAX_ROWS:,}"
    else:
        why = "asked for"
    if kind == "flat":
        return {"kind": "flat", "why": f"exact search: {why}"}
    if kind != "ivfpq":
        raise ValueError(f"index kind must be auto, flat or ivfpq, got {kind!r}")
    m = next(m for m in range(max(1, d // 4), 0, -1) if d % m == 0)  # about 4 dims per sub-quantizer
    nlist = max(1, 2 ** round(math.log2(max(1.0, math.sqrt(rows)))))
    train = min(rows, TRAIN_PER_LIST * nlist)
    nbits = min(8, max(2, int(math.log2(max(4, train) / 39))))  # 39 training rows per PQ centroid at least
    return {"kind": "ivfpq", "why": f"approximate (IVF-PQ, exact re-rank of a shortlist): {why}", "nlist": nlist,
            "m": m, "nbits": nbits, "nprobe": min(nlist, 32), "shortlist": 50, "train_rows": train}


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _blocks(store: EmbeddingStore, feature: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(store rows, unit float32 vectors) of each committed shard, NaN rows left out."""
    for k in sorted(store.committed()):
        start, stop = store.info.shard_range(k)
        x = store.read(feature, slice(start, stop)).astype(np.float32)
        ok = ~np.isnan(x).any(axis=1)
        yield np.arange(start, stop, dtype=np.int64)[ok], _unit(x[ok])


class _VectorFile:
    """The float16 copy [store rows, d] written block by block with pwrite: a memory map would hold every
    written page in this process's memory until the end (+128 MB at 10^6 x 64)."""

    def __init__(self, path: Path, rows: int, d: int):
        self.path, self.d = path, d
        header = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, d))  # zero-filled, sparse
        self.offset = header.offset
        del header
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, rows: np.ndarray, x: np.ndarray) -> None:
        if len(rows):
            block = np.zeros((int(rows[-1] - rows[0]) + 1, self.d), np.float16)
            block[rows - rows[0]] = x
            os.pwrite(self.fd, block.tobytes(), self.offset + int(rows[0]) * self.d * 2)

    def close(self) -> None:
        os.close(self.fd)


def _train_sample(store: EmbeddingStore, feature: str, rows: int, want: int) -> np.ndarray:
    """An evenly strided sample of about `want` rows, read shard by shard."""
    stride = max(1, rows // want)
    return np.concatenate([x[::stride].copy() for _, x in _blocks(store, feature)])[:want]  # copy: no whole shard kept


def _new_index(store: EmbeddingStore, feature: str, p: dict[str, Any], rows: int) -> faiss.Index:
    d = store.info.dims[feature]
    if p["kind"] == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatL2(d))
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, p["nlist"], p["m"], p["nbits"])
    index.train(_train_sample(store, feature, rows, p["train_rows"]))
    index.nprobe = p["nprobe"]
    return index


def _fill(store: EmbeddingStore, feature: str, index: faiss.Index, vectors: _VectorFile | None) -> int:
    """Add every committed finite row, shard by shard; returns how many."""
    added = 0
    for rows, x in _blocks(store, feature):
        index.add_with_ids(x, rows)
        if vectors is not None:
            vectors.write(rows, x)
        added += len(rows)
    if added == 0:
        raise StoreError(f"{store.root}: feature {feature!r} has no committed row with finite values to index")
    return added


def build_index(store: EmbeddingStore, feature: str, kind: str = "auto",
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build and save the index of `feature`; returns its metadata (what the .json holds)."""
    if feature not in store.info.dims:
        raise StoreError(f"{store.root}: no feature {feature!r} (have {sorted(store.info.dims)})")
    fingerprint, t0 = store_fingerprint(store), time.perf_counter()
    d = store.info.dims[feature]
    n = sum(b - a for a, b in map(store.info.shard_range, store.committed()))  # committed rows pick the kind
    if n == 0:
        raise StoreError(f"{store.root}: no committed shard to index yet (`python -m cratescale.embeddings info`)")
    p = plan(max(n, 1), d, kind)
    index = _new_index(store, feature, p, n)
    path, meta_path = index_paths(store, feature)
    path.parent.mkdir(exist_ok=True)
    tmp, vectors_tmp = (f.with_name(f".{f.name}.tmp{os.getpid()}") for f in (path, _vectors_path(path)))
    vectors = None if p["kind"] == "flat" else _VectorFile(vectors_tmp, store.info.num_rows, d)
    try:
        added = _fill(store, feature, index, vectors)
        meta_path.unlink(missing_ok=True)  # first: an old .json never describes the new files
        if vectors is not None:
            vectors.close()
            vectors = None
            _publish(vectors_tmp, _vectors_path(path))
        faiss.write_index(index, str(tmp))
        _publish(tmp, path)
    finally:
        if vectors is not None:
            vectors.close()
        for f in (tmp, vectors_tmp):
            f.unlink(missing_ok=True)
    meta = {"format": FORMAT, "version": VERSION, "store": str(store.root.resolve()),
            "store_fingerprint": fingerprint, "feature": feature, "dim": d, "metric": METRIC, **p,
            "rows": added, "left_out": store.info.num_rows - added, "faiss": faiss.__version__,
            "built_s": round(time.perf_counter() - t0, 3), "file": path.name}
    replace_durable(meta_path, json.dumps(meta, indent=1))  # last: an index without its .json is not one
    if log:
        log(f"index {path}: {p['kind']} ({p['why']}), {added:,} rows of {feature!r} (d={d}), "
            f"{meta['left_out']:,} left out, {meta['built_s']:.1f} s")
    return meta


class NeighbourIndex:
    """A saved index checked against its store; `search` gives store rows and cosine distances."""

    def __init__(self, store: EmbeddingStore, feature: str):
        path, meta_path = index_paths(store, feature)
        if not meta_path.is_file() or not path.is_file():
            raise StoreError(f"{store.root}: no index of feature {feature!r}; build it with "
                             f"`python -m cratescale.embeddings index {store.root} --feature {feature}`")
        self.store, self.feature = store, feature
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("store_fingerprint") != store_fingerprint(store):
            raise IndexStaleError(f"{path}: built from an older state of {store.root} (the store changed since: "
                                  f"shards rewritten or added); rebuild it with `python -m cratescale.embeddings "
                                  f"index {store.root} --feature {feature}`")
        self.index = faiss.read_index(str(path))
        if self.meta["kind"] != "flat":
            self.vectors = np.load(_vectors_path(path), mmap_mode="r")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances (q, k) = 1 - cosine, store rows (q, k)) of the k nearest rows, nearest first; -1 where
        fewer than k rows exist."""
        q = _unit(np.atleast_2d(queries))
        if self.meta["kind"] == "flat":
            dist, rows = self.index.search(q, k)
            return np.where(rows >= 0, dist / 2, np.inf), rows
        _, cand = self.index.search(q, max(k, self.meta["shortlist"]))
        return self._rerank(q, cand, k)

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Distances of the shortlist from the float16 unit vectors (one sorted read for all queries)."""
        wanted = np.unique(cand[cand >= 0])
        vectors = self.vectors[wanted].astype(np.float32)
        dist, rows = np.full((len(q), k), np.inf), np.full((len(q), k), -1, dtype=np.int64)
        for i, c in enumerate(cand):
            c = c[c >= 0]
            d = 1.0 - vectors[np.searchsorted(wanted, c)] @ q[i]
            order = np.argsort(d, kind="stable")[:k]
            dist[i, :len(order)], rows[i, :len(order)] = d[order], c[order]
        return dist, rows
