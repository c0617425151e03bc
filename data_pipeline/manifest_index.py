"""A manifest's loader columns as plain numpy files, built once and shared by every process that reads them.

Every rank and every loader worker needs the same few columns of the manifest (sample ids, labels, where the bytes
are, pixel sizes, the rows of a split). Reading them from the Parquet file in each process cost 5.7 s and 4.1 GB
peak RSS per process at 14.2M rows (bench/scale.py, BENCHMARKS.md "Scale"), 16 times on a node of 8 ranks with a
feed worker each. Here they are written once, as plain .npy files, into

    <manifest dir>/manifest.index/<key>/   records.npy  (one 44-byte record a manifest row: sample_id, offset,
                                               size, label, path_index, width, height)
                                           path_bytes.npy path_starts.npy  (the distinct paths: utf-8, starts)
                                           rows.<i>.npy  (the rows of the i-th split, file order)  meta.json

and every process reads the rows it needs with os.pread (`Column`): opening costs milliseconds, the bytes come
from the page cache, which holds the files once for all the processes of a node, so the total does not multiply
with ranks and workers. Not memory-mapped: the kernel maps a whole page-cache folio (64 KB to 2 MB) around each
page a process touches, so at 14.2M rows one step's 512 random rows put 220-600 MB of the index into each
process's RSS (measured with np.load(mmap_mode="r"): shared pages, but counted in every process and grown
towards the whole index over an epoch). Records, not one file a column: one read gives a row's fields.

The key is the manifest's content fingerprint plus its file's size and mtime: the fingerprint leaves paths out
(a moved dataset keeps it), and a rebased or re-sharded manifest must not be read through an index of its old
paths. A changed manifest therefore gets a new key and a new index; the old ones are removed. Builders write a
dot-named folder and rename it into place (a rename onto an existing complete index fails and the loser drops its
copy), so any number of processes may build at once and every reader sees a whole index or none. Where the
manifest's folder is not writable, the index goes to $CRATESCALE_INDEX_DIR (default: the temp dir) with a line.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import MANIFEST_NAME, ManifestError, manifest_info

log = logging.getLogger(__name__)

INDEX_VERSION = 1
INDEX_DIR = "manifest.index"
# A manifest row's fields, with the dtypes the loaders have always seen (labels int64, pixel sizes int32).
RECORD = np.dtype([("sample_id", "<i8"), ("offset", "<i8"), ("size", "<i8"), ("label", "<i8"),
                   ("path_index", "<i4"), ("width", "<i4"), ("height", "<i4")])


def _manifest_file(path: str | Path) -> Path:
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() else path


def index_key(manifest: str | Path) -> str:
    """What names the index of the manifest as it is now on disk (see the module docstring)."""
    manifest = _manifest_file(manifest)
    try:
        st = manifest.stat()
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {manifest}") from None
    # A manifest from before fingerprints were recorded: its file alone (computing the print reads every row).
    fingerprint = manifest_info(manifest).fingerprint or "unrecorded"
    text = f"v{INDEX_VERSION} {fingerprint} {st.st_size} {st.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _index_root(manifest: Path) -> Path:
    root = manifest.parent / INDEX_DIR
    try:
        root.mkdir(exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    fallback = Path(os.environ.get("CRATESCALE_INDEX_DIR", tempfile.gettempdir())) / "cratescale-index" / \
        hashlib.sha256(str(manifest.resolve()).encode()).hexdigest()[:16]
    log.warning("manifest index: %s is not writable; using %s", manifest.parent, fallback)
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _chunk_codes(column: pa.ChunkedArray) -> tuple[list[str | None], np.ndarray]:
    """(distinct values in order of first appearance, int32 code per row) of a string column, in C."""
    encoded = column.combine_chunks()  # dictionary chunks: one unified dictionary
    if not pa.types.is_dictionary(encoded.type):
        encoded = encoded.dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    if encoded.null_count:
        codes = np.where(encoded.is_valid().to_numpy(zero_copy_only=False), codes, -1)
    return encoded.dictionary.to_pylist(), codes.astype(np.int32)


def _save(folder: Path, name: str, array: np.ndarray) -> None:
    with open(folder / f"{name}.npy", "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _write_columns(folder: Path, table: pa.Table, manifest: Path) -> dict:
    """The index files of `table` into `folder`; returns meta.json's content (less the key)."""
    n = table.num_rows
    records = np.zeros(n, RECORD)  # width/height stay 0 in manifests from before they were recorded
    for name in RECORD.names:
        if name in table.column_names:
            records[name] = table[name].to_numpy()
    paths, records["path_index"] = _chunk_codes(table["path"])
    if (missing := int(np.count_nonzero(records["path_index"] < 0))):
        raise ManifestError(f"{manifest}: {missing} rows have no path")
    _save(folder, "records", records)
    del records
    encoded = [p.encode() for p in paths]
    _save(folder, "path_bytes", np.frombuffer(b"".join(encoded), np.uint8))
    _save(folder, "path_starts", np.concatenate([[0], np.cumsum([len(p) for p in encoded], dtype=np.int64)]))
    splits, codes = _chunk_codes(table["split"])
    counts = {}
    for i, split in enumerate(splits):
        rows = np.flatnonzero(codes == i).astype(np.int64)
        _save(folder, f"rows.{i}", rows)
        counts[split] = {"file": f"rows.{i}.npy", "rows": int(len(rows))}
    return {"version": INDEX_VERSION, "total_rows": n, "paths": len(paths), "splits": counts}


