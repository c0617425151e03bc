"""What an extraction reads of its manifest, through the manifest's shared index (data_pipeline/manifest_index.py).

Store row r holds manifest row rows[r], rows = the manifest rows of the store's split in file order (every row when
the split is None). Before, every actor held a pandas copy of the manifest's metadata columns: at 14.2M rows a few
GB per actor, growing with the manifest and outside the memory plan. Here an actor reads, per shard, only the rows
it writes: ids, labels and locations from the index (pread, shared through the page cache by every process of the
node), each row's split from the index's split files (a binary search), and keys from the one Parquet row group
that holds them (at most one group is kept: what the memory plan counts, `key_group_bytes`).
"""
from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.manifest_index import Column, ManifestIndex


def count_store_rows(manifest: Path | str, split: str | None) -> int:
    """Rows a store of `split` holds (the index's counts, no column is read)."""
    index = ManifestIndex(manifest)
    return index.total_rows if split is None else len(index.split_rows(split))


def key_group_bytes(manifest: Path | str) -> int:
    """Uncompressed bytes of the largest row group's key column (or path column, for manifests without keys): the
    most of the manifest an actor holds at once, besides the index's pages (page cache, not its own)."""
    meta = pq.ParquetFile(manifest).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    column = names.index("key") if "key" in names else names.index("path")
    return max((meta.row_group(g).column(column).total_uncompressed_size for g in range(meta.num_row_groups)),
               default=0)


class ManifestRows:
    """The store's rows of a manifest and their metadata, read on demand (see the module docstring)."""

    def __init__(self, manifest: Path | str, split: str | None):
        self.manifest, self.split = Path(manifest), split
        self.index = ManifestIndex(manifest)
        self._rows = None if split is None else self.index.split_rows(split)
        # every split's rows, opened once: a store of all rows names each row's split, shard by shard
        self._split_members = {} if split is not None else {name: self.index.split_rows(name)
                                                            for name in self.index.meta["splits"]}
        self.count = self.index.total_rows if split is None else len(self._rows)
        parquet = pq.ParquetFile(self.manifest)
        self._has_key = "key" in parquet.schema_arrow.names
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
        self._group_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._group: tuple[int, pa.ChunkedArray] | None = None   # (row group, its keys): the one group held

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Manifest rows of store rows [start, stop)."""
        if self._rows is None:
            return np.arange(start, stop, dtype=np.int64)
        return np.asarray(self._rows[start:stop], dtype=np.int64)

    def metadata(self, rows: np.ndarray) -> pd.DataFrame:
        """sample_id, key, label and split of manifest rows `rows` (ascending, as a store's rows are)."""
        return pd.DataFrame({"sample_id": _span(self.index.sample_id, rows), "key": self._keys(rows),
                             "label": _span(self.index.label, rows).astype(np.int32), "split": self._splits(rows)})

    def _splits(self, rows: np.ndarray) -> np.ndarray:
        if self.split is not None:
            return np.full(len(rows), self.split, dtype=object)
        names = np.full(len(rows), "None", dtype=object)  # a row of no split, as pandas' astype(str) wrote it
        for name, members in self._split_members.items():
            lo, hi = bisect.bisect_left(members, rows[0]), bisect.bisect_right(members, rows[-1])
            names[np.isin(rows, np.asarray(members[lo:hi]))] = name
        return names

    def _keys(self, rows: np.ndarray) -> list[str]:
        if not self._has_key:
            return [f"{self.index.path(r)}#{o}" if o >= 0 else self.index.path(r)
                    for r, o in zip(rows.tolist(), _span(self.index.offset, rows).tolist())]
        groups = np.searchsorted(self._group_starts, rows, side="right") - 1
        keys: list[str] = []
        for g in np.unique(groups):
            local = pa.array(rows[groups == g] - self._group_starts[g])
            keys += [str(k) for k in self._group_keys(int(g)).take(local).to_pylist()]
        return keys

    def _group_keys(self, group: int) -> pa.ChunkedArray:
        if self._group is None or self._group[0] != group:
            self._group = None  # the old group goes before the new one is read: one group held at most
            column = pq.ParquetFile(self.manifest).read_row_group(group, columns=["key"]).column(0)
            self._group = (group, column)
        return self._group[1]


def _span(column: Column, rows: np.ndarray) -> np.ndarray:
    """column[rows] for ascending rows, in one read of the span they cover (a shard's rows nearly touch)."""
    if len(rows) == 0:
        return np.asarray(column[0:0])
    first = int(rows[0])
    return np.asarray(column[first:int(rows[-1]) + 1])[rows - first]
