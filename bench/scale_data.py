"""The synthetic inputs bench/scale.py measures against: a manifest shaped like a resharded ImageNet-21k ingest, a
checkpoint store with many commits, and a folder tree for the ingest plan.

The manifest's shape at 14,197,122 rows is the target job's (jobs/imagenet21k.yaml with `reshard`): 3,467 tar
shards, 21,841 classes, 10 val rows per class; at fewer rows shards and classes shrink in proportion (about 4,096
rows per shard and 650 per class, as in the real set), so what a row costs stays the same. Columns are what an
ingest writes (paths of tar shards + byte offsets, a JPEG's typical 110 KB, 300-500 px sides, random crc32), built
columnar (no Python loop over rows) and written with the project's own `write_manifest`.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FULL_ROWS, FULL_SHARDS, FULL_CLASSES, VAL_PER_CLASS = 14_197_122, 3_467, 21_841, 10


def _dict_strings(indices: np.ndarray, names: list[str]) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(indices, pa.int32()), pa.array(names, pa.string())).cast(pa.string())


def manifest_table(rows: int, seed: int = 0) -> pa.Table:
    """`rows` synthetic manifest rows (sorted by label, as an ingest sorts them)."""
    from data_pipeline.manifest import MANIFEST_SCHEMA

    rng = np.random.default_rng(seed)
    shards = max(1, round(FULL_SHARDS * rows / FULL_ROWS))
    classes = max(1, min(FULL_CLASSES, round(FULL_CLASSES * rows / FULL_ROWS)))
    position = np.arange(rows, dtype=np.int64)
    label = (position * classes // rows).astype(np.int32)
    shard = (position * shards // rows).astype(np.int32)
    size = rng.integers(40_000, 180_000, rows, dtype=np.int64)
    ends = np.cumsum(size + 1024)  # + a tar header and padding per member
    shard_start = np.searchsorted(shard, np.arange(shards), side="left")
    base = np.concatenate([[0], ends])[shard_start][shard]
    offset = ends - size - base  # the member's data begins after its header
    class_names = [f"n{c:08d}" for c in range(classes)]
    first_of_class = np.searchsorted(label, np.arange(classes), side="left")
    within = position - first_of_class[label]
    split = _dict_strings((within < VAL_PER_CLASS).astype(np.int32), ["train", "val"])
    class_col = _dict_strings(label, class_names)
    key = pc.binary_join_element_wise(class_col, pc.cast(pa.array(within), pa.string()), "/")
    cols = {"sample_id": pa.array(position), "path": _dict_strings(shard, [f"/data/in21k/shards/{s:06d}.tar"
                                                                           for s in range(shards)]),
            "offset": pa.array(offset), "size": pa.array(size), "label": pa.array(label), "class_name": class_col,
            "split": split, "key": key, "width": pa.array(rng.integers(300, 500, rows, dtype=np.int32)),
            "height": pa.array(rng.integers(300, 500, rows, dtype=np.int32)),
            "crc32": pa.array(rng.integers(0, 2**32, rows, dtype=np.int64))}
    return pa.table(cols, schema=MANIFEST_SCHEMA)


def build_manifest(rows: int, out_dir: Path) -> dict:
    """Writes OUT/manifest.parquet once (reused when its row count matches); returns how long it took."""
    from data_pipeline.manifest import MANIFEST_NAME, write_manifest

    stamp = out_dir / "built.json"
    if stamp.exists() and (out_dir / MANIFEST_NAME).exists() and json.loads(stamp.read_text())["rows"] == rows:
        return json.loads(stamp.read_text())
    t = time.perf_counter()
    table = manifest_table(rows)
    made = time.perf_counter() - t
    write_manifest(table, out_dir, source="/data/in21k", settings={"reshard": 256, "shard_size": 4096,
                                                                   "val_per_class": VAL_PER_CLASS})
    record = {"rows": rows, "make_s": round(made, 2), "write_s": round(time.perf_counter() - t - made, 2),
              "bytes": (out_dir / MANIFEST_NAME).stat().st_size}
    stamp.write_text(json.dumps(record))
    return record


def build_store(root: Path, commits: int, fingerprint: str) -> None:
    """A checkpoint store with `commits` small committed steps (what plan_resume scans and verifies)."""
    from cratescale.checkpoint.commit import CheckpointStore
    from cratescale.config.identity import IDENTITY_VERSION

    if (root / "built").exists():
        return
    store = CheckpointStore(root, keep_last=commits + 1)
    meta = {"global_batch": 4096, "world_size": 8,
            "identity": {"version": IDENTITY_VERSION, "manifest": fingerprint, "fields": {}}}
    for i in range(commits):
        store.save(1000 * (i + 1), lambda d: (d / "state.bin").write_bytes(bytes(4096)), meta)
    (root / "built").write_text(str(commits))


def build_tree(root: Path, files: int, per_class: int = 650) -> None:
    """An ImageFolder of `files` empty .JPEG files, `per_class` a folder (what the ingest plan walks)."""
    if (root / "built").exists():
        return
    for c in range(math.ceil(files / per_class)):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(min(per_class, files - c * per_class)):
            (folder / f"n{c:08d}_{i}.JPEG").touch()
    (root / "built").write_text(str(files))
