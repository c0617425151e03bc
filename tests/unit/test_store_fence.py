"""One writer per shard under retries (issue 29.6): Ray retries a shard whose first actor was cut off but still
writes. Two writers of one shard, interleaved: the attempt that claimed last owns the shard, the other can
neither commit nor remove the owner's rows; a late writer of a committed shard leaves it as it is."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cratescale.embeddings.store import EmbeddingStore, StoreInfo, StoreWriteError

N, SHARD, DIMS = 40, 8, {"cls": 4, "mean": 3}


def _store(root: Path) -> EmbeddingStore:
    info = StoreInfo(num_rows=N, dims=dict(DIMS), dtype="float32", shard_rows=SHARD, chunk_rows=4,
                     source={"manifest": "m", "fingerprint": "f"})
    return EmbeddingStore.create(root, info)


def _rows(k: int, value: float) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    ids = np.arange(k * SHARD, (k + 1) * SHARD)
    feats = {name: np.full((SHARD, d), value, dtype=np.float32) for name, d in DIMS.items()}
    meta = pd.DataFrame({"sample_id": ids, "key": [f"k{i}" for i in ids], "label": ids % 3, "split": "train"})
    return feats, meta


def _shard(store: EmbeddingStore, k: int) -> np.ndarray:
    return store.read("cls", slice(k * SHARD, (k + 1) * SHARD))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_late_writer_of_a_committed_shard_neither_deletes_nor_replaces_its_rows(tmp_path: Path) -> None:
    root = tmp_path / "s"
    retry = _store(root)
    retry.write_shard(2, *_rows(2, 1.0))  # the retry committed shard 2
    before = _files(root)
    late = EmbeddingStore(root)  # the first actor, cut off by a partition, reaches its write afterwards
    late.write_shard(2, *_rows(2, 9.0))
    assert _files(root) == before  # before: its clean-up removed the retry's marker and rows, then wrote its own
    assert (_shard(retry, 2) == 1.0).all() and retry.verify() == [] and sorted(retry.committed()) == [2]


def test_two_writers_of_one_shard_interleaved(tmp_path: Path) -> None:
    root = tmp_path / "s"
    first, retry = _store(root), EmbeddingStore(root)
    staged_first = first.stage_shard(3, *_rows(3, 7.0))    # the first actor is writing shard 3 ...
    staged_retry = retry.stage_shard(3, *_rows(3, 1.0))    # ... Ray retries the group on another actor
    assert not staged_first.fence.dir.exists() and staged_retry.fence.dir.is_dir()  # superseded staging gone
    with pytest.raises(StoreWriteError, match=r"shard 3: another attempt took the shard over"):
        first.commit_staged(staged_first)                   # the late writer cannot commit ...
    assert staged_retry.fence.dir.is_dir() and staged_retry.fence.holds()  # ... nor touch the retry's attempt
    assert 3 not in first.committed() and np.isnan(_shard(first, 3)).all()
    retry.commit_staged(staged_retry)
    assert (_shard(retry, 3) == 1.0).all() and retry.verify() == [] and sorted(retry.committed()) == [3]

    # The other order: the retry commits first, then the superseded writer reaches its commit: refused, the
    # retry's rows stay.
    staged_first = first.stage_shard(4, *_rows(4, 7.0))
    staged_retry = retry.stage_shard(4, *_rows(4, 1.0))
    retry.commit_staged(staged_retry)
    committed = _files(root)
    with pytest.raises(StoreWriteError, match=r"shard 4: another attempt took the shard over"):
        first.commit_staged(staged_first)
    assert _files(root) == committed and (_shard(retry, 4) == 1.0).all() and retry.verify() == []
    assert not any((root / "tmp").rglob("*"))  # no claim or staging left behind


def test_a_rerun_clears_what_killed_attempts_left(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = _store(root)
    store.stage_shard(1, *_rows(1, 5.0))  # killed before its commit: a claim and a staging copy left
    assert any((root / "tmp").rglob("*"))
    rerun = _store(root)  # the next extraction opens the store before any writer starts
    assert not (root / "tmp").exists()
    rerun.write_shard(1, *_rows(1, 5.0))
    assert (_shard(rerun, 1) == 5.0).all() and rerun.verify() == []
