"""Tar scanning without extraction, and a deterministic uncompressed tar shard writer."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from .durable import replaced_by

BLOCK = 512
RECORD = 20 * BLOCK


def unsafe_member_reason(info: tarfile.TarInfo) -> str | None:
    """Why a member must not be read (None when it is a safe regular file).

    We never extract, only read bytes at offsets inside the archive, so nothing can be written or
    read outside it; still, `..`/absolute names and links are refused and listed, as a tree that
    contains them is suspect.
    """
    name = info.name
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return "unsafe tar member: absolute path"
    if ".." in PurePosixPath(name).parts:
        return "unsafe tar member: '..' in path"
    if info.issym() or info.islnk():
        return f"unsafe tar member: {'symlink' if info.issym() else 'hard link'} to {info.linkname!r}"
    if not info.isfile():
        return "not a regular file"
    return None


class Window(io.RawIOBase):
    """Read-only file object over bytes [start, start+length) of another file (an inner tar)."""

    def __init__(self, f: BinaryIO, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        if n == 0:
            return 0
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


def iter_members(f: BinaryIO, base_offset: int = 0,
                 errors: list[str] | None = None) -> Iterator[tuple[tarfile.TarInfo, int]]:
    """(member, absolute data offset) for every member of an uncompressed tar, headers only.

    `tf.members` is cleared as we go so a tar of millions of members does not pile up TarInfos.
    A damaged or truncated archive raises, unless `errors` is given: then the members read so
    far are kept, the error is appended to it and iteration stops.
    """
    try:
        with tarfile.open(fileobj=f, mode="r:") as tf:
            while True:
                info = tf.next()
                if info is None:
                    break
                yield info, base_offset + info.offset_data
                tf.members = []
    except (tarfile.TarError, EOFError, OSError) as e:
        if errors is None:
            raise
        errors.append(f"{type(e).__name__}: {e}")


def is_compressed_tar(path: str | Path) -> bool:
    with open(path, "rb") as f:
        magic = f.read(6)
    return magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00"


def member_key(name: str) -> str:
    """A shard-safe member stem: no directories, no dots (webdataset splits keys at the first dot)."""
    return name.replace("/", "__").replace(".", "_")


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> list[tuple[int, int]]:
    """Write an uncompressed tar atomically; return (data offset, size) per member, in order.

    Headers carry fixed metadata (mtime 0, root, 0644) so a rerun writes identical bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    locations = []
    pos = 0
    with replaced_by(path) as f:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            f.write(header)
            pos += len(header)
            locations.append((pos, len(data)))
            f.write(data)
            pad = (-len(data)) % BLOCK
            f.write(b"\0" * pad)
            pos += len(data) + pad
        end = pos + 2 * BLOCK
        f.write(b"\0" * (2 * BLOCK + (-end) % RECORD))
    return locations