def build_index(manifest: str | Path, table: pa.Table | None = None) -> Path:
    """Builds the index of `manifest` unless a current one exists (`table`: its rows, when the caller has them
    in memory); returns its folder. Safe to call from any number of processes at once."""
    manifest = _manifest_file(manifest)
    key = index_key(manifest)
    root = _index_root(manifest)
    final = root / key
    if (final / "meta.json").exists():
        return final
    if table is None:
        table = _read_for_index(manifest)
    tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = {**_write_columns(tmp, table, manifest), "key": key, "manifest": str(manifest)}
        _save_meta(tmp, meta)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").exists():
                raise  # not a lost race: a real failure to put the index in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if index_key(manifest) == key:  # else the manifest changed while this was built: the newer index stays
        _remove_stale(root, key)
    return final


def _read_for_index(manifest: Path) -> pa.Table:
    """The columns the index holds; strings as Parquet's dictionaries (no 14M Python or Arrow strings)."""
    have = pq.read_schema(manifest).names
    need = ["sample_id", "path", "offset", "size", "label", "split"]
    missing = [c for c in need if c not in have]
    if missing:
        raise ManifestError(f"{manifest}: missing manifest columns {missing}")
    extra = [c for c in ("width", "height") if c in have]
    return pq.read_table(manifest, columns=need + extra, read_dictionary=["path", "split"])


