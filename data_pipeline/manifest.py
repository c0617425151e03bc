"""The Parquet manifest (one row per sample) and the rejected-files list.

Contract columns: sample_id, path, offset, size, label, class_name, split. Extra columns: key (the
sample's name inside its source, used to sort and for embedding metadata), width and height (pixel
size from the header, so crop windows can honour the image's aspect ratio without decoding), crc32 (of
the stored bytes).

The file's Parquet metadata records the source it was built from, the directory it was written to, the
ingest settings that shaped it (split, reshard, shard size, filters) and a fingerprint of its content
(sample ids, labels, sizes, checksums, splits; no paths): a moved dataset keeps its fingerprint, changed
samples change it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .durable import replaced_by

MANIFEST_NAME = "manifest.parquet"
REJECTED_NAME = "rejected.parquet"

MANIFEST_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("path", pa.string()),
    ("offset", pa.int64()),
    ("size", pa.int64()),
    ("label", pa.int32()),
    ("class_name", pa.string()),
    ("split", pa.string()),
    ("key", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("crc32", pa.int64()),
])
REJECTED_SCHEMA = pa.schema([("path", pa.string()), ("member", pa.string()), ("reason", pa.string())])


class ManifestError(ValueError):
    """A manifest is missing, malformed or inconsistent."""


def class_sort_key(name: str) -> tuple:
    """Numeric class names sort numerically (webdataset .cls labels), others as text."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    # Readers never see a half-written file, and a rerun that produces the same rows produces the same
    # bytes (no timestamps in Parquet metadata).
    with replaced_by(path) as f:
        pq.write_table(table, f, compression="zstd", row_group_size=1 << 20)


