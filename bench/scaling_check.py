"""The one scale the scaling model (bench/scaling.py) can be checked at here: 2 DeepSpeed ZeRO-2 ranks over
gloo on this machine's CPUs, against the model's prediction from 1-rank measurements.

    .venv/bin/python -m bench.scaling --check-cpu [--steps 8] [--repeats 2]      # about 1-2 minutes
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from bench.scaling import Compute, Links, fit_line, predict
from tests.dist.harness import run_local_ranks

CHECK_MODEL = dict(embed_dim=384, decoder_embed_dim=384, num_heads=6, decoder_num_heads=6, depth=4, decoder_depth=4)


def worker(args: argparse.Namespace) -> None:
    """One rank: gloo all-reduce of a P-sized fp32 buffer, then ZeRO-2 fp32 steps split into fwd/bwd/step."""
    import torch

    from cratescale.compat.deepspeed import skip_shm_op_build

    torch.set_num_threads(1)
    skip_shm_op_build()  # ~30 s op build, unused on gloo
    import deepspeed
    import torch.distributed as dist

    from cratescale.distributed import exit_without_teardown
    from cratescale.models import create_model

    deepspeed.init_distributed(dist_backend="gloo")
    world = dist.get_world_size()
    torch.manual_seed(0)
    model = create_model("crate_mae_debug", **CHECK_MODEL)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ar, ag = [], []
    if world > 1:
        buf = torch.randn(params - params % world)
        chunks = list(buf.chunk(world))
        for i in range(args.steps + 2):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            t1 = time.perf_counter()
            dist.all_gather(chunks, chunks[dist.get_rank()].clone())
            if i >= 2:
                ar.append(t1 - t0)
                ag.append(time.perf_counter() - t1)
    seen = {"elems": 0, "seconds": 0.0}
    _count_all_reduce(seen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    config = {"train_batch_size": args.micro * world, "train_micro_batch_size_per_gpu": args.micro,
              "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    g = torch.Generator().manual_seed(dist.get_rank())
    images = torch.randn(args.micro, 3, model.img_size, model.img_size, generator=g)
    noise = torch.rand(args.micro, model.num_patches, generator=g)
    parts: dict[str, list[float]] = {"fwd": [], "bwd": [], "step": [], "total": []}
    for i in range(args.steps + 2):
        if i == 2:
            seen.update(elems=0, seconds=0.0)
        dist.barrier()  # ranks start each step together, as they do in training after the first collective
        t0 = time.perf_counter()
        loss, _, _ = engine(images, noise)
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        if i >= 2:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                parts[k].append(v)
    # min over steps: the machine is shared with other jobs, and the minimum is the uncontended time.
    out = {k: min(v) for k, v in parts.items()}
    out.update({f"{k}_median": statistics.median(v) for k, v in parts.items()})
    out.update(params=params, allreduce_s=min(ar) if ar else 0.0, allgather_s=min(ag) if ag else 0.0,
               world=world, micro=args.micro, step_allreduce_elems=seen["elems"] // args.steps,
               step_allreduce_s=seen["seconds"] / args.steps)
    print(json.dumps(out), flush=True)
    exit_without_teardown(0)  # the ranks' intermittent native abort at teardown, see cratescale.distributed


def _count_all_reduce(seen: dict) -> None:
    """Count the values DeepSpeed all-reduces (and the time spent inside, waiting for the peer included)."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    original = c10d.all_reduce

    def counted(tensor, *a, **k):
        t0 = time.perf_counter()
        try:
            return original(tensor, *a, **k)
        finally:
            seen["elems"] += tensor.numel()
            seen["seconds"] += time.perf_counter() - t0

    dist.all_reduce = c10d.all_reduce = counted


def run_ranks(world: int, micro: int, steps: int, timeout: float = 240) -> dict:
    outs = run_local_ranks([__file__, "--worker", "--micro", str(micro), "--steps", str(steps)], world, timeout)
    return {k: max(o[k] for o in outs) if isinstance(outs[0][k], float) else outs[0][k] for k in outs[0]}


def _min_merge(runs: list[dict]) -> dict:
    return {k: min(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k] for k in runs[0]}


