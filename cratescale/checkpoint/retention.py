"""Retention: keep the last k commits plus every m-th step; never the newest committed one.

Deleting a commit removes its COMMITTED marker first (and fsyncs the dir), so a crash mid-delete leaves
an uncommitted dir that every reader ignores, never a "committed" checkpoint with files missing. The next
retention pass removes such torn dirs, and the tmp files of a pointer or catalog rewrite cut short by a crash.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from cratescale.checkpoint.resave import only_copy
from cratescale.files import fsync_path

log = logging.getLogger(__name__)

# step_<N>.tmp (an unfinished save), step_<N>.universal.tmp-<host>-<pid> (an unfinished conversion),
# step_<N>.replaced.tmp (a re-saved step's old copy; kept while it is step N's only copy: resave.py),
# step_<N>.tmp-i<claim> (an unfinished save of incarnation <claim>).
_TMP = re.compile(r"^step_(\d{9})(?:\.universal|\.replaced)?\.tmp(?:-[\w.-]+)?$")
_UNIVERSAL = re.compile(r"^step_(\d{9})\.universal$")
_STEP = re.compile(r"^step_(\d{9})$")
# `latest.<pid>.tmp` / `catalog.parquet.<pid>.tmp` / `incarnation.<pid>.tmp`: a rewrite killed before its rename.
_FILE_TMP = re.compile(r"^(?:latest|catalog\.parquet|incarnation)\.\d+\.tmp$")


def steps_to_keep(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """Pure rule: the last `keep_last` steps, every step divisible by `keep_every` (>0), the newest."""
    if keep_last < 1:
        raise ValueError(f"retention keep_last must be >= 1, got {keep_last}")
    ordered = sorted(steps)
    keep = set(ordered[-keep_last:])
    if keep_every > 0:
        keep |= {s for s in ordered if s % keep_every == 0}
    if ordered:
        keep.add(ordered[-1])
    return keep


def delete_commit(root: Path, step: int, marker: str = "COMMITTED") -> None:
    path = root / f"step_{step:09d}"
    (path / marker).unlink(missing_ok=True)
    fsync_path(path)
    shutil.rmtree(path)
    shutil.rmtree(root / f"step_{step:09d}.universal", ignore_errors=True)
    (root / f"step_{step:09d}.universal.lock").unlink(missing_ok=True)


def clean_stale(root: Path, newest: int, keep: set[int]) -> list[str]:
    """Remove tmp dirs of steps <= the newest commit (a newer tmp may be a save in progress), universal
    caches of steps no longer kept, step dirs older than the newest that are not kept (a delete cut short by
    a crash: no marker, some files gone; a save only ever renames a sealed dir to that name), and the tmp
    files of an interrupted `latest`/catalog rewrite (rank 0 writes them, and is past both when it gets here)."""
    removed = []
    for entry in os.scandir(root):
        m_tmp, m_uni, m_step = _TMP.match(entry.name), _UNIVERSAL.match(entry.name), _STEP.match(entry.name)
        stale = (m_tmp and int(m_tmp.group(1)) <= newest) or (m_uni and int(m_uni.group(1)) not in keep) or \
            (m_step and int(m_step.group(1)) < newest and int(m_step.group(1)) not in keep)
        if stale and entry.is_dir(follow_symlinks=False) and not only_copy(root, entry.name):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
        elif _FILE_TMP.match(entry.name) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(entry.name)
    return removed


def apply_retention(root: Path, committed: list[int], newest: int, keep_last: int, keep_every: int,
                    marker: str = "COMMITTED") -> list[int]:
    """Delete the commits the rule drops; returns the deleted steps. `newest` is always kept."""
    keep = steps_to_keep(committed, keep_last, keep_every) | {newest}
    deleted = []
    for step in sorted(set(committed) - keep):
        delete_commit(root, step, marker)
        deleted.append(step)
    removed = clean_stale(root, newest, keep)
    if deleted or removed:
        log.info("retention: deleted steps %s, stale dirs %s", deleted, removed)
    return deleted
