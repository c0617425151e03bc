"""Re-saving a step that is already committed (a run resumed from an older commit past a damaged newest one,
a stale leftover of the same step): the sealed new copy must take the old one's name, and a directory cannot
be renamed over a non-empty one, so the old copy moves aside first (`step_N.replaced.tmp`) and the new one
takes its place. A kill between the two renames leaves no `step_N`: the scan then takes the moved-aside copy,
a complete commit, as step N (before, a run with keep_last 1 resumed from step 0 without a word), and
`restore_interrupted` (the resume's tidy) renames it back.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from cratescale.files import fsync_path

REPLACED = re.compile(r"^step_(\d{9})\.replaced\.tmp$")


def replaced_path(final: Path) -> Path:
    return final.with_name(f"{final.name}.replaced.tmp")


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the sealed `tmp` to `final`; an old `final` is moved aside first and removed once `tmp` is in
    place. Its universal cache was converted from the old copy: it goes before the new copy is visible."""
    if not final.exists():
        os.rename(tmp, final)
        fsync_path(final.parent)
        return
    old = replaced_path(final)
    shutil.rmtree(old, ignore_errors=True)  # a leftover of an earlier swap whose `final` is complete
    shutil.rmtree(final.with_name(f"{final.name}.universal"), ignore_errors=True)
    os.rename(final, old)
    fsync_path(final.parent)  # from here the scan finds step N as `old`
    os.rename(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def only_copy(root: Path, name: str) -> bool:
    """Whether `name` is a moved-aside commit whose step has no `step_N` (a swap cut short): never deleted."""
    m = REPLACED.match(name)
    return m is not None and not (root / f"step_{m.group(1)}").exists()


def restore_interrupted(root: Path, is_commit) -> list[int]:
    """Rename every moved-aside commit whose swap was cut short back to `step_N`; returns their steps.
    `is_commit(path)`: whether the dir holds a valid marker (a copy that is not one is retention's)."""
    restored = []
    for entry in os.scandir(root):
        if only_copy(root, entry.name) and is_commit(Path(entry.path)):
            step = int(REPLACED.match(entry.name).group(1))
            os.rename(entry.path, root / f"step_{step:09d}")
            restored.append(step)
    if restored:
        fsync_path(root)
    return restored
