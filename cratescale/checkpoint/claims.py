"""Claims on a run: which job (incarnation) may commit into a checkpoint folder (DESIGN.md section 5).

A claim is one file per claim number, `incarnation/<n:09d>.json` ({job, restart, attempt, incarnation}),
made by linking a complete tmp file to its name: the link fails when the name exists, so two claimants that
start in the same scheduling cycle can never hold one number (a read, add one, write of a single file gave
both the same number and accepted the older one's commits). The run's claim is the highest number not
withdrawn. A claimant that finds, after taking its number, that a claim made meanwhile belongs to a newer
incarnation withdraws its own (rewrites it with `withdrawn: true`; the number stays taken) and is refused.
Runs from before keep a single file `incarnation`: it is read as the claim and moved into the folder at the
next claim.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from cratescale.files import fsync_path, replace_durable, write_file_durable

CLAIMS = "incarnation"  # the folder (a file in runs from before this layout)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        claim = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return claim if isinstance(claim, dict) and isinstance(claim.get("incarnation"), int) else None


def _numbers(root: Path) -> list[int]:
    """Every claim number taken, highest first (withdrawn ones too: a number is never handed out twice)."""
    where = root / CLAIMS
    if where.is_file():
        legacy = _read(where)
        return [legacy["incarnation"]] if legacy else []
    try:
        names = os.listdir(where)
    except OSError:
        return []
    return sorted((int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()), reverse=True)


def _claim_of(root: Path, number: int) -> dict[str, Any] | None:
    where = root / CLAIMS
    return _read(where) if where.is_file() else _read(where / f"{number:09d}.json")


def current(root: Path) -> dict[str, Any] | None:
    """The run's claim: the highest-numbered one that is readable and not withdrawn (read from the top down:
    a run restarted 200 times reads one or two files, not 200)."""
    for number in _numbers(root):
        claim = _claim_of(root, number)
        if claim is not None and not claim.get("withdrawn"):
            return claim
    return None


def newest_number(root: Path) -> int:
    """The highest claim number taken."""
    return max(_numbers(root), default=0)


def is_newer(claim: dict[str, Any] | None, job: str | None, restart: int, attempt: int) -> bool:
    """Whether `claim` belongs to a newer incarnation than (job, restart, attempt): a higher supervisor attempt,
    or the same SLURM job id requeued more often."""
    if claim is None or claim.get("withdrawn"):
        return False
    return claim.get("attempt", 0) > attempt or (
        job is not None and claim.get("job") == job and claim.get("restart", 0) > restart)


def _migrate_legacy(root: Path) -> None:
    """A run from before: its single `incarnation` file becomes the folder's first claim."""
    where = root / CLAIMS
    if not where.is_file():
        return
    legacy = _read(where)
    try:
        where.unlink()
    except FileNotFoundError:
        pass  # another claimant moved it
    where.mkdir(exist_ok=True)
    if legacy is not None:
        _take(root, legacy["incarnation"], legacy)


def _take(root: Path, number: int, claim: dict[str, Any]) -> bool:
    """Exclusively create claim `number` with its whole content; False when the number is taken."""
    where = root / CLAIMS
    tmp = where / f".{number:09d}.{os.getpid()}.{threading.get_ident()}.tmp"
    write_file_durable(tmp, json.dumps(claim, sort_keys=True).encode())
    try:
        os.link(tmp, where / f"{number:09d}.json")
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(where)
    return True


def take_next(root: Path, who: dict[str, Any], floor: int, seen: int) -> int:
    """Claim the lowest free number above `floor` for `who` ({job, restart, attempt}); returns it. `seen`: the
    run's claim number when the caller checked it. Raises LookupError(claim) when a claim taken between `seen`
    and ours is a newer incarnation's (ours is then withdrawn)."""
    root.mkdir(parents=True, exist_ok=True)
    _migrate_legacy(root)
    (root / CLAIMS).mkdir(exist_ok=True)
    number = floor + 1
    while not _take(root, number, {**who, "incarnation": number}):
        number += 1
    for other in (n for n in _numbers(root) if seen < n < number):  # claims taken meanwhile
        claim = _claim_of(root, other)
        if is_newer(claim, who.get("job"), who.get("restart", 0), who.get("attempt", 0)):
            replace_durable(root / CLAIMS / f"{number:09d}.json",
                            json.dumps({**who, "incarnation": number, "withdrawn": True}, sort_keys=True))
            raise LookupError(claim)
    return number