ROWS_SCHEMA = pa.schema([("path", pa.string()), ("offset", pa.int64()), ("size", pa.int64()),
                         ("class_name", pa.string()), ("key", pa.string()), ("width", pa.int32()),
                         ("height", pa.int32()), ("crc32", pa.int64())])


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Unnumbered rows as produced by ingest tasks (columnar: cheap to ship and to concatenate)."""
    return pa.Table.from_pylist(rows, schema=ROWS_SCHEMA)


def build_table(parts: list[pa.Table], val_per_class: int = 0) -> pa.Table:
    """Unnumbered row tables -> the sorted manifest table.

    Sorting by (class, key, path, offset) before numbering makes sample_id stable across reruns
    and worker counts. Labels index the sorted class names (numeric names numerically). The
    `val_per_class` samples of each class with the smallest hash of their key are "val", a choice
    that stays put when other files come and go. Columnar throughout: 14M rows take seconds.
    """
    t = pa.concat_tables(parts).cast(ROWS_SCHEMA) if parts else ROWS_SCHEMA.empty_table()
    classes = sorted(t["class_name"].unique().to_pylist(), key=class_sort_key)
    label = pc.index_in(t["class_name"], value_set=pa.array(classes, pa.string())).cast(pa.int32())
    t = t.append_column("label", label)
    t = t.sort_by([("label", "ascending"), ("key", "ascending"), ("path", "ascending"), ("offset", "ascending")])
    n = t.num_rows
    cols = {"sample_id": pa.array(np.arange(n, dtype=np.int64)), "path": t["path"], "offset": t["offset"],
            "size": t["size"], "label": t["label"], "class_name": t["class_name"],
            "split": split_column(t, val_per_class), "key": t["key"], "width": t["width"], "height": t["height"],
            "crc32": t["crc32"]}
    return pa.table(cols, schema=MANIFEST_SCHEMA)


def split_column(table: pa.Table, val_per_class: int) -> pa.Array:
    """The `split` of each row of a label-sorted table: per class, the `val_per_class` rows with the smallest
    hash of their key are "val" (a pure function of key and label, so a re-split equals a rebuild's split)."""
    n = table.num_rows
    split = np.full(n, "train", dtype=object)
    if val_per_class > 0 and n:
        h = np.fromiter((_stable_hash(k) for k in table["key"].to_pylist()), dtype=np.uint64, count=n)
        labels = table["label"].to_numpy()
        order = np.lexsort((np.arange(n), h, labels))  # by class, then hash
        starts = np.searchsorted(labels[order], labels[order], side="left")
        split[order[np.arange(n) - starts < val_per_class]] = "val"
    return pa.array(split, pa.string())


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


# Parquet key-value metadata of a manifest (see the module docstring).
_META_SOURCE, _META_ROOT, _META_FINGERPRINT = b"cratescale.source", b"cratescale.root", b"cratescale.fingerprint"
_META_SETTINGS = b"cratescale.settings"
# The one ingest setting a re-split applies without reading a sample again.
SPLIT_SETTING = "val_per_class"
# What the content fingerprint covers: what the sampler and the loader see of each sample, never where it lives.
IDENTITY_COLUMNS = ("sample_id", "label", "size", "crc32", "split")


def source_id(source: str) -> str:
    """A source as a manifest records it: URLs as given, paths absolute with symlinks resolved."""
    return source if "://" in source else str(Path(source).expanduser().resolve())


def content_fingerprint(table: pa.Table) -> str:
    """sha256 over the identity columns (fixed dtypes, row order): equal tables of samples, equal prints."""
    table = table.select(list(IDENTITY_COLUMNS)).cast(pa.schema([MANIFEST_SCHEMA.field(c) for c in IDENTITY_COLUMNS]))
    digest = hashlib.sha256()
    for name in IDENTITY_COLUMNS:
        column = table[name].combine_chunks()
        values = pc.equal(column, "train") if name == "split" else column
        digest.update(name.encode() + np.ascontiguousarray(values.to_numpy(zero_copy_only=False)).tobytes())
    return digest.hexdigest()[:16]


def write_manifest(table: pa.Table, out_dir: Path, source: str | None = None,
                   settings: dict[str, object] | None = None) -> Path:
    """Writes OUT/manifest.parquet with its metadata: `source` (None: unknown), OUT, the ingest `settings` that
    shaped it (None: not recorded) and the fingerprint."""
    out_dir = Path(os.path.abspath(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST_NAME
    table = table.cast(MANIFEST_SCHEMA)
    meta = {_META_ROOT: str(out_dir).encode(), _META_FINGERPRINT: content_fingerprint(table).encode()}
    if source is not None:
        meta[_META_SOURCE] = source_id(source).encode()
    if settings is not None:
        meta[_META_SETTINGS] = json.dumps(settings, sort_keys=True).encode()
    _atomic_write_table(table.replace_schema_metadata(meta), path)
    from .manifest_index import build_index  # imports this module: a function-level import breaks the cycle
    build_index(path, table)  # every rank and loader worker maps it instead of reading the table again
    return path


@dataclass(frozen=True)
class ManifestInfo:
    """What a manifest says about itself (None: written by an ingest that did not record it)."""
    source: str | None
    root: str | None
    fingerprint: str | None
    settings: dict | None = None  # the ingest settings that shaped it: val_per_class, reshard, shard_size, ...


def manifest_info(path: str | Path) -> ManifestInfo:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    meta = pq.read_schema(path).metadata or {}
    get = (lambda key: meta[key].decode() if key in meta else None)
    settings = get(_META_SETTINGS)
    return ManifestInfo(get(_META_SOURCE), get(_META_ROOT), get(_META_FINGERPRINT),
                        json.loads(settings) if settings else None)


def manifest_fingerprint(path: str | Path) -> str:
    """The recorded content fingerprint; computed for a manifest that has checksums but no record of it."""
    recorded = manifest_info(path).fingerprint
    if recorded is not None:
        return recorded
    table = read_manifest(path)
    if "crc32" not in table.column_names:
        raise ManifestError(f"{path}: no crc32 column (written by an older ingest), so its content cannot be "
                            f"fingerprinted; run the ingest stage again")
    return content_fingerprint(table)


def settings_changed(have: dict, want: dict) -> dict[str, tuple]:
    """{name: (recorded, wanted)} for each recorded setting that `want` sets otherwise. A setting the record
    leaves out did not shape the manifest (shard_size of a folder read in place, quality without reshard)."""
    return {k: (have[k], want[k]) for k in sorted(have) if k in want and have[k] != want[k]}


def manifest_action(path: str | Path, source: str, root: str | Path,
                    settings: dict | None = None) -> tuple[str, str]:
    """What to do with the manifest at `path` for a job reading `source` into `root` with ingest `settings`
    (None: not compared): ("keep" | "rebase" | "resplit" | "build", why). Never "keep" a manifest of another
    (or an unrecorded) source, or one made with other settings; only a changed split is re-split in place."""
    path = Path(path)
    if not path.exists():
        return "build", f"no manifest at {path}"
    info = manifest_info(path)
    if info.source is None:
        return "build", f"{path} does not record its source (written by an older ingest)"
    if info.source != source_id(source):
        return "build", f"{path} was built from {info.source}, the job reads {source_id(source)}"
    if settings is not None:
        if info.settings is None:
            return "build", f"{path} does not record its ingest settings (written by an older ingest)"
        if changed := settings_changed(info.settings, settings):
            moved = info.root != os.path.abspath(root)
            what = ", ".join(f"{k} {a} (the job sets {b})" for k, (a, b) in changed.items())
            return ("resplit" if set(changed) == {SPLIT_SETTING} and not moved else "build"), \
                f"{path} was made with {what}"
    if info.root != os.path.abspath(root):
        return "rebase", f"{path} was written to {info.root} and has moved to {os.path.abspath(root)}"
    return "keep", f"{path} is current (source {info.source})"


def rebase_manifest(path: str | Path, root: str | Path) -> int:
    """A manifest moved with its root: paths under the recorded root now live under `root` (same content, same
    fingerprint). Returns how many rows were rebased."""
    info = manifest_info(path)
    table = read_manifest(path)
    old, new = info.root.rstrip("/") + "/", os.path.abspath(root).rstrip("/") + "/"
    paths = table["path"].combine_chunks()
    under = pc.starts_with(paths, old)
    moved = pc.if_else(under, pc.binary_join_element_wise(new, pc.utf8_slice_codeunits(paths, len(old)), ""), paths)
    table = table.set_column(table.schema.get_field_index("path"), "path", moved)
    write_manifest(table, Path(root), info.source, info.settings)
    return int(pc.sum(under).as_py() or 0)


def resplit_manifest(path: str | Path, val_per_class: int) -> str:
    """The same samples with the split `val_per_class` gives (as a rebuild would); returns the new fingerprint."""
    info = manifest_info(path)
    table = read_manifest(path)
    table = table.set_column(table.schema.get_field_index("split"), "split", split_column(table, val_per_class))
    write_manifest(table, Path(path).parent, info.source, {**(info.settings or {}), SPLIT_SETTING: val_per_class})
    return manifest_fingerprint(path)


def write_rejected(rejects: list[dict], out_dir: Path) -> Path:
    rejects = sorted(rejects, key=lambda r: (r["path"], r["member"], r["reason"]))
    table = pa.table({k: [r[k] for r in rejects] for k in ("path", "member", "reason")}, schema=REJECTED_SCHEMA)
    path = Path(out_dir) / REJECTED_NAME
    _atomic_write_table(table, path)
    return path


def read_manifest(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a manifest file (or the manifest.parquet inside a directory) and check its columns."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}")
    table = pq.read_table(path, columns=columns)
    need = columns or [f.name for f in MANIFEST_SCHEMA][:7]
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise ManifestError(f"{path}: missing manifest columns {missing}")
    return table
