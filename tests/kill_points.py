"""Where the crash tests kill a writer: around CheckpointStore's rename of a sealed commit into place (the product
keeps no test hooks; the tests wrap its own method)."""
from __future__ import annotations

from typing import Callable


def kill_around_rename(rename: Callable, when: str, kill: Callable[[], None]) -> Callable:
    """`rename` (CheckpointStore._rename_into_place) with `kill()` called just before it ("before": sealed and
    fsynced, not yet in place) or just after it ("after": found by the scan, `latest` not yet moved)."""
    if when not in ("before", "after"):
        raise ValueError(f"kill_around_rename: when must be 'before' or 'after', got {when!r}")

    def wrapped(self, tmp, final):
        if when == "before":
            kill()
        rename(self, tmp, final)
        if when == "after":
            kill()

    return wrapped


def kill_after_rename_to(rename: Callable, suffix: str, kill: Callable[[], None]) -> Callable:
    """`rename` (os.rename) with `kill()` called right after the first rename whose target ends with `suffix`: a
    re-save killed between moving the old copy aside (`.replaced.tmp`) and renaming the new one into place."""
    def wrapped(src, dst, *args, **kwargs):
        rename(src, dst, *args, **kwargs)
        if str(dst).endswith(suffix):
            kill()

    return wrapped
