"""Durable file writes for every layer of the package (standard library only).

A file replaced through `replacing` / `replace_durable` is seen, also after a crash or a power cut, with its
old content or its new one, never a part: the new bytes go to a tmp sibling, which is fsynced, renamed over
the file, and the folder fsynced (the rename itself survives a crash). data_pipeline keeps its own copy
(data_pipeline/durable.py): it imports nothing from cratescale (DESIGN.md section 2).
"""
from __future__ import annotations

import os
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
