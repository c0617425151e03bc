"""The body of one ingest task: enumerate a unit's items, validate, optionally write shards.

Runs inside a Ray worker (or inline); returns plain rows and rejects, never image bytes, so the
driver's memory does not grow with the dataset (shards are written by the task itself).
"""
from __future__ import annotations

import os
import socket
import time
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from .manifest import rows_to_table
from .reader import ByteReader
from .sources import IMAGE_EXTS, Unit, reject
from .tario import Window, iter_members, member_key, unsafe_member_reason, write_shard
from .validate import DEFAULT_MAX_PIXELS, describe_error, inspect_image, reencode_jpeg

SHARD_DIR = "shards"


# Samples per written tar shard (data.shard_size): the one default of ingest; cratescale/config/schema.py states it
# too (config may not import data_pipeline), and tests/unit/test_config.py keeps the two equal.
SHARD_SIZE = 1000


@dataclass(frozen=True)
class IngestOptions:
    out_dir: str
    reshard: int | None = None      # short side of re-encoded JPEGs, None keeps the source bytes
    shard_size: int = SHARD_SIZE
    max_pixels: int = DEFAULT_MAX_PIXELS
    quality: int = 90


@dataclass
class Item:
    path: str       # file or archive the bytes live in
    member: str     # member name inside an archive ("" for a plain file)
    key: str
    class_name: str
    offset: int
    size: int
    data: bytes


def _items(unit: Unit, reader: ByteReader, rejects: list[dict]) -> Iterator[Item]:
    p = unit.params
    if unit.kind == "files":
        for rel in p["files"]:
            full = os.path.join(p["root"], rel)
            try:
                with open(full, "rb") as f:
                    data = f.read()
            except OSError as e:
                rejects.append(reject(full, "", f"unreadable: {e}"))
                continue
            yield Item(full, "", rel, PurePosixPath(rel).parent.name, -1, len(data), data)
    elif unit.kind == "tar_members":
        for name, off, size in p["members"]:
            yield Item(p["path"], name, name, PurePosixPath(name).parent.name, off, size,
                       reader.read(p["path"], off, size))
    elif unit.kind == "inner_tar":
        yield from _inner_tar_items(p, reader, rejects)
    elif unit.kind == "wds_shard":
        yield from _wds_items(p["path"], reader, rejects)
    elif unit.kind == "bytes":
        for name, data in p["members"]:
            yield Item(p["path"], name, name, PurePosixPath(name).parent.name, -1, len(data), data)
    elif unit.kind == "synthetic":
        from .synthetic import synthetic_items
        yield from synthetic_items(p)
    else:
        raise ValueError(f"unknown ingest unit kind {unit.kind!r}")


def _inner_tar_items(p: dict, reader: ByteReader, rejects: list[dict]) -> Iterator[Item]:
    prefix = p["member"] + ":" if p["member"] else ""
    members, errors = [], []
    with open(p["path"], "rb") as f:
        for info, off in iter_members(Window(f, p["start"], p["length"]), p["start"], errors):
            if info.isdir():
                continue
            why = unsafe_member_reason(info)
            if why:
                rejects.append(reject(p["path"], prefix + info.name, why))
            else:
                members.append((info.name, off, info.size))
    # A damaged inner tar keeps the members read so far and is listed once.
    rejects += [reject(p["path"], p["member"], f"damaged inner tar, members after this point lost: {e}")
                for e in errors]
    for name, off, size in sorted(members):
        yield Item(p["path"], prefix + name, f"{p['class_name']}/{name}", p["class_name"], off, size,
                   reader.read(p["path"], off, size))


