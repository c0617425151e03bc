"""ENOSPC on a real 2 MiB tmpfs (we run as root; skipped only where `mount` is not permitted, and then the
write-layer injection in test_checkpoint_commit.py and below still covers the clean-up path)."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from cratescale.checkpoint import CheckpointStore, CheckpointWriteError
from cratescale.checkpoint import commit as commit_mod
from tests.tmpfs import mounted_tmpfs


@pytest.fixture
def tiny_fs(tmp_path: Path):
    with mounted_tmpfs(tmp_path / "fs", "2m") as mnt:
        yield mnt


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _first_commit(root: Path) -> CheckpointStore:
    store = CheckpointStore(root / "ckpt")
    store.save(1, lambda p: (p / "w.bin").write_bytes(os.urandom(200_000)), {"world_size": 1})
    return store


def test_enospc_real_tmpfs_while_writing(tiny_fs: Path) -> None:
    store = _first_commit(tiny_fs)
    before, free = _visible(store.root), _free(tiny_fs)

    def too_big(path: Path) -> None:
        with open(path / "w.bin", "wb") as f:  # 3 MiB into a 2 MiB filesystem
            for _ in range(3):
                f.write(os.urandom(1 << 20))
            f.flush()
            os.fsync(f.fileno())

    with pytest.raises(CheckpointWriteError, match=r"checkpoint step 2 at .*step_000000002\.tmp: OSError: .*"
                                                   r"No space left on device") as info:
        store.save(2, too_big)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert _visible(store.root) == before  # no half-written dir, pointer and catalog untouched
    assert _free(tiny_fs) == free  # the partial bytes are gone
    assert store.latest().step == 1 and (store.root / "latest").read_text() == "step_000000001"
    store.verify(store.latest())
    store.save(3, lambda p: (p / "w.bin").write_bytes(b"small"))  # space is back: saving works again
    assert store.latest().step == 3


def test_enospc_real_tmpfs_while_sealing(tiny_fs: Path) -> None:
    """The payload fits exactly; meta.json/COMMITTED then hit ENOSPC inside store.commit()."""
    store = _first_commit(tiny_fs)
    before = _visible(store.root)

    def fill(path: Path) -> None:
        with open(path / "w.bin", "wb") as f:
            f.write(b"\0" * _free(tiny_fs))
            f.flush()
            os.fsync(f.fileno())

    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        store.save(2, fill)
    assert _visible(store.root) == before
    assert store.latest().step == 1 and [c.step for c in store.commits()] == [1]


def test_enospc_injected_at_write_layer_while_sealing(tmp_path: Path, monkeypatch) -> None:
    """Runs everywhere (also where mount is forbidden): ENOSPC injected into the marker write."""
    store = _first_commit(tmp_path)
    real = commit_mod.write_file_durable

    def full_disk(path: Path, data: bytes) -> None:
        if path.name == commit_mod.MARKER:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(commit_mod, "write_file_durable", full_disk)
    with pytest.raises(CheckpointWriteError, match="checkpoint step 2 .*No space left on device"):
        store.save(2, lambda p: (p / "w.bin").write_bytes(b"two"))
    assert not store.tmp_path(2).exists() and not store.step_path(2).exists()
    assert store.latest().step == 1
