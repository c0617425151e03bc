"""Two-phase checkpoint commit: write `step_N.tmp/`, fsync, `COMMITTED` marker last, rename, `latest`.

Readers trust only directories named `step_<N:09d>` that hold a valid `COMMITTED` marker; the `latest`
pointer is a hint for people and tools, never the source of truth (a crash between the rename and the
pointer update leaves it stale, and the scan still finds the newest commit).

Collective save (engine/state.py `save_state` drives it): three phases, each followed by an agreement, an
all-reduce of "did any rank fail" and, when one did, a gather of every rank's one-line reason, so all ranks
raise together and none is left waiting in a collective:
    rank 0: store.begin(step)                                  fresh, empty step_N.tmp-i<claim>/ -> agree
    every rank: engine.save_checkpoint(tmp, tag="ds", save_latest=False), its write errors held
                back until DeepSpeed's barriers are passed; rank{r}_rng.pt; rank 0 the tag file;
                each file's size and crc32 while writing (the rank's own list)  -> agree, lists gathered
    rank 0: store.commit(step, meta, sealed=lists)   lists checked on disk, marker, rename, `latest` -> agree
A failed agreement raises on every rank; rank 0 first calls store.abort(step, reason), which removes the tmp
dir and returns the error to raise.
Single process: `store.save(step, write_fn, meta)` does the three phases and the clean-up.
Background writers (engine.commit_async) do the same from their threads. `commit(step, meta, sealed=...)`
checks that every listed file is there with its writer's size and checksums only the files it was not told
about (DeepSpeed's recovery scripts, meta.json): a seal never takes whatever happens to be in the directory.

Incarnations: a job claims the run at start (`claim_incarnation`, folder `incarnation/`: claims.py) with who it
is (SLURM job id, restart count, the local supervisor's attempt number) and gets the next claim number, never
one another claimant holds, which its commits and its tmp dir names carry. A start older than the claim (same
job, lower restart count; lower attempt) is refused; a writer whose claim was superseded (the ranks of a
partitioned node that keep running while the requeued job starts) is refused at commit, before the rename and
before moving `latest`, and cannot replace a newer commit. Readers order commits by (claim number, step), so a
stale commit that raced past the check is still not the newest.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cratescale.checkpoint import catalog as _catalog
from cratescale.checkpoint import claims as _claims
from cratescale.checkpoint import resave as _resave
from cratescale.checkpoint.durable import check_sealed, checksum_file, seal_files
from cratescale.checkpoint.retention import apply_retention
from cratescale.files import fsync_path, replace_durable, write_file_durable

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
META = "meta.json"
LATEST = "latest"
MARKER_VERSION = 1
STEP_DIR = re.compile(r"^step_(\d{9})$")


class CheckpointError(RuntimeError):
    """Base class of checkpoint errors."""


class CheckpointWriteError(CheckpointError):
    """A save failed; the tmp dir is gone and the previous commit is still the newest."""


class StaleIncarnationError(CheckpointWriteError):
    """A writer whose claim on the run was superseded by a newer job (incarnation): it must not commit."""


class CheckpointCorruptError(CheckpointError, ValueError):
    """A committed checkpoint does not match its COMMITTED marker (size or checksum)."""


@dataclass(frozen=True)
class Commit:
    step: int
    path: Path
    meta: dict[str, Any]
    files: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)  # rel path -> {size, crc32}

    @property
    def bytes(self) -> int:
        return sum(f["size"] for f in self.files.values())


def step_dir_name(step: int) -> str:
    if not isinstance(step, int) or step < 0 or step >= 10**9:
        raise ValueError(f"checkpoint step must be an int in [0, 1e9), got {step!r}")
    return f"step_{step:09d}"


def _list_files(root: Path) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def _fsync_dirs(root: Path) -> None:
    for dirpath, _, _ in os.walk(root, topdown=False):
        fsync_path(Path(dirpath))


def read_marker(path: Path) -> dict[str, Any] | None:
    """The parsed COMMITTED marker of a step dir, or None when it is missing or not a valid marker."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    m = STEP_DIR.match(path.name) or _resave.REPLACED.match(path.name)  # a swap cut short: resave.py
    if not isinstance(marker, dict) or m is None or marker.get("step") != int(m.group(1)):
        return None
    if marker.get("version") != MARKER_VERSION or not isinstance(marker.get("files"), dict):
        return None
    return marker


