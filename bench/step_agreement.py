"""The per-step agreement's cost on 2 ranks (gloo, CPU), before and after issue 31.5, timed in the same run:

    .venv/bin/python -m bench.step_agreement [--boundaries 2000] [--json bench/results/step_agreement.json]

  before  what trainer.py did at each step boundary: the stop flag (any_rank: 1 float, MAX), the bad-data counts
          (2 int64, SUM), the asynchronous-commit poll while a commit is in flight (2 floats, MAX), each followed
          by a host sync (.item() / .tolist())
  after   engine/agreement.agree: the same five values in one int64 all-reduce, one host sync
The two patterns alternate boundary by boundary, so load from other processes falls on both alike. Reported:
the median microseconds per boundary of each and their ratio (after / before), the slowest rank's. Target
(written before the run): after / before <= 0.5 (one collective instead of two or three). On GPUs (NCCL) each
collective is also a kernel launch and a stream sync; not measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from bench.record import Run, add_json_arg
from tests.dist.harness import run_local_ranks

TARGET = 0.5


def _before(dist, torch, with_poll: bool) -> None:
    stop = torch.tensor([0.0])
    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    bool(stop.item())
    counts = torch.tensor([0, 0], dtype=torch.int64)
    dist.all_reduce(counts)
    counts.tolist()
    if with_poll:
        flags = torch.tensor([1.0, 0.0])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bool(flags[0].item())


def rank_main(boundaries: int) -> None:
    import torch
    import torch.distributed as dist

    from cratescale.engine.agreement import agree

    dist.init_process_group("gloo")
    times: dict[str, list[float]] = {"before_no_commit": [], "before_commit_in_flight": [], "after": []}
    for i in range(boundaries + 50):  # the first 50 warm up
        for name in times:
            dist.barrier()
            t0 = time.perf_counter()
            if name == "after":
                agree(False, 0, 0, 1, 0)
            else:
                _before(dist, torch, with_poll=name == "before_commit_in_flight")
            if i >= 50:
                times[name].append((time.perf_counter() - t0) * 1e6)
    print(json.dumps({name: statistics.median(values) for name, values in times.items()}), flush=True)
    dist.destroy_process_group()  # without it gloo's threads may abort the exit ("terminate called ...")


def main() -> None:
    if os.environ.get("RANK") is not None:
        rank_main(int(sys.argv[sys.argv.index("--boundaries") + 1]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boundaries", type=int, default=2000)
    add_json_arg(parser, "step_agreement")
    args = parser.parse_args()
    run = Run()
    ranks = run_local_ranks([__file__, "--boundaries", str(args.boundaries)], 2, timeout=1200)
    slowest = {name: max(r[name] for r in ranks) for name in ranks[0]}
    rows = {f"after / {name}": slowest["after"] / slowest[name] for name in slowest if name != "after"}
    for name, us in slowest.items():
        print(f"{name:26s} {us:8.1f} us per step boundary (median, slowest rank)")
    for name, ratio in rows.items():
        print(f"{name:35s} {ratio:.2f}  (target <= {TARGET}: {'met' if ratio <= TARGET else 'missed'})")
    run.save(args.json, {"boundaries": args.boundaries, "median_us_per_rank": ranks, "median_us_slowest": slowest,
                         "ratios": rows, "target": TARGET})


if __name__ == "__main__":
    main()
