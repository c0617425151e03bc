"""Forward + backward + AdamW step time: CRATE-MAE-Base vs ViT-MAE-Base in the same token layout, and
CRATE-MAE-Base's visible-token layout vs its reference (all-token) layout; fp32 and bf16 autocast.

    .venv/bin/python -m bench.model_step [--batch 8] [--steps 3] [--warmup 1] [--threads 2]

Models are timed round-robin (one step each in turn) so load from other processes hits all of them alike.
Both the median wall time and the median process CPU time (user+sys, all threads) of a step are reported:
on a shared machine the CPU-time ratio is the one that measures the models rather than the neighbours.
OMP_WAIT_POLICY defaults to PASSIVE here: spinning OpenMP workers turned contention on the shared 2-core
machine into 10x slower steps. Targets: CRATE/ViT <= 0.45 (layout "all" for both, the repository's
layout), CRATE visible/all <= 0.65.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import

import torch

from bench.record import Run, add_json_arg
from cratescale.models import create_model, param_counts, train_flops_per_image

MODELS = {
    "crate_all": ("crate_mae_base", "all"),
    "vit_all": ("vit_mae_base", "all"),
    "crate_visible": ("crate_mae_base", "visible"),
}
# (label, measured, baseline, target)
COMPARISONS = [
    ("CRATE-MAE-B / ViT-MAE-B (layout all)", "crate_all", "vit_all", 0.45),
    ("CRATE-MAE-B visible / all", "crate_visible", "crate_all", 0.65),
]


def make_step(model: torch.nn.Module, images: torch.Tensor, noise: torch.Tensor, bf16: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    try:  # the fused kernel (CPU and CUDA) is what a trainer should use; older builds fall back to foreach
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)

    def step() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = model(images, noise)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    return step


def run(args: argparse.Namespace) -> None:
    record = Run()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {key: create_model(name, encoder_tokens=layout, img_size=args.img) for key, (name, layout) in MODELS.items()}
    images = torch.randn(args.batch, 3, args.img, args.img)
    noise = torch.rand(args.batch, models["crate_all"].num_patches)
    print(f"machine: {args.threads} CPU threads, torch {torch.__version__}, batch {args.batch}, {args.img}px, "
          f"{args.warmup} warmup + {args.steps} timed steps, round-robin, median")
    for key, model in models.items():
        c = param_counts(model)
        print(f"  {key:<14} {MODELS[key][0]:<15} params {c['total']:>12,}  train GFLOP/img {train_flops_per_image(model) / 1e9:7.1f}")
    wall: dict[tuple[str, str], float] = {}
    cpu: dict[tuple[str, str], float] = {}
    per_step: dict[str, dict[str, list]] = {}
    for dtype in args.dtypes.split(","):
        steps = {k: make_step(m, images, noise, dtype == "bf16") for k, m in models.items()}
        for _ in range(args.warmup):
            for fn in steps.values():
                fn()
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in steps}
        for _ in range(args.steps):
            for k, fn in steps.items():
                times[k].append(fn())
        per_step[dtype] = {k: [{"wall_s": w, "cpu_s": c} for w, c in ts] for k, ts in times.items()}
        for k, ts in times.items():
            wall[(dtype, k)] = statistics.median(t[0] for t in ts)
            cpu[(dtype, k)] = statistics.median(t[1] for t in ts)
            print(f"  {dtype} {k:<14} wall {wall[(dtype, k)]:7.3f} s  cpu {cpu[(dtype, k)]:7.3f} s  "
                  f"(wall/cpu per step: {', '.join(f'{w:.2f}/{c:.2f}' for w, c in ts)})")
        del steps
    print(f"\nload average after the run: {os.getloadavg()[0]:.2f} (2 cores)")
    print(f"{'comparison':<38} {'dtype':<5} {'clock':<5} {'baseline s':>10} {'measured s':>10} {'ratio':>6} "
          f"{'target':>7} {'flop ratio':>10}")
    rows: list[dict] = []
    for label, meas, base, target in COMPARISONS:
        flop_ratio = train_flops_per_image(models[meas]) / train_flops_per_image(models[base])
        for dtype in args.dtypes.split(","):
            for clock, table in (("wall", wall), ("cpu", cpu)):
                b, m = table[(dtype, base)], table[(dtype, meas)]
                ok = "ok" if m / b <= target else "MISS"
                rows.append({"what": label, "dtype": dtype, "clock": clock, "baseline_median_s": b,
                             "measured_median_s": m, "ratio": m / b, "flop_ratio": flop_ratio, "target": target})
                print(f"{label:<38} {dtype:<5} {clock:<5} {b:>10.3f} {m:>10.3f} {m / b:>6.3f} "
                      f"{'<=' + str(target):>7} {flop_ratio:>10.3f} {ok}")
    record.save(args.json, {"threads": args.threads, "batch": args.batch, "img": args.img, "steps": args.steps,
                            "warmup": args.warmup, "per_step": per_step, "rows": rows})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_json_arg(p, "model_step")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16")
    run(p.parse_args())


if __name__ == "__main__":
    main()
