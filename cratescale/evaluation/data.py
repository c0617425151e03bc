"""What evaluation reads: the rows of a split of an embedding store (the one place rows are chosen), their
stored features, and the raw-pixel baseline of the same rows (decoded as extraction decodes them)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from cratescale.embeddings.store import EmbeddingStore, selected_rows

# The raw-pixel baseline holds (rows x 3*size^2) float32 in memory; past this it refuses with a message.
PIXEL_MAX_BYTES = 8 << 30


def split_rows(store: EmbeddingStore, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(store rows in increasing order, labels int64) of one split, committed shards only. Every loader of
    evaluation data goes through here, so a row filter applies to features and baselines alike: rows whose
    image could not be read or decoded at extraction (valid False, NaN features) are left out."""
    meta = store.metadata()
    of_split = meta.loc[meta.split == split]
    sel = of_split.loc[of_split.valid, ["row", "label"]].sort_values("row")
    if len(sel) == 0:
        have = sorted(meta.split.unique()) if len(meta) else []
        raise ValueError(f"{store.root}: no committed rows of split {split!r} with a decoded image "
                         f"({len(of_split)} rows, splits present: {have})")
    return sel.row.to_numpy(np.int64), sel.label.to_numpy().astype(np.int64)


def left_out(store: EmbeddingStore, split: str) -> int:
    """Rows of a split that `split_rows` leaves out (not decodable at extraction)."""
    meta = store.metadata()
    return int((~meta.loc[meta.split == split, "valid"]).sum())


def load_split(store: EmbeddingStore, feature: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 (n, d), labels (n,)) of one split; every shard read is checked against its commit
    marker (StoreDamagedError names the damaged ones and the rerun)."""
    rows, labels = split_rows(store, split)
    return store.read_checked(feature, rows).astype(np.float32), labels


def load_pixels(store: EmbeddingStore, manifest_path, split: str, image_size: int,
                loader_kind: str = "auto", batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, int]:
    """(flattened normalized pixels (n, 3*size^2) float32, labels, undecodable rows the loader replaced)
    of the same rows as `load_split`: the manifest rows the store was extracted from, resized and
    centre-cropped by the same eval loader."""
    from data_pipeline.loader import make_eval_loader

    rows, labels = split_rows(store, split)
    source_split = store.info.source.get("split")
    manifest_rows = selected_rows(pd.read_parquet(manifest_path, columns=["split"]), source_split)
    if len(manifest_rows) != store.info.num_rows:
        raise ValueError(f"{store.root}: built from {store.info.num_rows} rows but {manifest_path} selects "
                         f"{len(manifest_rows)}: not the manifest this store was extracted from")
    dim = 3 * image_size * image_size
    need = len(rows) * dim * 4
    if need > PIXEL_MAX_BYTES:
        raise ValueError(f"evaluate: the raw-pixel baseline of {store.root} ({split}) needs {need / 2**30:.1f} "
                         f"GiB ({len(rows)} rows x {dim}); leave 'pixels' out of evaluate.baselines")
    out = np.empty((len(rows), dim), np.float32)
    loader = make_eval_loader(manifest_path, manifest_rows[rows], batch_size, image_size, kind=loader_kind)
    at = 0
    try:
        for batch in loader:
            images = batch["images"].flatten(1).float().cpu().numpy()
            out[at:at + len(images)] = images
            at += len(images)
        bad = loader.bad_samples
    finally:
        loader.close()
    if at != len(rows):
        raise ValueError(f"evaluate: the pixel loader gave {at} of {len(rows)} rows of {manifest_path}")
    return out, labels, bad
