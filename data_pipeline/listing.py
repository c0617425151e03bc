"""The listing of an ImageFolder tree: every file gets a verdict (kept, or rejected with a reason).

The root's own entries are looked at by the driver; the class directories below it are listed by jobs
(`list_subtrees`, a run of neighbouring class directories each, at most JOBS), run by `map_jobs`:
`itertools.starmap` (serial) or Ray tasks (`ray_map`). The result does not depend on which: files sorted,
rejects in the top-down walk order of `os.walk` with sorted names (the order the serial walk gave before).
Measured on 10^6 files of a local disk (BENCHMARKS.md), listing costs less than moving its result between
processes: the Ray tasks pay off where a listing waits on the file system (a network file system, a cold cache).

Entries are read with `os.scandir`: a regular file's type comes from the directory entry, without a stat
call (os.walk + isfile/islink stat each file twice; a tree of 14M files is ~28M stat calls).
"""
from __future__ import annotations

import os
from itertools import starmap
from typing import Callable, Iterable, Iterator

# Class directories are listed in at most this many jobs, neighbours together: a Ray task costs about a
# millisecond, more than listing a small class directory (ImageNet-21k: 21,841 directories of ~650 files).
JOBS = 256
Listing = tuple[list[str], list[dict]]  # (relative paths of kept files, rejects)
MapJobs = Callable[[Callable, Iterable], Iterator]


def reject(path: str, member: str, reason: str) -> dict:
    """A rejected file (or archive member) and why: a row of rejected.parquet."""
    return {"path": str(path), "member": member, "reason": reason}


def _symlink_reason(full: str, real_root: str) -> str | None:
    target = os.path.realpath(full)
    if not (target + os.sep).startswith(real_root + os.sep) or target == real_root:
        return f"symlink points outside the tree ({os.readlink(full)})"
    if not os.path.isfile(target):
        return "broken symlink"
    return None


def _scan_dir(root: str, rel: str, real_root: str, files: list[str], rejects: list[dict]) -> list[str]:
    """One directory (`rel` under `root`, "" for the root): its files' verdicts; returns the subdirectories
    to descend into, sorted (symlinked ones are refused, as os.walk(followlinks=False) leaves them)."""
    path = os.path.join(root, rel) if rel else root
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        # os.walk skipped an unreadable directory without a word; it is a verdict on every file under it
        rejects.append(reject(path, "", f"unreadable directory: {e.strerror}"))
        return []
    dirs, names = [], []
    for e in entries:
        try:
            is_dir = e.is_dir()
        except OSError:
            is_dir = False
        (dirs if is_dir else names).append(e)
    descend = []
    for e in dirs:
        if e.is_symlink():
            rejects.append(reject(e.path, "", "symlinked directory not followed"))
        else:
            descend.append(f"{rel}/{e.name}" if rel else e.name)
    for e in names:
        why = None
        if e.is_symlink():
            why = _symlink_reason(e.path, real_root)
        elif not e.is_file():
            why = "not a regular file"
        if why is None and not rel:
            why = "no class folder: file at the root"
        if why:
            rejects.append(reject(e.path, "", why))
        else:
            files.append(f"{rel}/{e.name}")
    return descend


def list_subtrees(root: str, tops: list[str]) -> tuple[str, list[dict]]:
    """The listing of directories `tops` (relative to `root`) and everything below them, top-down, in order.
    The kept files come as one NUL-separated string (no file name holds a NUL): a list of a million strings costs
    more to move between processes than to list on a local disk."""
    real_root = os.path.realpath(root)
    files: list[str] = []
    rejects: list[dict] = []
    stack = list(reversed(tops))
    while stack:
        rel = stack.pop()
        stack.extend(reversed(_scan_dir(root, rel, real_root, files, rejects)))
    return "\0".join(files), rejects


def list_folder(root: str, map_jobs: MapJobs = starmap) -> Listing:
    """The listing of the tree at `root` (absolute): the root by this process, each class directory as one job
    of `map_jobs(fn, [args, ...])` (which returns results in job order)."""
    files: list[str] = []
    rejects: list[dict] = []
    tops = _scan_dir(root, "", os.path.realpath(root), files, rejects)
    per_job = max(1, -(-len(tops) // JOBS))  # an empty root has no tops: one (empty) job size, not 0
    jobs = [(root, tops[i:i + per_job]) for i in range(0, len(tops), per_job)]
    for sub_files, sub_rejects in map_jobs(list_subtrees, jobs):
        files += sub_files.split("\0") if sub_files else []
        rejects += sub_rejects
    files.sort()  # "a-b/x" sorts before "a/y": the per-directory order is not the global one
    return files, rejects


def ray_map(ray) -> MapJobs:
    """`map_jobs` over Ray tasks (one CPU each), results in job order."""
    def run(fn: Callable, args: Iterable) -> Iterator:
        task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(fn)
        refs = [task.remote(*a) for a in args]
        for ref in refs:
            yield ray.get(ref)
    return run
