"""Forward + backward + AdamW step time: CRATE-MAE-Base vs ViT-MAE-Base in the same token layout, and
CRATE-MAE-Base's visible-token layout vs its reference (all-token) layout; fp32 and bf16 autocast.

    .venv/bin/python bench/model_step.py [--batch 8] [--steps 3] [--warmup 1] [--threads 2]

Models are timed round-robin (one step each in turn) so load from other processes hits all of them alike;
the median step time is reported. Targets: CRATE/ViT <= 0.45 (layout "all" for both, the repository's
layout), CRATE visible/all <= 0.65.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cratescale.models import create_model, param_counts, train_flops_per_image  # noqa: E402

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

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = model(images, noise)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def run(args: argparse.Namespace) -> None:
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
    results: dict[tuple[str, str], float] = {}
    best: dict[tuple[str, str], float] = {}
    for dtype in args.dtypes.split(","):
        steps = {k: make_step(m, images, noise, dtype == "bf16") for k, m in models.items()}
        for _ in range(args.warmup):
            for fn in steps.values():
                fn()
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.steps):
            for k, fn in steps.items():
                times[k].append(fn())
        for k, ts in times.items():
            results[(dtype, k)] = statistics.median(ts)
            best[(dtype, k)] = min(ts)
            print(f"  {dtype} {k:<14} step {results[(dtype, k)]:.3f} s  (all: {', '.join(f'{t:.3f}' for t in ts)})")
        del steps
    print()
    print("ratio = median measured / median baseline; 'min ratio' uses the fastest step of each (less exposed to other load)")
    print(f"{'comparison':<40} {'dtype':<5} {'baseline s':>10} {'measured s':>10} {'ratio':>6} {'target':>7} "
          f"{'min ratio':>9} {'flop ratio':>10}")
    for label, meas, base, target in COMPARISONS:
        flop_ratio = train_flops_per_image(models[meas]) / train_flops_per_image(models[base])
        for dtype in args.dtypes.split(","):
            b, m = results[(dtype, base)], results[(dtype, meas)]
            ok = "ok" if m / b <= target else "MISS"
            min_ratio = best[(dtype, meas)] / best[(dtype, base)]
            print(f"{label:<40} {dtype:<5} {b:>10.3f} {m:>10.3f} {m / b:>6.3f} {'<=' + str(target):>7} "
                  f"{min_ratio:>9.3f} {flop_ratio:>10.3f} {ok}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16")
    run(p.parse_args())


if __name__ == "__main__":
    main()
