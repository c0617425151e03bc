"""Checksummed durable writes of the checkpoint store (the plain durable replace is cratescale/files.py)."""
from __future__ import annotations

import mmap
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cratescale.files import fsync_path

BLOCK = 8 << 20  # 8 MiB read blocks for the checksum pass


class ChecksumWriter:
    """A binary file that computes its crc32 and size while the bytes are written (no second read pass)
    and fsyncs on close: what a background checkpoint writer hands to torch.save. zlib.crc32 and the
    write release the GIL, so training threads keep running beside it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.name = str(self.path)  # as a file object names itself (error messages, fault injection)
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


def checksum_file(path: Path, fsync: bool = False, use_mmap: bool = False) -> tuple[int, int]:
    """(size, crc32) in 8 MiB steps; crc32 releases the GIL, so files are summed on parallel threads.
    use_mmap skips the copy out of the page cache (only for files nobody else can truncate meanwhile:
    a mapped file that shrinks raises SIGBUS). fsyncs the same fd when asked (one open per file)."""
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        if use_mmap and os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
                size = len(view)
                for off in range(0, size, BLOCK):
                    crc = zlib.crc32(view[off:off + BLOCK], crc)
        else:
            buf = bytearray(BLOCK)
            with memoryview(buf) as view:
                while n := f.readinto(buf):
                    crc = zlib.crc32(view[:n], crc)
                    size += n
        if fsync:
            os.fsync(f.fileno())
    return size, crc


def check_sealed(tmp: Path, sealed: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The writers' own lists (rel path -> {size, crc32}, every rank's), after a check that each file is there
    with the size its writer wrote (a file cut short, or removed by someone else, fails the seal here)."""
    for rel, want in sealed.items():
        if not (tmp / rel).is_file():  # (not stat's FileNotFoundError: the one line names what the writer wrote)
            raise OSError(f"{tmp / rel}: missing; its writer wrote {want['size']} bytes")
        size = (tmp / rel).stat().st_size
        if size != want["size"]:
            raise OSError(f"{tmp / rel}: {size} bytes on disk, its writer wrote {want['size']}")
    return {rel: {"size": int(v["size"]), "crc32": int(v["crc32"])} for rel, v in sealed.items()}


def seal_files(tmp: Path, rels: list[str], threads: int) -> dict[str, dict[str, int]]:
    """crc32 + fsync of `rels` (files under `tmp` that no writer listed). The fsyncs (waiting on the disk) run
    beside the checksums (CPU on page-cache data), biggest files first, so the seal costs little more than the
    flush itself."""
    rels = sorted(rels, key=lambda r: -(tmp / r).stat().st_size)
    with ThreadPoolExecutor(min(threads, max(1, 2 * len(rels)))) as pool:
        synced = [pool.submit(fsync_path, tmp / r) for r in rels]
        # Our own tmp dir after every rank finished writing: safe to map.
        sums = [pool.submit(checksum_file, tmp / r, use_mmap=True) for r in rels]
        for f in synced:
            f.result()
        return {r: {"size": s.result()[0], "crc32": s.result()[1]} for r, s in sorted(zip(rels, sums))}