def check_cpu(steps: int, global_batch: int = 16, repeats: int = 2) -> dict[str, float]:
    """Measure 1-rank steps (micro G and G/2), gloo collectives and the 2-rank step; compare with the model.
    The three runs are interleaved `repeats` times and each time taken as its minimum (shared machine)."""
    runs: dict[str, list[dict]] = {"full": [], "half": [], "two": []}
    for _ in range(repeats):
        runs["full"].append(run_ranks(1, global_batch, steps))
        runs["half"].append(run_ranks(1, global_batch // 2, steps))
        runs["two"].append(run_ranks(2, global_batch // 2, steps))
    one_full, one_half, two = (_min_merge(runs[k]) for k in ("full", "half", "two"))
    params, nbytes = int(two["params"]), 4  # fp32 on CPU
    busbw = 2 * params * nbytes * (2 - 1) / 2 / two["allreduce_s"]  # ring all-reduce bus bandwidth
    links = Links(gpus_per_node=2, nvlink_gbs=busbw / 1e9, efficiency=1.0, latency_us=0.0)
    fixed, slope = fit_line([(global_batch // 2, one_half["fwd"] + one_half["bwd"]),
                             (global_batch, one_full["fwd"] + one_full["bwd"])])
    slope = max(slope, 1e-9)  # noise can tilt a two-point fit; the fit then says "all fixed cost"
    # The optimizer step is paid per step, not per image; ZeRO-2 shards it over the 2 ranks.
    compute = Compute(1.0 / slope, fixed + one_full["step"] / 2, global_batch, "1-rank measurements")
    pred = predict(2, global_batch, params, compute, links, stage=2, nbytes=nbytes)
    # The model treats ranks as independent devices; here two ranks share two (busy) cores. Forward has no
    # communication under ZeRO-2, so its slow-down measures that sharing.
    contention = two["fwd"] / one_half["fwd"]
    pred_shared = pred["step_s"] + (contention - 1) * (compute.micro_step_s(global_batch // 2))
    print(f"\n2-rank CPU check: crate_mae_debug {CHECK_MODEL}, {params:,} params ({params * 4 / 1e6:.1f} MB fp32), "
          f"global batch {global_batch}, ZeRO-2 fp32, 1 thread per rank, gloo; machine: {os.cpu_count()}-core CPU, "
          f"no GPU, load average {os.getloadavg()[0]:.1f}; times are the min over {repeats} x {steps} steps")
    for name, r in (("1-rank micro 16", one_full), ("1-rank micro 8", one_half), ("2-rank micro 8", two)):
        print(f"  {name:<16} fwd {r['fwd'] * 1e3:6.1f}  bwd {r['bwd'] * 1e3:6.1f}  step {r['step'] * 1e3:6.1f}  "
              f"total {r['total'] * 1e3:6.1f} ms   (median total {r['total_median'] * 1e3:6.1f} ms)")
    print(f"  gloo all-reduce of P fp32: {two['allreduce_s'] * 1e3:.1f} ms = {busbw / 1e9:.2f} GB/s bus bandwidth; "
          f"all-gather: {two['allgather_s'] * 1e3:.1f} ms (model: {two['allreduce_s'] / 2 * 1e3:.1f} ms)")
    print(f"  DeepSpeed ZeRO-2 all-reduced {two['step_allreduce_elems']:,} values per step (model: P = {params:,}); "
          f"time inside those all-reduces {two['step_allreduce_s'] * 1e3:.1f} ms per step (waiting for the other "
          f"rank included) against {two['allreduce_s'] * 1e3:.1f} ms for the same all-reduce started together")
    print(f"  predicted comm (all-reduce + all-gather, no overlap) {pred['comm_s'] * 1e3:.1f} ms; "
          f"compute sharing factor (2-rank fwd / 1-rank fwd) {contention:.2f}")
    rows = [("2-rank step vs model", pred["step_s"], two["total"]),
            ("2-rank step vs model with core sharing", pred_shared, two["total"]),
            ("speed-up 1 -> 2 ranks (1-rank step / 2-rank step)", 1.0, one_full["total"] / two["total"]),
            ("  predicted speed-up", 1.0, one_full["total"] / pred["step_s"])]
    print(f"  {'what':<50} {'baseline':>10} {'measured':>10} {'ratio':>6}")
    for label, base, meas in rows:
        unit = 1e3 if base != 1.0 else 1.0
        print(f"  {label:<50} {base * unit:>10.2f} {meas * unit:>10.2f} {meas / base:>6.2f}")
    return {"predicted_s": pred["step_s"], "predicted_shared_s": pred_shared, "measured_s": two["total"],
            "step_allreduce_elems": two["step_allreduce_elems"], "step_allreduce_s": two["step_allreduce_s"],
            "ratio": two["total"] / pred["step_s"], "busbw_gbs": busbw / 1e9, "one_rank_s": one_full["total"],
            "allreduce_s": two["allreduce_s"], "contention": contention, "params": params,
            "runs": runs, "rows": [{"what": label, "baseline": base, "measured": meas, "ratio": meas / base}
                                   for label, base, meas in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description="one rank of the 2-rank check (started by check_cpu)")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    worker(p.parse_args())


if __name__ == "__main__":
    main()