def _save_meta(folder: Path, meta: dict) -> None:
    with open(folder / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _remove_stale(root: Path, key: str) -> None:
    """Indexes of earlier versions of the manifest (readers that still have them open keep reading them until they
    close: unlinking an open file is safe on POSIX). Builders' dot folders of a live key are left to them."""
    for entry in root.iterdir():
        if entry.is_dir() and entry.name != key and not entry.name.startswith(".tmp-"):
            shutil.rmtree(entry, ignore_errors=True)


class Column:
    """One field of an index file, read with os.pread: indexing (an int, a slice, an array or list of rows) reads
    those rows only and returns them as numpy values, as an array column would. Nothing is mapped: the file's pages
    stay in the page cache, once per node, and a process's RSS does not grow with the rows it reads."""

    def __init__(self, path: Path, rows: int, field: str | None = None):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            start = f.tell()
        if len(shape) != 1 or shape[0] != rows or dtype.hasobject:
            raise ValueError(f"{path.name} holds {shape} {dtype}, the index {rows} rows")
        self._fd, self._start, self._record, self._field = os.open(path, os.O_RDONLY), start, dtype, field
        self.dtype = dtype if field is None else dtype[field]
        self._n = rows

    def __len__(self) -> int:
        return self._n

    def _values(self, buffer: bytes, shape: tuple) -> np.ndarray:
        records = np.frombuffer(buffer, self._record).reshape(shape)
        return records if self._field is None else records[self._field]

    def __getitem__(self, key):
        size = self._record.itemsize
        if isinstance(key, (int, np.integer)):
            row = int(key) + (self._n if key < 0 else 0)
            if not 0 <= row < self._n:
                raise IndexError(f"row {key} outside [0, {self._n})")
            return self._values(os.pread(self._fd, size, self._start + row * size), (1,))[0]
        if isinstance(key, slice):
            first, stop, step = key.indices(self._n)
            if step == 1:
                count = max(0, stop - first)
                return self._values(os.pread(self._fd, count * size, self._start + first * size), (count,)).copy()
            key = np.arange(first, stop, step)
        rows = np.asarray(key, dtype=np.int64)
        if rows.size and (rows.min() < -self._n or rows.max() >= self._n):
            raise IndexError(f"rows outside [0, {self._n})")
        rows = np.where(rows < 0, rows + self._n, rows)
        data = b"".join([os.pread(self._fd, size, self._start + int(r) * size) for r in rows.ravel()])
        return self._values(data, rows.shape).copy()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def __del__(self):
        try:
            os.close(self._fd)
        except (OSError, AttributeError):
            pass


class ManifestIndex:
    """The index of a manifest: its columns (one row per manifest row) and each split's rows, read on demand."""

    def __init__(self, manifest: str | Path):
        manifest = _manifest_file(manifest)
        self.folder = build_index(manifest)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
            self.total_rows = int(self.meta["total_rows"])
            records = self.folder / "records.npy"
            (self.sample_id, self.offset, self.size, self.label, self.path_index, self.width, self.height) = \
                (Column(records, self.total_rows, name) for name in RECORD.names)
            if self.sample_id._record != RECORD:
                raise ValueError(f"records.npy holds {self.sample_id._record}, not {RECORD}")
            self._path_starts = Column(self.folder / "path_starts.npy", int(self.meta["paths"]) + 1)
            self._path_bytes = Column(self.folder / "path_bytes.npy", int(self._path_starts[-1]))
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise ManifestError(f"manifest index {self.folder} is damaged ({exc}); delete that folder and it is "
                                f"rebuilt") from None

    def split_rows(self, split: str) -> Column | np.ndarray:
        """Manifest rows of `split`, in file order (empty when no row has it)."""
        entry = self.meta["splits"].get(split)
        if entry is None:
            return np.zeros(0, np.int64)
        try:
            return Column(self.folder / entry["file"], entry["rows"])
        except (OSError, ValueError) as exc:
            raise ManifestError(f"manifest index {self.folder} is damaged ({exc}); delete that folder and it is "
                                f"rebuilt") from None

    def path(self, row: int) -> str:
        start, stop = self._path_starts[int(self.path_index[row]):int(self.path_index[row]) + 2]
        return self._path_bytes[int(start):int(stop)].tobytes().decode()

    def location(self, row: int) -> tuple[str, int, int]:
        return self.path(row), int(self.offset[row]), int(self.size[row])


class ManifestArrays(ManifestIndex):
    """What a loader reads of a manifest: the index's columns and `rows`, the manifest rows of `split` in file order
    (all rows when split is None)."""

    def __init__(self, path: str | Path, split: str | None = None):
        super().__init__(path)
        self._rows = None if split is None else self.split_rows(split)

    @property
    def rows(self) -> Column | np.ndarray:
        if self._rows is None:  # an eval loader's: made when asked (113 MB at 14.2M rows), not at start
            self._rows = np.arange(self.total_rows, dtype=np.int64)
        return self._rows


def count_split(manifest: str | Path, split: str = "train") -> int:
    """Rows of `split`, counted from the Parquet dictionary pages of the split column (C, a few bytes a row)."""
    manifest = _manifest_file(manifest)
    if not manifest.exists():
        raise ManifestError(f"manifest not found: {manifest}")
    if "split" not in pq.read_schema(manifest).names:
        raise ManifestError(f"{manifest}: missing manifest columns ['split']")
    column = pq.read_table(manifest, columns=["split"], read_dictionary=["split"])["split"]
    return sum(_count_chunk(chunk, split) for chunk in column.chunks)


def _count_chunk(chunk: pa.DictionaryArray, split: str) -> int:
    hits = np.flatnonzero(np.asarray(chunk.dictionary.to_pylist(), dtype=object) == split)
    if len(hits) == 0:
        return 0
    codes = chunk.indices.to_numpy(zero_copy_only=False)
    valid = chunk.is_valid().to_numpy(zero_copy_only=False) if chunk.null_count else True
    return int(np.count_nonzero(np.isin(codes, hits) & valid))
