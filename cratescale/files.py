"""Durable file writes for every layer of the package (standard library only).

A file replaced through `replacing` / `replace_durable` is seen, also after a crash or a power cut, with its
old content or its new one, never a part: the new bytes go to a tmp sibling, which is fsynced, renamed over
the file, and the folder fsynced (the rename itself survives a crash). data_pipeline keeps its own copy
(data_pipeline/durable.py): it imports nothing from cratescale (DESIGN.md section 2).
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames and new entries in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def replacing(path: Path, hidden: bool = False) -> Iterator[Path]:
    """Yields the tmp sibling to write; when the block ends it replaces `path` durably (see above). On an
    error the tmp file goes and `path` keeps its old content. Tmp names: `name.<pid>.tmp`, or with hidden
    `.name.tmp<pid>` for folders that readers list (dataset readers skip dot files)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}" if hidden else f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def replace_durable(path: Path, data: bytes | str, hidden: bool = False) -> None:
    """`path` holds `data` (text is written as UTF-8), replaced durably and atomically."""
    with replacing(path, hidden) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


_RENAME_EXCHANGE = 2  # linux/fs.h


def swap_in_dir(new: Path, path: Path) -> None:
    """`new` (a complete folder) takes the place of `path`, which may exist; the old folder is deleted after.
    Where the file system can (Linux renameat2 RENAME_EXCHANGE: ext4, xfs, btrfs, tmpfs) the two trade places in
    one atomic step, so `path` is always one complete folder; elsewhere (NFS, Lustre) two renames leave the old
    one complete at `<path>.old` for the moment between them."""
    new, path = Path(new), Path(path)
    if path.exists() and _exchange(new, path):
        old = new  # after the exchange the old content lives under the new folder's name
    else:
        old = path.with_name(f"{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)  # one left by a process killed between the two renames
        if path.exists():
            os.replace(path, old)
        os.replace(new, path)
    fsync_path(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically trade two paths' places; False where the C library or the file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_cwd = -100  # AT_FDCWD
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0
