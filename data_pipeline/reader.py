"""Read a sample's encoded bytes: a plain file (offset -1) or a tar shard member (offset >= 0).

Tar shards are read with os.pread on cached descriptors: no seek state, so one reader can be
shared by threads, and a loader worker keeps a small LRU of open shards instead of reopening.
"""
from __future__ import annotations

import os
from collections import OrderedDict


class ByteReader:
    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._fds: OrderedDict[str, int] = OrderedDict()

    def _fd(self, path: str) -> int:
        fd = self._fds.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            while len(self._fds) >= self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[path] = fd
        return fd

    def read(self, path: str, offset: int, size: int) -> bytes:
        """The sample's bytes; may be shorter than `size` if the file was truncated since ingest."""
        if offset < 0:
            with open(path, "rb") as f:
                return f.read()
        return os.pread(self._fd(path), size, offset)

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may be gone
            pass

    def __getstate__(self):
        # Open descriptors do not travel to worker processes; each worker opens its own.
        return {"max_open": self.max_open}

    def __setstate__(self, state):
        self.__init__(state["max_open"])
