"""The step agreement: what every rank must decide together before a step trains, in one all-reduce.

Three decisions are collective at each step boundary: stop (a signal reached some rank), the step's bad samples
(the budget stops every rank at the same step) and the asynchronous commit in flight (still writing, failed).
Each was its own all-reduce with a host sync after it; on a GPU each is a kernel launch, a NCCL round trip and a
stream sync, at 64-512 ranks a latency-bound collective per decision. One int64 tensor carries all of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cratescale.engine.state import collective_device


@dataclass(frozen=True)
class Agreed:
    stop: bool           # some rank was asked to stop (preemption, time limit)
    bad: int             # samples replaced this step, summed over ranks
    lost: int            # samples with no decodable replacement, summed over ranks
    commit_busy: bool    # some rank still writes the commit in flight
    commit_failed: bool  # some rank's write of it failed


def agree(stop: bool, bad: int, lost: int, commit_busy: int, commit_failed: int) -> Agreed:
    """One all-reduce (sum) of this rank's view; the same Agreed on every rank."""
    mine = [int(stop), bad, lost, commit_busy, commit_failed]
    if not dist.is_initialized():
        total = mine
    else:
        t = torch.tensor(mine, dtype=torch.int64, device=collective_device())
        dist.all_reduce(t)
        total = t.tolist()  # the one host sync of the step's agreement
    return Agreed(total[0] > 0, total[1], total[2], total[3] > 0, total[4] > 0)
