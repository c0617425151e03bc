"""A store's features with ids and labels as plain arrays for other tools: `.npy` files or one Parquet file.

  --format npy      OUT/<feature>.npy [n, d] (the store's dtype), OUT/sample_id.npy, label.npy, row.npy (int64),
                    OUT/key.txt (one key per line); row i of every file is the same sample
  --format parquet  OUT/embeddings.parquet: sample_id, key, label, split, row, and one fixed-size list column per
                    feature; one row group per store shard

Only rows with features are written (committed shards, images that decoded); how many are left out is returned.
Written shard by shard (memory: one shard), into `OUT.tmp` renamed to OUT when complete.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cratescale.embeddings.store import EmbeddingStore, StoreError

FORMATS = ("npy", "parquet")


def _shards(store: EmbeddingStore, features: Sequence[str]):
    """(metadata of the shard's kept rows, {feature: rows}) per committed shard."""
    meta = store.metadata()
    for k in sorted(store.committed()):
        start, stop = store.info.shard_range(k)
        m = meta.loc[(meta.row >= start) & (meta.row < stop) & meta.valid]
        local = m.row.to_numpy() - start
        yield m, {f: store.read(f, slice(start, stop))[local] for f in features}


def _write_npy(store: EmbeddingStore, features: Sequence[str], n: int, out: Path) -> None:
    arrays = {f: np.lib.format.open_memmap(out / f"{f}.npy", mode="w+", dtype=store.info.dtype,
                                           shape=(n, store.info.dims[f])) for f in features}
    ids = {c: np.lib.format.open_memmap(out / f"{c}.npy", mode="w+", dtype=np.int64, shape=(n,))
           for c in ("sample_id", "label", "row")}
    at = 0
    with open(out / "key.txt", "w") as keys:
        for m, feats in _shards(store, features):
            end = at + len(m)
            for f, a in feats.items():
                arrays[f][at:end] = a
            for c, a in ids.items():
                a[at:end] = m[c].to_numpy()
            keys.writelines(f"{key}\n" for key in m.key)
            at = end
    for a in (*arrays.values(), *ids.values()):
        a.flush()


def _write_parquet(store: EmbeddingStore, features: Sequence[str], out: Path) -> None:
    fields = [("sample_id", pa.int64()), ("key", pa.string()), ("label", pa.int32()), ("split", pa.string()),
              ("row", pa.int64())]
    schema = pa.schema(fields + [(f, pa.list_(pa.from_numpy_dtype(np.dtype(store.info.dtype)), store.info.dims[f]))
                                 for f in features])
    with pq.ParquetWriter(out / "embeddings.parquet", schema) as writer:
        for m, feats in _shards(store, features):
            cols = [pa.array(m[name].to_numpy(), type=t) for name, t in fields]
            cols += [pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(feats[f]).reshape(-1)),
                                                       store.info.dims[f]) for f in features]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))


def export_tables(store: EmbeddingStore, out_dir: Path | str, fmt: str,
                  features: Sequence[str] | None = None) -> tuple[Path, int, int]:
    """(out_dir, rows written, rows left out) for `features` (default: all) of the store in `fmt`."""
    if fmt not in FORMATS:
        raise StoreError(f"export: format must be one of {FORMATS}, got {fmt!r}")
    features = list(features or store.info.dims)
    unknown = [f for f in features if f not in store.info.dims]
    if unknown:
        raise StoreError(f"{store.root}: no feature {unknown[0]!r} (have {sorted(store.info.dims)})")
    out = Path(out_dir)
    if out.exists():
        raise StoreError(f"export: {out} already exists; name a new folder")
    meta = store.metadata()
    n = int(meta.valid.sum())
    tmp = out.with_name(f"{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if fmt == "npy":
            _write_npy(store, features, n, tmp)
        else:
            _write_parquet(store, features, tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, n, store.info.num_rows - n
