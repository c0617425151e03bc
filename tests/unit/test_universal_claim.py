"""One converter per run for the universal conversion (issue 31.6): every rank of every node calls
ensure_universal at once after a change of world size; the exclusive creation of a marker beside the commit
(not flock, which is node-local on Lustre's localflock and missing elsewhere) picks one converter, the others
wait for its finished dir; a dead converter's marker is taken over once stale. The real ds_to_universal runs in
tests/dist/test_universal.py; here `convert` is replaced by a slow fake that counts, in 4 processes."""
from __future__ import annotations

import errno
import multiprocessing as mp
import os
import time
from pathlib import Path

from cratescale.checkpoint.commit import Commit


def _zero2_commit(root: Path) -> Commit:
    step = root / "step_000000004"
    (step / "ds").mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        (step / "ds" / name).write_bytes(b"x")
    return Commit(step=4, path=step, meta={})


def _no_flock(*args, **kwargs) -> None:
    raise OSError(errno.ENOLCK, "No locks available")  # NFS without lockd; node-local on Lustre localflock


def _rank(root: str, calls: str, start: float) -> None:
    import fcntl

    from cratescale.checkpoint import universal

    fcntl.flock = _no_flock

    def fake_convert(src: Path, out_tag_dir: Path, workers: int = 1, timeout_s: float = 3600) -> None:
        with open(calls, "a") as f:
            f.write(f"{os.getpid()} {workers}\n")
        time.sleep(1.5)  # slower than the waiters' polls: they must wait, not convert
        (out_tag_dir / "zero").mkdir(parents=True)
        (out_tag_dir.parent / "latest_universal").write_text("ds")

    universal.convert = fake_convert
    time.sleep(max(0.0, start - time.time()))  # all four at once
    tag_dir = universal.ensure_universal(Commit(step=4, path=Path(root) / "step_000000004", meta={}), poll_s=0.05)
    assert (tag_dir / "zero").is_dir()


def test_four_ranks_at_once_convert_once_without_flock(tmp_path: Path) -> None:
    _zero2_commit(tmp_path)
    calls = tmp_path / "calls.txt"
    ctx = mp.get_context("spawn")
    start = time.time() + 3
    procs = [ctx.Process(target=_rank, args=(str(tmp_path), str(calls), start)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    lines = calls.read_text().splitlines()
    assert len(lines) == 1, lines
    assert int(lines[0].split()[1]) == max(1, min(16, len(os.sched_getaffinity(0))))  # the node's cores
    assert not (tmp_path / "step_000000004.universal.converting").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calls.txt", "step_000000004", "step_000000004.universal"]


def test_a_dead_converters_marker_is_taken_over_once_stale(tmp_path: Path, monkeypatch) -> None:
    from cratescale.checkpoint import universal

    commit = _zero2_commit(tmp_path)
    marker = tmp_path / "step_000000004.universal.converting"
    marker.write_text("node7 4242 0\n")  # its converter was SIGKILLed with its node

    def fake_convert(src: Path, out_tag_dir: Path, workers: int = 1, timeout_s: float = 3600) -> None:
        (out_tag_dir / "zero").mkdir(parents=True)
        (out_tag_dir.parent / "latest_universal").write_text("ds")

    monkeypatch.setattr(universal, "convert", fake_convert)
    t0 = time.monotonic()
    universal.ensure_universal(commit, stale_s=1.0, poll_s=0.05)
    waited = time.monotonic() - t0
    assert waited >= 0.9, "a fresh marker must be waited for, not taken over"
    assert (tmp_path / "step_000000004.universal" / "ds" / "zero").is_dir() and not marker.exists()
