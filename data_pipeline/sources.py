"""Source detection and driver-side enumeration into work units for ingest tasks.

Kinds of unit (processed by data_pipeline.work.process_unit, one Ray task each):
  files       ImageFolder files listed by the driver (a chunk of them)
  tar_members members of an uncompressed ImageFolder tar, scanned by the driver (headers only)
  inner_tar   one per-class tar: an inner tar of an uncompressed tar-of-tars (a byte window of
              the outer file) or a standalone class tar; the task scans it
  wds_shard   one webdataset shard (key.jpg + key.cls); the task scans it
  bytes       members streamed by the driver out of a compressed tar (must be re-packed)
  synthetic   a range of procedurally rendered samples
Unit indices follow a sorted, worker-independent enumeration so shard names are stable.
"""
from __future__ import annotations

import glob
import os
import tarfile
from dataclasses import dataclass, field
from itertools import starmap
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from .listing import MapJobs, list_folder, reject
from .tario import is_compressed_tar, iter_members, unsafe_member_reason

LISTING_CHUNK = None  # auto: see _auto_chunk
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")


class SourceError(ValueError):
    """The ingest source is missing or of an unsupported kind."""


@dataclass
class Unit:
    index: int
    kind: str
    params: dict
    count: int | None = None  # items, when known before the task runs


@dataclass
class Plan:
    kind: str
    units: list[Unit] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    stream: Iterator[Unit] | None = None  # compressed tar: units produced while streaming


