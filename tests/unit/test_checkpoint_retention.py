"""Retention: last k + every m-th, never the newest committed; stale tmp dirs and universal caches cleaned."""
from __future__ import annotations

from pathlib import Path

import pytest

from cratescale.checkpoint import CheckpointStore, steps_to_keep


def _write(path: Path) -> None:
    (path / "w.bin").write_bytes(b"w" * 100)


def _on_disk(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))


@pytest.mark.parametrize("keep_last,keep_every,expect", [
    (2, 0, {9, 10}),
    (2, 4, {4, 8, 9, 10}),
    (1, 0, {10}),
    (3, 5, {5, 8, 9, 10}),
    (20, 0, set(range(1, 11))),
])
def test_rule(keep_last: int, keep_every: int, expect: set[int]) -> None:
    assert steps_to_keep(list(range(1, 11)), keep_last, keep_every) == expect


def test_store_applies_retention_and_catalog_tracks_it(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2, keep_every=3)
    for step in range(1, 8):
        store.save(step, _write, {"world_size": 1})
    assert [c.step for c in store.commits()] == [3, 6, 7]
    assert _on_disk(tmp_path) == ["step_000000003", "step_000000006", "step_000000007"]
    rows = {r["step"]: r["present"] for r in store.catalog().to_pylist()}
    assert rows == {1: False, 2: False, 3: True, 4: False, 5: False, 6: True, 7: True}


def test_newest_committed_is_never_deleted(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=1)
    store.save(10, _write)
    store.save(5, _write)  # an older step committed after a newer one (e.g. a re-run): both survive
    assert [c.step for c in store.commits()] == [5, 10]
    assert store.latest().step == 10
    store.save(11, _write)
    assert [c.step for c in store.commits()] == [11]


def test_stale_tmp_and_universal_dirs_are_cleaned(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=1)
    store.save(1, _write)
    for name in ("step_000000002.tmp", "step_000000001.universal", "step_000000002.universal.tmp",
                 "step_000000009.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "junk").write_bytes(b"j")
    store.save(3, _write)
    # 2.tmp is older than the new commit (a dead save); 9.tmp may be a save in progress: kept.
    assert _on_disk(tmp_path) == ["step_000000003", "step_000000009.tmp"]

