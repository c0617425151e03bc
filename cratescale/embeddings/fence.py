"""One writer per shard, also under Ray's retries (DESIGN.md section 7).

Ray retries a shard group when its actor becomes unreachable (a network partition), and the first actor may
still be writing: two writers on one shard. So a writer never writes into the store's arrays directly. It takes
an attempt token, claims the shard (`tmp/shard_<k>.owner` holds the newest claimant's token: a retry claims
after the attempt it replaces), writes its rows into its own staging copy of the arrays
(`tmp/shard_<k>.<token>/<name>`, the store's array metadata, so the shard file's bytes are those the store would
hold), and commits under the store's commit lock only while the owner file still holds its token. A writer that
was superseded can neither commit nor remove anything but its own staging directory; a shard already committed
is never rewritten (the rows are the same, and a late writer's failure could otherwise remove them).

The lock is an flock on the store's `commits/` folder (no extra file in the store); where a shared file system
ignores flock, the token check is still the fence, narrowed to the few renames of a commit.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cratescale.files import replace_durable

TMP = "tmp"


class ShardFence:
    """An attempt's claim on shard `k` of the store at `root`, with its staging directory."""

    def __init__(self, root: Path, k: int) -> None:
        self.root, self.k = Path(root), k
        self.token = uuid.uuid4().hex
        self.owner = self.root / TMP / f"shard_{k:06d}.owner"
        self.dir = self.root / TMP / f"shard_{k:06d}.{self.token}"

    def claim(self) -> None:
        """This attempt becomes the shard's writer; earlier attempts' staging (superseded) goes."""
        self.dir.mkdir(parents=True)
        replace_durable(self.owner, self.token)
        for other in self.root.joinpath(TMP).glob(f"shard_{self.k:06d}.*"):
            if other != self.dir and other.is_dir():
                shutil.rmtree(other, ignore_errors=True)

    def array_file(self, name: str, file: str) -> Path:
        """A file of this attempt's staging copy of array `name` (its folder made)."""
        (self.dir / name).mkdir(parents=True, exist_ok=True)
        return self.dir / name / file

    def holds(self) -> bool:
        try:
            return self.owner.read_text() == self.token
        except OSError:
            return False

    @contextmanager
    def sealing(self) -> Iterator[None]:
        """The store's commit lock: one shard commit at a time (milliseconds: renames and two small files)."""
        fd = os.open(self.root / "commits", os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def release(self) -> None:
        """Remove this attempt's staging, and its claim while it still holds it (never a newer one's)."""
        if self.holds():
            self.owner.unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass(frozen=True)
class StagedShard:
    """A shard's rows written under an attempt's token, its metadata file and marker not yet."""
    k: int
    fence: ShardFence
    metadata: bytes
    marker: dict[str, Any]


def clear_all(root: Path) -> None:
    """Before any writer of a run starts (the store is opened by one process): what killed attempts left."""
    shutil.rmtree(Path(root) / TMP, ignore_errors=True)
