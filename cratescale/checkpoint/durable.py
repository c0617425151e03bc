"""Durable writes, shared by the checkpoint store and the embedding store."""
from __future__ import annotations

import os
import zlib
from pathlib import Path


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


class ChecksumWriter:
    """A binary file that computes its crc32 and size while the bytes are written (no second read pass)
    and fsyncs on close: what a background checkpoint writer hands to torch.save. zlib.crc32 and the
    write release the GIL, so training threads keep running beside it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
        self.size, self.crc32 = 0, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc32 = zlib.crc32(view, self.crc32)
        done = 0
        while done < len(view):  # a raw write may be short
            done += self._file.write(view[done:])
        self.size += done
        return done

    def flush(self) -> None:
        pass  # unbuffered; durability comes from close()

    def close(self) -> tuple[int, int]:
        """fsync and close; returns (size, crc32)."""
        if not self._file.closed:
            try:
                os.fsync(self._file.fileno())
            finally:
                self._file.close()
        return self.size, self.crc32

    def __enter__(self) -> "ChecksumWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._file.close()
