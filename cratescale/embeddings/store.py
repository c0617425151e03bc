"""Embedding store: zarr v3 feature arrays + per-shard Parquet metadata + per-shard commit markers.

Layout of `<store>/`:
  store.json                   N, dims, dtype, shard_rows, chunk_rows, source manifest, export provenance
  features.zarr/<name>         zarr v3 array [N, d] per feature ("cls", "mean", "layer_3_cls", ...),
                               chunks (chunk_rows, d) inside shards (shard_rows, d), blosc-zstd level 1 (same ratio as
                               level 3 on features, 3x faster), NaN fill
  metadata/shard_<k>.parquet   sample_id, key, label, split, valid, row (one file per shard: names never collide);
                               valid=False: the image could not be read or decoded, its features are NaN
  commits/shard_<k>.json       {"shard", "rows", "crc32": {name: crc32 of the shard's raw bytes}}, written last

One writer per shard, always (two writers on one zarr shard lose chunks, zarr-python#3682), also when Ray
retries a shard whose first writer still runs (fence.py): a writer stages every row of the shard under its
attempt token (one call per array, fsynced), then, holding the shard's claim, moves the shard files into
place, writes the metadata file, then the commit marker (atomic rename). A rerun skips committed shards;
compression is deterministic, so a resumed store is byte-identical to an uninterrupted one.
Rows of uncommitted shards read as NaN.

Reading it without cratescale:
    import json, zarr, pandas as pd, xarray as xr, pyarrow.dataset as pads
    info = json.load(open(f"{store}/store.json"))
    cls = zarr.open_group(f"{store}/features.zarr", mode="r")["cls"][:]          # numpy [N, d]
    meta = pd.read_parquet(f"{store}/metadata")                                  # one row per stored row
    table = pads.dataset(f"{store}/metadata", format="parquet").to_table()
    ds = xr.open_zarr(f"{store}/features.zarr", consolidated=False)              # dims (row, cls_dim), ...
    labels = meta.sort_values("row").label.to_numpy()                            # aligned with cls rows
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from cratescale.embeddings.fence import ShardFence, StagedShard, clear_all
from cratescale.embeddings.store_info import (FORMAT_VERSION, StoreDamagedError, StoreError, StoreInfo,  # noqa: F401
                                              StoreWriteError, format_ranges)
from cratescale.files import fsync_path, replace_durable

META_COLUMNS = ("sample_id", "key", "label", "split", "valid", "row")
_META_DTYPES = ("int64", "object", "int32", "object", "bool", "int64")
_META_SCHEMA = pa.schema([("sample_id", pa.int64()), ("key", pa.string()), ("label", pa.int32()),
                          ("split", pa.string()), ("valid", pa.bool_()), ("row", pa.int64())])
_META_DEFAULTS = {"valid": True}  # a writer that does not say: every row decoded (also stores from before)


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads(path.read_text())
        marker["shard"] = int(marker["shard"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable marker: the shard counts as not committed and is redone
    return marker


def _with_defaults(meta: pd.DataFrame) -> pd.DataFrame:
    """The metadata columns in order, optional ones filled with their default where absent."""
    meta = meta.assign(**{c: v for c, v in _META_DEFAULTS.items() if c not in meta.columns})
    return meta[[c for c in META_COLUMNS if c in meta.columns]].copy()


def selected_rows(manifest: pd.DataFrame, split: str | None) -> np.ndarray:
    """The manifest rows a store of `split` holds, in manifest order (store row r = manifest row rows[r]);
    every row when split is None."""
    if split is None:
        return np.arange(len(manifest), dtype=np.int64)
    return np.flatnonzero(manifest["split"].to_numpy() == split).astype(np.int64)


def crc32_of(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).tobytes()) & 0xFFFFFFFF


class EmbeddingStore:
    """A directory holding a zarr feature group, per-shard metadata and commit markers."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        meta_path = self.root / "store.json"
        if not meta_path.is_file():
            raise StoreError(f"{self.root}: not an embedding store (no store.json)")
        try:
            self.info = StoreInfo.from_json(json.loads(meta_path.read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise StoreError(f"{meta_path}: malformed store.json ({e})") from e
        self._group: zarr.Group | None = None

    # ---- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path | str, info: StoreInfo) -> "EmbeddingStore":
        """Create the store, or open an existing one that matches `info` (resume). Run by ONE process
        before any writer starts: array metadata is written here only, never by writers."""
        info.validate()
        root = Path(root)
        if (root / "store.json").is_file():
            store = cls(root)
            store._check_compatible(info)
            clear_all(root)  # staging of killed attempts; no writer of this run has started yet
            return store
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("metadata", "commits"):
            (root / sub).mkdir(exist_ok=True)
        group = zarr.open_group(root / "features.zarr", mode="w", zarr_format=3)
        for name, d in info.dims.items():
            group.create_array(
                name, shape=(info.num_rows, d), chunks=(info.chunk_rows, d), shards=(info.shard_rows, d),
                dtype=info.dtype, fill_value=np.nan, dimension_names=("row", f"{name}_dim"),
                compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"))
        # store.json last: its presence means the arrays exist.
        replace_durable(root / "store.json", json.dumps(info.to_json(), indent=2, sort_keys=True).encode(), hidden=True)
        return cls(root)

    def _check_compatible(self, want: StoreInfo) -> None:
        have = self.info
        for attr in ("num_rows", "dims", "dtype", "shard_rows", "chunk_rows"):
            if getattr(have, attr) != getattr(want, attr):
                raise StoreError(f"{self.root}/store.json: {attr} is {getattr(have, attr)!r}, the request "
                                 f"wants {getattr(want, attr)!r}; use a new store directory")
        for what, a, b in (("manifest", have.source, want.source), ("export", have.provenance, want.provenance)):
            fp_have, fp_want = a.get("fingerprint"), b.get("fingerprint")
            if fp_have and fp_want and fp_have != fp_want:
                raise StoreError(f"{self.root}/store.json: built from another {what} "
                                 f"({a.get(what)}); use a new store directory")

    # ---- layout ---------------------------------------------------------------------------------
    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(self.root / "features.zarr", mode="r+", zarr_format=3)
        return self._group

    def marker_path(self, k: int) -> Path:
        return self.root / "commits" / f"shard_{k:06d}.json"

    def metadata_path(self, k: int) -> Path:
        return self.root / "metadata" / f"shard_{k:06d}.parquet"

    def _shard_dir(self, name: str, k: int, array: Path | None = None) -> Path:
        # zarr's default v3 chunk key for shard (k, 0) is c/<k>/0; everything an attempt wrote is under c/<k>/.
        key = self.group[name].metadata.encode_chunk_key((k, 0))
        return (array or self.root / "features.zarr" / name) / Path(key).parent

    # ---- commit state ---------------------------------------------------------------------------
    def committed(self) -> dict[int, dict[str, Any]]:
        """{shard: marker} for every valid marker."""
        out: dict[int, dict[str, Any]] = {}
        for p in sorted((self.root / "commits").glob("shard_*.json")):
            marker = _read_marker(p)
            if marker is not None and 0 <= marker["shard"] < self.info.num_shards and \
                    marker.get("rows") == self._shard_len(marker["shard"]):
                out[marker["shard"]] = marker
        return out

    def _marker(self, k: int) -> dict[str, Any] | None:
        """Shard k's valid marker (one file read: a commit asks under the store's lock)."""
        marker = _read_marker(self.marker_path(k))
        return marker if marker is not None and marker["shard"] == k and marker.get("rows") == self._shard_len(k) \
            else None

    def missing(self) -> list[int]:
        done = self.committed()
        return [k for k in range(self.info.num_shards) if k not in done]

    def is_complete(self) -> bool:
        return not self.missing()

    def _shard_len(self, k: int) -> int:
        start, stop = self.info.shard_range(k)
        return stop - start

    # ---- writing --------------------------------------------------------------------------------
    def write_shard(self, k: int, features: Mapping[str, np.ndarray], metadata: pd.DataFrame) -> dict:
        """Write every row of shard k, then its metadata, then its commit marker: staged under this attempt's
        token, committed only while the attempt holds the shard (fence.py). Returns the marker."""
        return self.commit_staged(self.stage_shard(k, features, metadata))

    def stage_shard(self, k: int, features: Mapping[str, np.ndarray], metadata: pd.DataFrame) -> StagedShard:
        """Claim shard k for a new attempt and write its rows into the attempt's staging copy (nothing visible)."""
        start, stop = self.info.shard_range(k)
        n = stop - start
        if set(features) != set(self.info.dims):
            raise StoreError(f"shard {k}: features {sorted(features)} != store features "
                             f"{sorted(self.info.dims)}")
        arrays = {}
        for name, d in self.info.dims.items():
            a = np.asarray(features[name])
            if a.shape != (n, d):
                raise StoreError(f"shard {k}: feature {name!r} has shape {a.shape}, expected {(n, d)}")
            arrays[name] = np.ascontiguousarray(a.astype(self.info.dtype, copy=False))
        meta = self._shard_metadata(k, metadata, start, n)
        fence = ShardFence(self.root, k)
        try:
            fence.claim()
            for name, a in arrays.items():
                shutil.copyfile(self.root / "features.zarr" / name / "zarr.json", fence.array_file(name, "zarr.json"))
                zarr.open_array(fence.dir / name, mode="r+", zarr_format=3)[start:stop] = a  # one whole-shard write
                for f in self._shard_dir(name, k, fence.dir / name).iterdir():
                    fsync_path(f)
            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pandas(meta, schema=_META_SCHEMA, preserve_index=False), sink)
        except Exception as exc:
            fence.release()
            raise self._write_failed(k, exc) from exc
        marker = {"shard": k, "rows": n, "start": start,
                  "crc32": {name: crc32_of(a) for name, a in sorted(arrays.items())}}
        return StagedShard(k, fence, sink.getvalue().to_pybytes(), marker)

    def commit_staged(self, staged: StagedShard) -> dict:
        """Move a staged shard into place, metadata, then marker, while its attempt still holds the shard. A
        superseded attempt is refused and removes only its own staging; a committed shard is never rewritten."""
        k, fence = staged.k, staged.fence
        with fence.sealing():
            try:
                if not fence.holds():
                    raise StoreWriteError(f"{self.root}: shard {k}: another attempt took the shard over (this "
                                          f"attempt's token {fence.token[:8]}): its rows are left to it")
                if (done := self._marker(k)) is not None:
                    return done  # the same rows, committed by another attempt
                try:
                    for name in self.info.dims:
                        final = self._shard_dir(name, k)
                        shutil.rmtree(final, ignore_errors=True)  # what an attempt from before the fence left
                        final.parent.mkdir(parents=True, exist_ok=True)
                        os.rename(self._shard_dir(name, k, fence.dir / name), final)
                        fsync_path(final.parent)
                    replace_durable(self.metadata_path(k), staged.metadata, hidden=True)
                    replace_durable(self.marker_path(k), json.dumps(staged.marker, sort_keys=True).encode(),
                                    hidden=True)
                except Exception as exc:
                    # Disk full, I/O error: leave no part of this shard behind (its rows read as NaN again, the
                    # space is freed): they are this attempt's own (it holds the shard under the lock).
                    self._discard_shard(k)
                    raise self._write_failed(k, exc) from exc
            finally:
                fence.release()
        return staged.marker

    def _write_failed(self, k: int, exc: BaseException) -> StoreWriteError:
        """One line: which shard failed and why."""
        cause = " ".join(f"{type(exc).__name__}: {exc}".split())
        return StoreWriteError(f"{self.root}: shard {k}: write failed, shard left uncommitted: {cause}")

    def _discard_shard(self, k: int) -> None:
        """Remove every file of shard k: its marker first, then its feature shards, its metadata, and the
        hidden tmp files of an interrupted replace_durable (any pid: this process is the shard's only writer)."""
        self.marker_path(k).unlink(missing_ok=True)
        for name in self.info.dims:
            shutil.rmtree(self._shard_dir(name, k), ignore_errors=True)
        for final in (self.metadata_path(k), self.marker_path(k)):
            final.unlink(missing_ok=True)
            for tmp in final.parent.glob(f".{final.name}.tmp*"):
                tmp.unlink(missing_ok=True)

    def _shard_metadata(self, k: int, metadata: pd.DataFrame, start: int, n: int) -> pd.DataFrame:
        need = [c for c in META_COLUMNS if c != "row" and c not in _META_DEFAULTS]
        missing = [c for c in need if c not in metadata.columns]
        if missing or len(metadata) != n:
            raise StoreError(f"shard {k}: metadata needs {n} rows with columns {need}, "
                             f"got {len(metadata)} rows, missing {missing}")
        return _with_defaults(metadata.reset_index(drop=True)).assign(row=np.arange(start, start + n, dtype=np.int64))

    # ---- reading --------------------------------------------------------------------------------
    def read(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        if name not in self.info.dims:
            raise StoreError(f"{self.root}: no feature {name!r} (have {sorted(self.info.dims)})")
        arr = zarr.open_array(self.root / "features.zarr" / name, mode="r", zarr_format=3)
        if rows is None:
            return arr[:]
        if isinstance(rows, slice):
            return arr[rows]
        return arr.get_orthogonal_selection((np.asarray(rows), slice(None)))

    def metadata(self, committed_only: bool = True) -> pd.DataFrame:
        """All metadata rows sorted by row (only committed shards by default)."""
        shards = sorted(self.committed()) if committed_only else range(self.info.num_shards)
        parts = [_with_defaults(pq.read_table(self.metadata_path(k)).to_pandas()) for k in shards
                 if self.metadata_path(k).is_file()]
        if not parts:
            return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(META_COLUMNS, _META_DTYPES)})
        return pd.concat(parts, ignore_index=True).sort_values("row", ignore_index=True)

    def verify(self) -> list[int]:
        """Recompute the crc32 of every committed shard; return the shards that do not match or do not read."""
        return sorted(self.damaged())

    def damaged(self) -> dict[int, str]:
        """{shard: what is wrong} for every committed shard whose bytes no longer match its marker. A flipped
        byte in a chunk's data decodes to other numbers without any error (blosc keeps no checksum), so only
        the marker's crc32 finds it; a damaged shard index fails zarr's own crc32c check as a ValueError."""
        bad = {}
        for k, marker in self.committed().items():
            start, stop = self.info.shard_range(k)
            for name, crc in sorted(marker["crc32"].items()):
                if problem := self._shard_problem(name, k, crc, start, stop)[1]:
                    bad[k] = problem
                    break
            if k not in bad and not self.metadata_path(k).is_file():
                bad[k] = "its metadata file is missing"
        return bad

    def _shard_problem(self, name: str, k: int, crc: int, start: int, stop: int) -> tuple[np.ndarray | None, str]:
        """(the shard's rows of feature `name`, '' when they read and match `crc`, else what is wrong)."""
        try:
            block = self.read(name, slice(start, stop))
        except Exception as exc:  # zarr's codecs raise ValueError, RuntimeError, OSError... on damaged bytes
            return None, f"feature {name!r} does not read ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
        if crc32_of(block) != crc:
            return block, f"feature {name!r} fails its crc32 (the bytes changed after the commit)"
        return block, ""

    def read_checked(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows (increasing, of committed shards) of feature `name`, each shard they touch checked against its
        commit marker while it is in memory: damaged features are never evaluated, and the error names every
        damaged shard and the rerun."""
        rows = np.asarray(rows, dtype=np.int64)
        markers, damaged = self.committed(), {}
        out = np.empty((len(rows), self.info.dims[name]), dtype=self.info.dtype)
        for k in np.unique(rows // self.info.shard_rows).tolist():
            start, stop = self.info.shard_range(k)
            if k not in markers:
                raise StoreError(f"{self.root}: shard {k} is not committed; finish the extraction first")
            block, problem = self._shard_problem(name, k, markers[k]["crc32"][name], start, stop)
            if problem:
                damaged[k] = problem
                continue
            at = (rows >= start) & (rows < stop)
            out[at] = block[rows[at] - start]
        if damaged:
            raise StoreDamagedError(self.root, damaged)
        return out

    def drop_shards(self, shards: list[int]) -> None:
        """Uncommit and remove shards (damaged ones): the next extraction of this store writes them again."""
        for k in shards:
            self._discard_shard(k)

    def missing_files(self) -> dict[int, str]:
        """{shard: what is missing} for committed shards whose files are gone: a check without reading any
        feature (seconds on any store), where `damaged()` reads every byte."""
        out = {}
        for k, marker in self.committed().items():
            n = self._shard_len(k)
            for name, d in self.info.dims.items():
                # zarr writes no file for a shard of fill values only (every image undecodable): not missing.
                if not self._shard_dir(name, k).is_dir() and \
                        marker["crc32"].get(name) != crc32_of(np.full((n, d), np.nan, self.info.dtype)):
                    out[k] = f"feature {name!r} has no file"
                    break
            if k not in out and not self.metadata_path(k).is_file():
                out[k] = "its metadata file is missing"
        return out

    def summary(self, checksums: bool = False) -> dict[str, Any]:
        """Coverage and problems; `checksums` reads every committed byte (as `verify`), else files only."""
        missing = self.missing()
        damaged = self.damaged() if checksums else self.missing_files()
        return {"root": str(self.root), "rows": self.info.num_rows, "dims": self.info.dims,
                "dtype": self.info.dtype, "shard_rows": self.info.shard_rows,
                "committed_shards": self.info.num_shards - len(missing), "total_shards": self.info.num_shards,
                "missing_shards": missing, "damaged_shards": {str(k): v for k, v in sorted(damaged.items())},
                "checksums_checked": checksums}
