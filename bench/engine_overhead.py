"""Per-step overhead of the engine's DeepSpeed ZeRO-2 against a plain torch DDP loop: 2 ranks, gloo, CPU,
the same model, optimizer and synthetic tensors, timed in the same run (round-robin, step by step).

    .venv/bin/python -m bench.engine_overhead [--steps 10] [--rounds 3] [--models demo,d192]

Three loops per model, one process group:
  ddp        DistributedDataParallel: zero_grad, forward, backward (bucketed all-reduce), AdamW step
  ds         the engine's DeepSpeed: deepspeed.initialize with cratescale's generated config (jobs/demo.yaml:
             ZeRO-2, fp32) and optimizer; engine(x) / engine.backward / engine.step
  ds+loop    ds plus what trainer.py adds per step: the stop-flag all-reduce, float(loss), the lr write
Target: ds / ddp <= 1.15. The loops are timed step by step in turn (one step of each, repeated), so load from
other processes on a shared machine falls on all three alike; the ratio is of medians (mins shown too), the
slowest rank's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench.record import Run, add_json_arg
from tests.dist.harness import run_local_ranks

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.15
# model variants: overrides on top of jobs/demo.yaml (crate_mae_debug, 32 px, patch 8, micro-batch 32)
MODELS = {
    "demo": [],
    "d192": ["model.overrides.embed_dim=192", "model.overrides.decoder_embed_dim=192", "model.overrides.depth=4",
             "model.overrides.decoder_depth=4", "model.overrides.num_heads=4", "model.overrides.decoder_num_heads=4"],
}


def measure_model(variant: str, steps: int, rounds: int, zero_extra: str = "{}") -> dict[str, dict[str, float]]:
    import deepspeed
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cratescale.config import load_job
    from cratescale.distributed import deepspeed_config
    from cratescale.engine import optim
    from cratescale.engine.state import any_rank
    from cratescale.engine.model_build import build_model

    job = load_job(REPO / "jobs" / "demo.yaml", MODELS[variant])
    world, rank = dist.get_world_size(), dist.get_rank()
    ddp_model = build_model(job)  # seeds from job.seed: both copies start identical
    ds_model = build_model(job)
    ddp = DistributedDataParallel(ddp_model)
    ddp_opt = optim.make_optimizer(ddp_model, job)
    config = deepspeed_config(job, world)
    config["zero_optimization"].update(json.loads(zero_extra))  # --zero: try a setting the config lacks
    engine, *_ = deepspeed.initialize(model=ds_model, optimizer=optim.make_optimizer(ds_model, job), config=config)
    g = torch.Generator().manual_seed(1234 + rank)
    micro, size = job.schedule.micro_batch, job.data.image_size
    images = torch.randn(micro, 3, size, size, generator=g)
    noise = torch.rand(micro, ds_model.num_patches, generator=g)

    def ddp_step() -> list[float]:
        t = [time.perf_counter()]
        ddp_opt.zero_grad(set_to_none=True)
        loss, _, _ = ddp(images, noise)
        t.append(time.perf_counter())
        loss.backward()  # bucketed all-reduce overlapped with the backward
        t.append(time.perf_counter())
        ddp_opt.step()
        t.append(time.perf_counter())
        return t

    def ds_step(extras: bool = False) -> list[float]:
        t = [time.perf_counter()]
        if extras:  # trainer.py's per-step extras around the same engine calls
            any_rank(False)
            for group in engine.optimizer.param_groups:
                group["lr"] = 1e-4
        loss, _, _ = engine(images, noise)
        t.append(time.perf_counter())
        engine.backward(loss)  # ZeRO-2: the gradient bucket's all-reduce at the end of the backward
        t.append(time.perf_counter())
        engine.step()  # optimizer on this rank's partition, all-gather of the parameters, grad-norm all-reduce
        if extras:
            float(loss.detach().float())
        t.append(time.perf_counter())
        return t

    loops = {"ddp": ddp_step, "ds": ds_step, "ds+loop": lambda: ds_step(True)}
    for fn in loops.values():
        for _ in range(3):  # warm-up: allocations, DDP bucket rebuild, DeepSpeed's first-step set-up
            fn()
    times: dict[str, list[list[float]]] = {k: [] for k in loops}
    # Step-by-step round-robin (ranks aligned by a barrier before each step, outside the timing): the load
    # of other processes on this shared machine then falls on the three loops alike.
    for _ in range(rounds * steps):
        for name, fn in loops.items():
            dist.barrier()
            t = fn()
            times[name].append([t[1] - t[0], t[2] - t[1], t[3] - t[2], t[3] - t[0]])
    params = sum(p.numel() for p in ds_model.parameters() if p.requires_grad)
    out = {}
    for k, rows in times.items():
        cols = list(zip(*rows))
        out[k] = {"median": statistics.median(cols[3]), "min": min(cols[3]), "params": params, "micro": micro,
                  "steps_s": list(cols[3]),
                  **{f"{ph}_median": statistics.median(c) for ph, c in zip(("fwd", "bwd", "step"), cols[:3])}}
    return out


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    from cratescale.distributed import exit_without_teardown, init_distributed, world_from_env

    init_distributed(world_from_env(), "gloo")  # the engine's own init (skips DeepSpeed's shm op build)
    out = {v: measure_model(v, args.steps, args.rounds, args.zero) for v in args.models.split(",")}
    print(json.dumps(out), flush=True)
    exit_without_teardown(0)  # the ranks' intermittent native abort at teardown, see cratescale.distributed


def launch(args: argparse.Namespace, world: int = 2, timeout: float = 300) -> dict:
    results = run_local_ranks([__file__, "--worker", "--steps", str(args.steps), "--rounds", str(args.rounds),
                               "--models", args.models, "--zero", args.zero], world, timeout)
    # the slowest rank sets the pace; per-step times are kept per rank
    def merge(key: str, values: list):
        return values if key == "steps_s" else max(values)

    return {v: {loop: {k: merge(k, [r[v][loop][k] for r in results]) for k in results[0][v][loop]}
                for loop in results[0][v]} for v in results[0]}


def report(res: dict) -> list[tuple[str, float, float, float]]:
    print(f"machine: {os.cpu_count()}-core CPU, no GPU, load average {os.getloadavg()[0]:.1f}; 2 ranks x 1 thread, "
          f"gloo; ms per step: median over interleaved steps [min in brackets]")
    print(f"{'model':<8} {'params':>9} {'micro':>5}  {'what':<22} {'baseline ddp':>14} {'measured':>16} {'ratio':>6} "
          f"{'target':>7}")
    rows = []
    for variant, loops in res.items():
        base = loops["ddp"]
        for name in ("ds", "ds+loop"):
            m = loops[name]
            ratio = m["median"] / base["median"]
            ok = "ok" if ratio <= TARGET else "MISS"
            print(f"{variant:<8} {int(base['params']):>9,} {int(base['micro']):>5}  {name + ' / ddp':<22} "
                  f"{base['median'] * 1e3:>6.1f} [{base['min'] * 1e3:>5.1f}] {m['median'] * 1e3:>8.1f} "
                  f"[{m['min'] * 1e3:>5.1f}] {ratio:>6.2f} {'<=' + str(TARGET):>7} {ok}  "
                  f"(min ratio {m['min'] / base['min']:.2f})")
            rows.append((f"{variant} {name}", base["median"], m["median"], ratio))
        split = "; ".join(f"{n} " + "/".join(f"{loops[n].get(ph + '_median', 0) * 1e3:.1f}" for ph in ("fwd", "bwd", "step"))
                          for n in loops)
        print(f"{'':<8} median fwd/bwd/step ms: {split}")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per loop = steps x rounds")
    p.add_argument("--rounds", type=int, default=3, help="(kept for the command line) multiplies --steps")
    p.add_argument("--models", default="demo,d192", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--zero", default="{}", help='JSON merged into zero_optimization, e.g. \'{"overlap_comm": true}\'')
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    add_json_arg(p, "engine_overhead")
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        raise SystemExit(f"engine_overhead: --models has unknown {sorted(unknown)}; known: {', '.join(MODELS)}")
    if args.worker:
        worker(args)
    else:
        run = Run()
        res = launch(args)
        rows = report(res)
        run.save(args.json, {"steps": args.steps, "rounds": args.rounds, "zero": args.zero, "loops": res,
                             "rows": [{"what": w, "baseline_median_s": b, "measured_median_s": m, "ratio": r,
                                       "target": TARGET} for w, b, m, r in rows]})


if __name__ == "__main__":
    main()