def _incarnation(marker: dict[str, Any]) -> int:
    value = marker.get("incarnation", -1)
    return value if isinstance(value, int) else -1


class CheckpointStore:
    """Committed checkpoints under `root/step_<N:09d>/`, newest found by a scan, Parquet catalog."""

    def __init__(self, root: Path | str, keep_last: int = 3, keep_every: int = 0, checksum_threads: int = 4):
        if keep_last < 1:
            raise ValueError(f"CheckpointStore keep_last must be >= 1 (the newest commit is always kept), "
                             f"got {keep_last}")
        if keep_every < 0:
            raise ValueError(f"CheckpointStore keep_every must be >= 0, got {keep_every}")
        self.root = Path(root)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.checksum_threads = max(1, checksum_threads)
        self.incarnation: int | None = None  # the claim number; None: never claimed, no incarnation rule

    # ---- paths -------------------------------------------------------------------------------
    def step_path(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    committed_path = step_path

    def tmp_path(self, step: int) -> Path:
        """This writer's tmp dir of `step`: it carries the claim number, so a stale incarnation's begin() or
        abort() of the same step (a partitioned node's rank 0) never touches the live job's files."""
        suffix = "" if self.incarnation is None else f"-i{self.incarnation}"
        return self.root / f"{step_dir_name(step)}.tmp{suffix}"

    @property
    def catalog_path(self) -> Path:
        return self.root / _catalog.CATALOG

    # ---- write side --------------------------------------------------------------------------
    def begin(self, step: int) -> Path:
        """Rank 0, before the barrier: an empty tmp dir for `step` (a leftover of this incarnation is removed;
        other incarnations' leftovers are retention's: clean_stale)."""
        tmp = self.tmp_path(step)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as exc:
            raise self.abort(step, exc) from exc
        return tmp

    def abort(self, step: int, cause: BaseException | str | None = None) -> CheckpointWriteError:
        """Remove this incarnation's tmp dir of `step`; returns the error to raise
        (`raise store.abort(step, exc) from exc`)."""
        tmp = self.tmp_path(step)
        shutil.rmtree(tmp, ignore_errors=True)
        if cause is None:
            cause = "aborted (a rank failed to write its part)"
        reason = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(cause)
        kind = StaleIncarnationError if isinstance(cause, StaleIncarnationError) else CheckpointWriteError
        return kind(f"checkpoint step {step} at {tmp}: {reason}")

    def commit(self, step: int, meta: dict[str, Any] | None = None,
               sealed: dict[str, dict[str, int]] | None = None) -> Commit:
        """Rank 0, after every rank wrote into tmp_path(step): seal, rename, point `latest`, catalog, retain.
        `sealed`: files already fsynced with their size and crc32 (rel path -> {size, crc32}), not re-read."""
        tmp, final = self.tmp_path(step), self.step_path(step)
        t0 = time.perf_counter()
        try:
            if not tmp.is_dir():
                raise FileNotFoundError(f"no tmp dir {tmp} (was begin({step}) called?)")
            meta = {**(meta or {}), "step": step}
            write_file_durable(tmp / META, json.dumps(meta, sort_keys=True, default=str).encode())
            rest = [r for r in _list_files(tmp) if r != MARKER and r not in (sealed or {})]
            files = {**check_sealed(tmp, sealed or {}), **seal_files(tmp, rest, self.checksum_threads)}
            _fsync_dirs(tmp)
            marker = {"version": MARKER_VERSION, "step": step, "time": time.time(), "host": socket.gethostname(),
                      "files": dict(sorted(files.items()))}
            if self.incarnation is not None:
                marker["incarnation"] = self.incarnation
            write_file_durable(tmp / MARKER, json.dumps(marker, sort_keys=True).encode())
            fsync_path(tmp)
            self._check_incarnation(step)
            self._rename_into_place(tmp, final)
        except Exception as exc:
            raise self.abort(step, exc) from exc
        # From here the checkpoint is durable and found by the scan: a failure below must not undo it.
        commit = Commit(step, final, meta, files)
        seconds = time.perf_counter() - t0
        self._after_commit(commit, seconds)
        log.info("checkpoint step %d committed at %s (%.2f GB, %.2f s)", step, final, commit.bytes / 1e9, seconds)
        return commit

    def save(self, step: int, write_fn: Callable[[Path], None], meta: dict[str, Any] | None = None) -> Commit:
        """Single-process save: begin, `write_fn(tmp_dir)`, commit; any failure cleans up and raises."""
        tmp = self.begin(step)
        try:
            write_fn(tmp)
        except Exception as exc:
            raise self.abort(step, exc) from exc
        return self.commit(step, meta)

    # ---- incarnations ------------------------------------------------------------------------
    def claim(self) -> dict[str, Any] | None:
        """The run's current claim ({job, restart, attempt, incarnation}), None when unclaimed or unreadable."""
        return _claims.current(self.root)

    def claim_incarnation(self, job: str | None = None, restart: int = 0, attempt: int = 0) -> int:
        """Rank 0 at start, before resuming: this job becomes the run's writer; returns its claim number (never
        one another claimant holds: claims.py). Raises StaleIncarnationError when the run was claimed by a newer
        incarnation of this job (a higher restart count of the same job id, or a higher supervisor attempt)."""
        claim = self.claim()
        try:
            if _claims.is_newer(claim, job, restart, attempt):
                raise LookupError(claim)
            seen = claim["incarnation"] if claim else 0
            floor = max(_claims.newest_number(self.root), self._newest_incarnation())
            number = _claims.take_next(self.root, {"job": job, "restart": restart, "attempt": attempt}, floor, seen)
        except LookupError as newer:
            other = newer.args[0]
            raise StaleIncarnationError(
                f"checkpoint {self.root}: job {job} restart {restart} attempt {attempt} is older than the "
                f"run's writer (job {other.get('job')} restart {other.get('restart')} attempt "
                f"{other.get('attempt')}): refusing to start") from None
        self.incarnation = number
        return number

    def _newest_incarnation(self) -> int:
        """The highest claim number of the run's claim (withdrawn ones left out) and of every commit."""
        claim = self.claim()
        return max([claim["incarnation"] if claim else 0] + [_incarnation(m) for m in self._markers().values()])

    def _check_incarnation(self, step: int | None) -> None:
        """Refuse when a newer incarnation claimed the run or holds a commit (checked just before the rename
        and before moving `latest`, so a requeued job that started meanwhile wins)."""
        if self.incarnation is None:
            return
        newest = self._newest_incarnation()
        if newest > self.incarnation:
            what = "move `latest`" if step is None else f"commit step {step}"
            raise StaleIncarnationError(f"checkpoint {self.root}: this writer is incarnation {self.incarnation}, "
                                        f"a newer job claimed the run (incarnation {newest}): refusing to {what}")

    def _rename_into_place(self, tmp: Path, final: Path) -> None:
        _resave.swap_into_place(tmp, final)  # a step saved again: never a moment without a complete copy

    def _after_commit(self, commit: Commit, seconds: float) -> None:
        steps: list[int] = []
        newest = lambda: step_dir_name((self._ordered() or [commit.step])[-1])  # noqa: E731
        for what, fn in (("latest pointer", self._point_latest(newest)),
                         ("retention", lambda: steps.extend(self._retain(commit.step))),
                         ("catalog", lambda: _catalog.append(self.catalog_path, commit, seconds, self._steps(),
                                                     self.commits))):
            try:
                fn()
            except Exception as exc:  # the commit itself is durable; readers fall back to the scan
                log.warning("checkpoint step %d committed, but updating the %s failed: %s", commit.step, what, exc)

    def _point_latest(self, newest: Callable[[], str]) -> Callable[[], None]:
        def point() -> None:
            self._check_incarnation(None)  # a stale writer never moves `latest`
            replace_durable(self.root / LATEST, newest())
        return point

    def _retain(self, newest: int) -> list[int]:
        return apply_retention(self.root, self._steps(), newest, self.keep_last, self.keep_every, MARKER)

    def tidy(self, newest: int | None = None) -> list[int]:
        """Retention over what is on disk now, without a new commit: a crash between a commit and its
        retention pass leaves older commits, a torn delete or tmp files that only the next commit would
        clear, and a job resumed at its last step commits nothing; a re-save cut short between its two renames
        is rolled back first (resave.py). One process only (rank 0 at resume). `newest`: the commit the run
        resumes from when newer ones failed verification (retention keeps it, `latest` names it)."""
        self.restore_interrupted()
        steps = self._ordered()
        if not steps:
            return []
        newest = steps[-1] if newest is None else newest
        if self.latest_pointer() != step_dir_name(newest):  # first: retention may delete what a stale pointer names
            replace_durable(self.root / LATEST, step_dir_name(newest))
        return self._retain(newest)

    def restore_interrupted(self) -> list[int]:
        """Put back under its name every commit whose re-save was cut short between its renames (resave.py)."""
        if not self.root.is_dir():
            return []
        return _resave.restore_interrupted(self.root, lambda path: read_marker(path) is not None)

    def newest_first(self) -> list[int]:
        """Committed steps, newest first (by incarnation, then step): the order resume tries them in."""
        return self._ordered()[::-1]

    # ---- read side ---------------------------------------------------------------------------
    def _markers(self) -> dict[int, dict[str, Any]]:
        """step -> marker of every dir with a valid COMMITTED marker (the scan; *.tmp, marker-less ignored)."""
        if not self.root.is_dir():
            return {}
        markers, aside = {}, {}
        for entry in os.scandir(self.root):
            m, m_aside = STEP_DIR.match(entry.name), _resave.REPLACED.match(entry.name)
            if (m or m_aside) and entry.is_dir() and (marker := read_marker(Path(entry.path))) is not None:
                (markers if m else aside)[int((m or m_aside).group(1))] = marker
        return {**aside, **markers}  # a moved-aside copy counts only while its step has no `step_N`

    def _steps(self) -> list[int]:
        """Committed steps, ascending."""
        return sorted(self._markers())

    def _ordered(self) -> list[int]:
        """Committed steps, oldest first by (incarnation, step): the last one is the newest."""
        markers = self._markers()
        return sorted(markers, key=lambda s: (_incarnation(markers[s]), s))

    def sealed_times(self) -> dict[int, float]:
        """step -> when its COMMITTED marker was written, for every commit on disk."""
        return {step: float(marker.get("time", 0.0)) for step, marker in self._markers().items()}

    def load(self, step: int) -> Commit:
        path = self.step_path(step)
        if not path.is_dir() and read_marker(_resave.replaced_path(path)) is not None:
            path = _resave.replaced_path(path)  # a re-save cut short between its renames
        marker = read_marker(path)
        if marker is None:
            raise FileNotFoundError(f"checkpoint step {step}: {path} has no valid {MARKER} marker")
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointCorruptError(f"checkpoint step {step}: {path / META} unreadable: {exc}") from exc
        return Commit(step, path, meta, marker["files"])

    def commits(self) -> list[Commit]:
        return [self.load(s) for s in self._steps()]

    def latest(self, verify: bool = False) -> Commit | None:
        """Newest committed step by scan; with verify=True, the newest one whose files all check out."""
        for step in reversed(self._ordered()):
            try:
                commit = self.load(step)
                if verify:
                    self.verify(commit)
                return commit
            except CheckpointCorruptError as exc:
                if not verify:
                    raise
                log.warning("skipping corrupt checkpoint: %s", exc)
        return None

    def latest_pointer(self) -> str | None:
        """The raw `latest` hint (may be stale); use latest() to resume."""
        try:
            return (self.root / LATEST).read_text().strip() or None
        except OSError:
            return None

    def verify(self, commit: Commit) -> None:
        """Re-read every file of the commit; raises CheckpointCorruptError naming the first bad file."""
        on_disk = set(_list_files(commit.path)) - {MARKER}
        missing = sorted(set(commit.files) - on_disk)
        if missing:
            raise CheckpointCorruptError(f"checkpoint step {commit.step}: {commit.path / missing[0]} is missing")
        rels = sorted(commit.files)
        with ThreadPoolExecutor(min(self.checksum_threads, max(1, len(rels)))) as pool:
            sums = list(pool.map(lambda r: checksum_file(commit.path / r), rels))
        for rel, (size, crc) in zip(rels, sums):
            want = commit.files[rel]
            if size != want["size"]:
                raise CheckpointCorruptError(f"checkpoint step {commit.step}: {commit.path / rel} has {size} bytes, "
                                             f"COMMITTED says {want['size']}")
            if crc != want["crc32"]:
                raise CheckpointCorruptError(f"checkpoint step {commit.step}: {commit.path / rel} crc32 {crc:08x} != "
                                             f"{want['crc32']:08x} in COMMITTED")

    def catalog(self):
        """The Parquet catalog as a pyarrow Table (rebuilt from the scan when missing or unreadable)."""
        return _catalog.read(self.catalog_path, self.commits)
