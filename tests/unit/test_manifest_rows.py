"""Extraction reads its manifest through the shared index (issue 31.4): the rows and metadata it writes are the
ones the pandas copy of the manifest gave (the oracle below is that earlier code), across Parquet row groups, for
every split, with and without a key column."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cratescale.embeddings.manifest_rows import ManifestRows, count_store_rows, key_group_bytes


def oracle(manifest: Path, split: str | None, start: int, stop: int) -> pd.DataFrame:
    """What extraction wrote before: a pandas copy of the manifest, rows by split, keys from key or path#offset."""
    m = pd.read_parquet(manifest)
    rows = np.arange(len(m)) if split is None else np.flatnonzero(m["split"].to_numpy() == split)
    m = m.iloc[rows[start:stop]]
    keys = (m["key"].astype(str).tolist() if "key" in m.columns
            else [p if o < 0 else f"{p}#{o}" for p, o in zip(m["path"], m["offset"])])
    return pd.DataFrame({"sample_id": m["sample_id"].to_numpy(), "key": keys,
                         "label": m["label"].to_numpy().astype(np.int32), "split": m["split"].astype(str).to_numpy()})


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, Path]:
    from data_pipeline.ingest import ingest

    root = tmp_path_factory.mktemp("rows")
    made = Path(ingest("synthetic://shapes?n=60&classes=3&size=16&seed=0", root / "data", workers=0,
                       progress=False, val_per_class=4))
    table = pq.read_table(made)
    out = {}
    for name, t in (("keyed", table), ("keyless", table.drop_columns(["key"]))):
        folder = root / name
        folder.mkdir()
        pq.write_table(t, folder / "manifest.parquet", row_group_size=7)   # shards cross row groups
        out[name] = folder / "manifest.parquet"
    return out


@pytest.mark.parametrize("kind", ["keyed", "keyless"])
@pytest.mark.parametrize("split", [None, "train", "val"])
def test_rows_and_metadata_equal_the_pandas_path(manifests, kind, split):
    manifest = manifests[kind]
    view = ManifestRows(manifest, split)
    n = count_store_rows(manifest, split)
    assert view.count == n == len(oracle(manifest, split, 0, None))
    for start in range(0, n, 9):     # store shards of 9 rows
        stop = min(n, start + 9)
        got = view.metadata(view.rows(start, stop))
        pd.testing.assert_frame_equal(got, oracle(manifest, split, start, stop), check_dtype=True)


def test_key_group_bytes_is_the_largest_groups_key_column(manifests):
    meta = pq.ParquetFile(manifests["keyed"]).metadata
    key = [meta.schema.column(i).name for i in range(meta.num_columns)].index("key")
    sizes = [meta.row_group(g).column(key).total_uncompressed_size for g in range(meta.num_row_groups)]
    assert len(sizes) > 1 and key_group_bytes(manifests["keyed"]) == max(sizes)