def _wds_items(path: str, reader: ByteReader, rejects: list[dict]) -> Iterator[Item]:
    """Group members by webdataset key (dir + basename up to the first dot)."""
    samples: dict[str, dict[str, tuple[str, int, int]]] = {}
    errors: list[str] = []
    with open(path, "rb") as f:
        for info, off in iter_members(f, errors=errors):
            if info.isdir():
                continue
            why = unsafe_member_reason(info)
            if why:
                rejects.append(reject(path, info.name, why))
                continue
            pp = PurePosixPath(info.name)
            stem, _, ext = pp.name.partition(".")
            samples.setdefault(str(pp.parent / stem), {})[ext.lower()] = (info.name, off, info.size)
    # A damaged shard keeps the members read so far and is listed once.
    rejects += [reject(path, "", f"damaged shard, members after this point lost: {e}") for e in errors]
    for key in sorted(samples):
        parts = samples[key]
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if image is None or "cls" not in parts:
            name = next(iter(parts.values()))[0]
            rejects.append(reject(path, name, "webdataset sample without " + ("an image" if image is None else ".cls")))
            continue
        cls_name, cls_off, cls_size = parts["cls"]
        label = reader.read(path, cls_off, cls_size).decode("utf-8", "replace").strip()
        if not label:
            rejects.append(reject(path, cls_name, "empty .cls member"))
            continue
        name, off, size = image
        yield Item(path, name, key, label, off, size, reader.read(path, off, size))


class _ShardSink:
    """Collects good samples' bytes and flushes them as tar shards of `shard_size`."""

    def __init__(self, opts: IngestOptions, unit_index: int):
        self.opts, self.unit_index = opts, unit_index
        self.pending: list[tuple[dict, bytes]] = []
        self.part = 0

    def add(self, row: dict, data: bytes) -> None:
        self.pending.append((row, data))
        if len(self.pending) >= self.opts.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        path = Path(self.opts.out_dir) / SHARD_DIR / f"{self.unit_index:06d}_{self.part:03d}.tar"
        names = [f"{i:06d}.{member_key(r['key'])}.jpg" for i, (r, _) in enumerate(self.pending)]
        locations = write_shard(path, list(zip(names, (d for _, d in self.pending))))
        for (row, _), (off, size) in zip(self.pending, locations):
            row.update(path=str(path), offset=off, size=size)
        self.pending, self.part = [], self.part + 1


def process_unit(unit: Unit, opts: IngestOptions) -> dict:
    """Validate every item of `unit`; returns {"rows" (a pa.Table), "rejects", "seen", "seconds", "host"
    (where it ran: a Ray cluster spreads units over its nodes)}."""
    t0 = time.perf_counter()
    reader = ByteReader()
    rows: list[dict] = []
    rejects: list[dict] = []
    # Compressed sources and synthetic images have no addressable bytes: always re-pack them.
    sink = _ShardSink(opts, unit.index) if (opts.reshard or unit.kind in ("bytes", "synthetic")) else None
    for item in _items(unit, reader, rejects):
        info, why = inspect_image(item.data, allow_non_jpeg=opts.reshard is not None, max_pixels=opts.max_pixels)
        if why is None and len(item.data) != item.size:
            why = f"truncated: read {len(item.data)} of {item.size} bytes"
        if why:
            rejects.append(reject(item.path, item.member, why))
            continue
        row = {"path": item.path, "offset": item.offset, "size": item.size, "class_name": item.class_name,
               "key": item.key, "width": info["width"], "height": info["height"]}
        if sink is None:
            row["crc32"] = zlib.crc32(item.data)
            rows.append(row)
            continue
        data = item.data
        if opts.reshard:
            try:
                data, row["width"], row["height"] = reencode_jpeg(data, opts.reshard, opts.quality)
            except Exception as e:
                rejects.append(reject(item.path, item.member, f"re-encode failed: {describe_error(e)}"))
                continue
        row["crc32"] = zlib.crc32(data)  # of the bytes the loader will read
        rows.append(row)
        sink.add(row, data)
    if sink is not None:
        sink.flush()
    reader.close()
    return {"rows": rows_to_table(rows), "rejects": rejects, "seen": len(rows) + len(rejects),
            "seconds": time.perf_counter() - t0, "host": socket.gethostname()}
