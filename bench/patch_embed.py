"""Patch embedding forward + backward: the stride-16 Conv2d (how the weights are stored, and what the H100
profile showed at 4.6% of a CRATE-MAE-B step) against the same weights as one GEMM over patches (what
cratescale.models.layers.PatchEmbed runs). Interleaved, median of --steps.

    .venv/bin/python -m bench.patch_embed [--batch 32] [--steps 5] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.record import Run, add_json_arg
from cratescale.models.layers import PatchEmbed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_json_arg(p, "patch_embed")
    args = p.parse_args()
    run = Run()
    rows = []
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    embed = PatchEmbed(224, 16, 3, 768).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"machine: {device} ({args.threads} threads on CPU), torch {torch.__version__}, batch {args.batch}, 224 px, "
          f"patch 16, dim 768; median of {args.steps} interleaved forward+backward passes")
    print(f"{'dtype':<6} {'conv ms':>9} {'GEMM ms':>9} {'ratio conv/GEMM':>16}  max |diff|")
    for dtype in (torch.float32, torch.bfloat16):
        module = embed.to(dtype)
        images = torch.randn(args.batch, 3, 224, 224, device=device, dtype=dtype, requires_grad=True)
        ways = {"conv": lambda: module.proj(images).flatten(2).transpose(1, 2), "gemm": lambda: module(images)}
        diff = (ways["conv"]().float() - ways["gemm"]().float()).abs().max().item()
        times = {k: [] for k in ways}
        for _ in range(args.steps + 1):  # the first round warms up
            for name, forward in ways.items():
                sync()
                t0 = time.perf_counter()
                forward().float().sum().backward()
                sync()
                times[name].append(time.perf_counter() - t0)
        conv, gemm = (statistics.median(times[k][1:]) for k in ("conv", "gemm"))
        print(f"{str(dtype).split('.')[-1]:<6} {conv * 1e3:>9.2f} {gemm * 1e3:>9.2f} {conv / gemm:>16.2f}  {diff:.2e}")
        rows.append({"dtype": str(dtype).split(".")[-1], "conv_s": times["conv"], "gemm_s": times["gemm"],
                     "conv_median_s": conv, "gemm_median_s": gemm, "ratio_conv_over_gemm": conv / gemm,
                     "max_abs_diff": diff, "target": ">= 1.0"})
    run.save(args.json, {"device": args.device, "threads": args.threads, "batch": args.batch,
                         "note": "per-step lists include the warm-up round first; medians exclude it", "rows": rows})


if __name__ == "__main__":
    main()
