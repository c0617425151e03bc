"""The bad-data budget (DESIGN.md section 4): a sample that fails to read or decode is replaced by the
loader and counted; the run stops with one line when

- a sample found no decodable replacement (its batch carries filler bytes: it must never be trained on),
- the last `window_steps` steps' samples were mostly (> half) unreadable (an unmounted filesystem, a lost
  shard), or
- the samples that failed exceed `max_fraction` of the samples seen by this process (checked once a
  window's worth has been seen, so one bad file in the first step of a 0.1%-corrupt dataset is no stop).

Ranks agree on the counts each step (in the trainer's one all-reduce per step, engine/agreement.py) before the
step's batches reach the model, so every rank stops together at the same step, never in the middle of a
collective, and nothing is committed.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from cratescale.engine.state import collective_device

MOSTLY = 0.5


class BadDataError(RuntimeError):
    """Too many unreadable samples; the message is the one line the run ends with."""


class BadDataBudget:
    """Per-step agreement on this process's bad-sample counts, summed over ranks (`total`)."""

    def __init__(self, max_fraction: float, window_steps: int, global_batch: int):
        self.max_fraction, self.window_steps, self.global_batch = max_fraction, window_steps, global_batch
        self.total = 0      # failed samples over all ranks since this process started
        self.steps = 0      # steps checked by this process
        self._window: deque[int] = deque(maxlen=window_steps)
        self._seen_local = (0, 0)  # (count, lost) of this rank's loader at the last check

    def local_counts(self, bad) -> tuple[int, int]:
        """This rank's (failed, lost) samples since the last call; `bad`: the rank's loader.bad (BadSamples)."""
        step_bad, step_lost = bad.count - self._seen_local[0], bad.lost - self._seen_local[1]
        self._seen_local = (bad.count, bad.lost)
        return step_bad, step_lost

    def apply(self, step_bad: int, step_lost: int, bad) -> None:
        """The step's counts summed over ranks (the trainer's one agreement per step). Raises BadDataError on
        every rank at once when the budget is spent."""
        self.total += step_bad
        self.steps += 1
        self._window.append(step_bad)
        reason = self._reason(step_lost)
        if reason is not None:
            raise BadDataError(f"bad data: {reason}; first: {', '.join(_examples(bad.examples)) or 'unknown'}")

    def check(self, bad) -> None:
        """local_counts, summed over ranks, then apply: after a step's batches are fetched, before they train."""
        t = torch.tensor(self.local_counts(bad), dtype=torch.int64, device=collective_device())
        if dist.is_initialized():
            dist.all_reduce(t)
        self.apply(*(int(v) for v in t.tolist()), bad)

    def _reason(self, lost: int) -> str | None:
        seen = self.steps * self.global_batch
        if lost:
            return f"{lost} sample(s) found no decodable replacement ({self.total} of {seen} samples failed)"
        window = len(self._window) * self.global_batch
        if sum(self._window) > MOSTLY * window:
            return (f"{sum(self._window)} of the last {len(self._window)} steps' {window} samples failed "
                    f"(mostly unreadable)")
        if seen >= self.window_steps * self.global_batch and self.total > self.max_fraction * seen:
            return (f"{self.total} of {seen} samples failed ({self.total / seen:.2%}), over "
                    f"data.max_bad_fraction={self.max_fraction}")
        return None


def _examples(mine: list[str], keep: int = 5) -> list[str]:
    """The first few failed samples of every rank ('path (reason)'), rank 0's first."""
    if not dist.is_initialized():
        return mine[:keep]
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine[:keep])
    return [e for part in gathered for e in part or []][:keep]