def _auto_chunk(total: int) -> int:
    """About 64 tasks for small sources (so 2..N workers balance), at most 1024 items per task.

    Depends only on the source, never on the worker count, so units (and shards) are stable.
    """
    return min(1024, max(16, -(-total // 64)))


def _chunks(items: list, size: int | None) -> Iterator[list]:
    size = size or _auto_chunk(len(items))
    for i in range(0, len(items), size):
        yield items[i:i + size]


def plan_source(source: str, chunk: int | None, shard_size: int, map_jobs: MapJobs | None = None) -> Plan:
    """Look at `source` and list its work units (a compressed tar gets a lazy stream instead).

    Listed files are processed `chunk` per task (None: automatic); synthetic and compressed
    sources, which are always re-packed, take `shard_size` per task so each writes one shard. A folder's class
    directories are listed by `map_jobs` (listing.ray_map: in parallel; None: here, one after another).
    """
    if source.startswith("synthetic://"):
        from .synthetic import plan_synthetic
        return plan_synthetic(source, shard_size)
    if any(c in source for c in "*?["):
        shards = sorted(glob.glob(source))
        if not shards:
            raise SourceError(f"ingest source: glob {source!r} matched no files")
        return _plan_tar_list([os.path.abspath(s) for s in shards])
    path = Path(source)
    if not path.exists():
        raise SourceError(f"ingest source not found: {source}")
    if path.is_dir():
        tars = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(".tar"))
        has_dirs = any(p.is_dir() for p in path.iterdir())
        if tars and not has_dirs:
            return _plan_tar_list([os.path.abspath(p) for p in tars])
        return _plan_folder(Path(os.path.abspath(path)), chunk, map_jobs)
    if is_compressed_tar(path):
        plan = Plan("compressed_tar")
        plan.stream = stream_compressed_tar(os.path.abspath(path), shard_size, plan.rejects)
        return plan
    if not tarfile.is_tarfile(path):
        raise SourceError(f"ingest source {source}: not a directory, tar archive or synthetic:// spec")
    return _plan_tar(os.path.abspath(path), chunk)


def _peek_names(path: str, limit: int = 64) -> list[str]:
    names: list[str] = []
    with open(path, "rb") as f:
        for info, _ in iter_members(f, errors=[]):
            if info.isfile():
                names.append(info.name)
            if len(names) >= limit:
                break
    return names


def _plan_tar_list(tars: list[str]) -> Plan:
    """Webdataset shards (they hold .cls members) or per-class tars (IN-21k's nXXXX.tar files)."""
    names = _peek_names(tars[0])
    if any(n.endswith(".cls") for n in names):
        return Plan("webdataset", [Unit(i, "wds_shard", {"path": t}) for i, t in enumerate(tars)])
    units = [Unit(i, "inner_tar", {"path": t, "start": 0, "length": os.path.getsize(t),
                                   "class_name": Path(t).name[:-4], "member": ""})
             for i, t in enumerate(tars)]
    return Plan("class_tars", units)


def _scan_members(path: str, plan: Plan, unwanted: Callable[[tarfile.TarInfo], str | None]) -> list[tuple]:
    """(name, data offset, size) of the files in the tar at `path`, sorted by name; unsafe members and those
    `unwanted` gives a reason for become rejects of `plan`, and so does damage that ends the scan early."""
    kept, errors = [], []
    with open(path, "rb") as f:
        for info, off in iter_members(f, errors=errors):
            if info.isdir():
                continue
            why = unsafe_member_reason(info) or unwanted(info)
            if why:
                plan.rejects.append(reject(path, info.name, why))
            else:
                kept.append((info.name, off, info.size))
    plan.rejects += [reject(path, "", f"damaged archive, members after this point lost: {e}") for e in errors]
    return sorted(kept)


def _plan_tar(path: str, chunk: int | None) -> Plan:
    names = _peek_names(path)
    if any(n.endswith(".cls") for n in names):
        return Plan("webdataset", [Unit(0, "wds_shard", {"path": path})])
    if names and sum(n.endswith(".tar") for n in names) * 2 >= len(names):
        return _plan_tar_of_tars(path)
    plan = Plan("tar")
    members = _scan_members(path, plan, lambda info: "no class folder: member at the archive root"
                            if len(PurePosixPath(info.name).parts) < 2 else None)
    plan.units = [Unit(i, "tar_members", {"path": path, "members": c}, len(c))
                  for i, c in enumerate(_chunks(members, chunk))]
    return plan


def _plan_tar_of_tars(path: str) -> Plan:
    """Outer tar of per-class tars: inner data offsets are absolute offsets in the outer file."""
    plan = Plan("tar_of_tars")
    inner = _scan_members(path, plan, lambda info: None if info.name.endswith(".tar")
                          else "not an inner .tar in a tar-of-tars")
    plan.units = [Unit(i, "inner_tar", {"path": path, "start": off, "length": size, "member": name,
                                        "class_name": PurePosixPath(name).name[:-4]})
                  for i, (name, off, size) in enumerate(inner)]
    return plan


def _plan_folder(root: Path, chunk: int | None, map_jobs: MapJobs | None) -> Plan:
    """ImageFolder: class = parent directory of each file. Symlinks leaving the tree are refused. Class
    directories are listed by `map_jobs` (None: one after another; see listing.py)."""
    files, rejects = list_folder(str(root), map_jobs or starmap)
    plan = Plan("folder", rejects=rejects)
    plan.units = [Unit(i, "files", {"root": str(root), "files": c}, len(c))
                  for i, c in enumerate(_chunks(files, chunk))]
    return plan


def stream_compressed_tar(path: str, chunk: int, rejects: list[dict]) -> Iterator[Unit]:
    """Stream a .tar.gz/.tgz once, yielding units of `chunk` members with their bytes.

    Offsets into a compressed stream are meaningless, so the task re-packs good members into
    uncompressed shards. Unsafe members are listed in `rejects` and never read.
    """
    index, batch = 0, []
    with tarfile.open(path, mode="r|*") as tf:
        for info in tf:
            if info.isdir():
                continue
            why = unsafe_member_reason(info)
            if why is None and len(PurePosixPath(info.name).parts) < 2:
                why = "no class folder: member at the archive root"
            if why is None and info.name.endswith(".tar"):
                why = "tar-of-tars inside a compressed archive is not supported"
            if why:
                rejects.append(reject(path, info.name, why))
                continue
            data = tf.extractfile(info).read()
            batch.append((info.name, data))
            if len(batch) >= chunk:
                yield Unit(index, "bytes", {"path": path, "members": batch}, len(batch))
                index, batch = index + 1, []
    if batch:
        yield Unit(index, "bytes", {"path": path, "members": batch}, len(batch))
