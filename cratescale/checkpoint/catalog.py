"""Parquet catalog of commits: one row per commit ever made, `present` says whether it is still on disk.

The catalog is derived data (the step dirs and their markers are the truth): it is rewritten whole and
atomically after each commit, and rebuilt from the scan when it is missing or unreadable.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from cratescale.files import replacing

if TYPE_CHECKING:
    from cratescale.checkpoint.commit import Commit

CATALOG = "catalog.parquet"

SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("dir", pa.string()),
    ("time", pa.timestamp("ms", tz="UTC")),
    ("bytes", pa.int64()),
    ("num_files", pa.int32()),
    ("commit_seconds", pa.float64()),
    ("world_size", pa.int32()),
    ("samples_seen", pa.int64()),
    ("global_batch", pa.int32()),
    ("epoch", pa.int32()),
    ("config_hash", pa.string()),
    ("run_name", pa.string()),
    ("present", pa.bool_()),
])


def _opt_int(meta: dict[str, Any], key: str) -> int | None:
    value = meta.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def row_for(commit: "Commit", seconds: float | None, when: float | None = None) -> dict[str, Any]:
    meta = commit.meta
    loader = meta.get("loader") if isinstance(meta.get("loader"), dict) else {}
    return {
        "step": commit.step,
        "dir": commit.path.name,
        "time": datetime.fromtimestamp(when if when is not None else time.time(), tz=timezone.utc),
        "bytes": commit.bytes,
        "num_files": len(commit.files),
        "commit_seconds": seconds,
        "world_size": _opt_int(meta, "world_size"),
        "samples_seen": _opt_int(meta, "samples_seen"),
        "global_batch": _opt_int(meta, "global_batch"),
        "epoch": _opt_int(meta, "epoch") if "epoch" in meta else _opt_int(loader, "epoch"),
        "config_hash": str(meta["config_hash"]) if meta.get("config_hash") is not None else None,
        "run_name": str(meta["run_name"]) if meta.get("run_name") is not None else None,
        "present": True,
    }


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    rows = sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])  # last row per step wins
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    with replacing(path) as tmp:
        pq.write_table(table, tmp)


def _read_rows(path: Path) -> list[dict[str, Any]] | None:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None
    if table.schema.names != SCHEMA.names:
        return None
    return table.cast(SCHEMA).to_pylist()


def _rebuild(commits: Callable[[], list["Commit"]]) -> list[dict[str, Any]]:
    # Commit time from the marker's mtime; commit duration unknown.
    return [row_for(c, None, when=(c.path / "COMMITTED").stat().st_mtime) for c in commits()]


def append(path: Path, commit: "Commit", seconds: float | None, present_steps: list[int],
           commits: Callable[[], list["Commit"]]) -> None:
    """Add the row of `commit` and refresh `present` from the steps now on disk; atomic rewrite.
    Commits the catalog lacks (damaged file, a crash before the last append) are added from the scan."""
    rows = _read_rows(path) or []
    known = {r["step"] for r in rows}
    if set(present_steps) - known - {commit.step}:
        rows += [r for r in _rebuild(commits) if r["step"] not in known]
    rows.append(row_for(commit, seconds))
    present = set(present_steps)
    for row in rows:
        row["present"] = row["step"] in present
    _write(path, rows)


def read(path: Path, commits: Callable[[], list["Commit"]]) -> pa.Table:
    rows = _read_rows(path)
    if rows is not None:
        return pa.Table.from_pylist(rows, schema=SCHEMA)
    return pa.Table.from_pylist(_rebuild(commits), schema=SCHEMA)  # missing or damaged
