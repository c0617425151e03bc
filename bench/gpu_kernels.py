"""Issue 20's rows of bench/gpu_bench.py: the q = k = v MSSA Triton kernel against SDPA's kernels on MSSA's
shapes, CRATE-MAE-B training with the kernel (MFU and the ratio to ViT-MAE-B at the same batch), the job's
DeepSpeed engine at the small per-GPU batches of jobs/imagenet21k.yaml with and without CUDA graphs
(torch.compile mode reduce-overhead), the patch-embedding GEMM against the conv, and MSSA's strided head view
against a head-major copy. In --cpu-smoke the kernel runs in Triton's interpreter on debug shapes."""
from __future__ import annotations

import statistics
from typing import Callable

import torch

from cratescale.distributed.wrap import select_attention_backend
from cratescale.models.layers import MSSA, PatchEmbed
from bench.gpu_harness import Bench, cleanup, sync
from bench.gpu_train import engine_step, first_step_s, job_engine, time_steps, train_row

SMALL_BATCHES = (64, 128, 256)  # per GPU; jobs/imagenet21k.yaml runs 64 (4096 over 64 GPUs)


def _median_s(b: Bench, step: Callable[[], None], repeats: int = 5) -> float:
    if b.args.cpu_smoke:  # code paths, not numbers (and the kernel runs in Triton's interpreter)
        repeats = 1
    step()
    sync(b.device)
    return statistics.median(time_steps(b, step, 1 if b.args.cpu_smoke else 2, b.args.row_seconds / repeats, 20)
                             for _ in range(repeats))


def section_mssa_kernel(b: Bench) -> None:
    """Forward + backward of softmax(x x^T / sqrt(p)) x: the Triton kernel vs every SDPA kernel, 197 tokens
    (the reference layout) and 50 (the visible layout's encoder), bf16."""
    from cratescale.kernels.mssa_triton import mssa_self_attention

    shapes = [(2, 2, 17, 16), (2, 2, 5, 16)] if b.args.cpu_smoke else [(b.args.attn_batch, 12, 197, 64),
                                                                     (4 * b.args.attn_batch, 12, 50, 64)]
    for bsz, heads, n, p in shapes:
        x = torch.randn(bsz, n, heads * p, device=b.device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(bsz, heads, n, p, device=b.device, dtype=torch.bfloat16)
        w = x.view(bsz, n, heads, p).transpose(1, 2)
        flops = 3 * 4 * bsz * heads * n * n * p
        ways: dict[str, Callable[[], torch.Tensor]] = {"mssa_triton": lambda: mssa_self_attention(w)}
        for name in () if b.args.cpu_smoke else ("flash", "cudnn", "efficient"):
            ways[name] = (lambda k: lambda: (select_attention_backend(k),
                                             torch.nn.functional.scaled_dot_product_attention(w, w, w))[1])(name)
        times, outs = {}, {}
        for name, fwd in ways.items():
            try:
                outs[name] = fwd().detach().float()
                times[name] = _median_s(b, lambda: fwd().backward(grad))
            except RuntimeError as exc:
                b.add("mssa kernel", f"{name} fwd+bwd ({bsz},{heads},{n},{p})", note=f"refused: {str(exc)[:120]}")
        sdpa = {k: t for k, t in times.items() if k != "mssa_triton"}
        best = min(sdpa, key=sdpa.get) if sdpa else None
        diff = (outs["mssa_triton"] - outs[best]).abs().max().item() if best else None
        b.add("mssa kernel", f"mssa_triton fwd+bwd ({bsz}, {heads}, {n}, {p}) bf16",
              measured=flops / times["mssa_triton"] / 1e12, unit="TFLOP/s",
              baseline=f"{flops / sdpa[best] / 1e12:.3g} ({best})" if best else "",
              ratio=sdpa[best] / times["mssa_triton"] if best else None, target=">= 1.0 (vs the fastest SDPA)",
              note=f"{times['mssa_triton'] * 1e3:.2f} ms; max |out - {best}| {diff:.3g}" if best else
              f"{times['mssa_triton'] * 1e3:.2f} ms (interpreter)")
        if n == shapes[0][2]:
            b.meta["mssa_kernel_wins"] = bool(best) and times["mssa_triton"] < sdpa[best]
    select_attention_backend(b.meta.get("sdpa", "auto"))


def kernel_train_row(b: Bench, compiled: bool) -> None:
    """CRATE-MAE-B with the kernel, at the batch of its eager SDPA row; also the ratio to ViT-MAE-B there."""
    vit, crate = b.args.models
    train_row(b, crate, "all", compiled, variant="mssa_triton")
    mine = b.train[(crate, "all", compiled, "mssa_triton")]
    base = b.train.get((vit, "all", compiled, ""))
    if base:
        b.add("train bf16", f"{crate} all {'compile' if compiled else 'eager'} mssa_triton vs {vit}",
              measured=mine["images_per_s"], unit="img/s", baseline=f"{base['images_per_s']:,.0f} ({vit}, bs "
              f"{base['batch']})", ratio=mine["images_per_s"] / base["images_per_s"],
              target=">= 2.0" + (", MFU >= 40%" if compiled else ""),
              note=f"CRATE bs {mine['batch']}; MFU {mine['images_per_s'] * mine['flops_per_image'] / b.peak_flops:.1%}"
              if b.peak_flops else f"CRATE bs {mine['batch']}")


def section_small_batch(b: Bench) -> None:
    """The job's engine (compiled) at 64/128/256 images per GPU, default compile vs reduce-overhead (CUDA
    graphs), against the compiled engine's large-batch rate."""
    crate, compiled = b.args.models[1], not b.args.cpu_smoke  # the smoke skips compile: its eager twin
    large = b.train.get((crate, "all", compiled, "engine"))
    if large is None:
        raise RuntimeError("the engine row did not finish; no large-batch rate to compare with")
    attention = "parallel.attention=mssa_triton" if b.meta.get("mssa_kernel_wins") else ""
    batches = (2,) if b.args.cpu_smoke else SMALL_BATCHES
    for batch in batches:
        for mode in ("default", "reduce-overhead"):
            if b.remaining() < (5 if b.args.cpu_smoke else 40):
                b.add("small batch", f"bs {batch} {mode}", note=f"skipped: {b.remaining():.0f}s left")
                return
            overrides = tuple(o for o in (f"parallel.compile_mode={mode}", attention) if o)
            engine, model, _, _ = job_engine(b, crate, batch, large["img_size"], compiled, overrides)
            step = engine_step(engine, model, batch)
            first_s = first_step_s(b, step)
            rate = batch / time_steps(b, step, 3, b.args.row_seconds, 100)
            b.add("small batch", f"{crate} engine {'compile' if compiled else 'eager (smoke)'} {mode}, bs {batch} per GPU",
                  measured=rate, unit="img/s",
                  baseline=f"{large['images_per_s']:,.0f} (compiled engine, bs {large['batch']})",
                  ratio=rate / large["images_per_s"], target=">= 0.8" if batch == 64 else "",
                  note=f"first step (compile) {first_s:.0f}s{'; ' + attention if attention else ''}")
            del engine, model, step
            cleanup()


def section_patch_embed_and_view(b: Bench) -> None:
    """The two rows BENCHMARKS listed as not measured on a GPU."""
    bsz, size, dim, heads = (4, 32, 64, 4) if b.args.cpu_smoke else (256, 224, 768, 12)
    embed = PatchEmbed(size, 8 if b.args.cpu_smoke else 16, 3, dim).to(b.device, torch.bfloat16)
    images = torch.randn(bsz, 3, size, size, device=b.device, dtype=torch.bfloat16, requires_grad=True)
    conv = _median_s(b, lambda: embed.proj(images).flatten(2).transpose(1, 2).sum().backward())
    gemm = _median_s(b, lambda: embed(images).sum().backward())
    b.add("patch embed", f"GEMM over patches vs strided conv, bs {bsz}, {size} px, bf16 fwd+bwd",
          measured=gemm * 1e3, unit="ms", baseline=f"{conv * 1e3:.2f} ms (conv)", ratio=conv / gemm, target=">= 1.0")
    mssa = MSSA(dim, heads).to(b.device, torch.bfloat16)
    n_tokens = 17 if b.args.cpu_smoke else 197
    tokens = torch.randn(bsz, n_tokens, dim, device=b.device, dtype=torch.bfloat16, requires_grad=True)
    strided = _median_s(b, lambda: mssa(tokens).sum().backward())
    original = mssa.forward

    def head_major(x: torch.Tensor) -> torch.Tensor:  # the pre-issue-7 layout: a contiguous head-major copy
        n = x.shape[1]
        w = mssa.u(x).view(bsz, n, heads, dim // heads).transpose(1, 2).contiguous()
        o = torch.nn.functional.scaled_dot_product_attention(w, w, w)
        return mssa.proj(o.transpose(1, 2).reshape(bsz, n, dim))
    mssa.forward = head_major
    copy = _median_s(b, lambda: mssa(tokens).sum().backward())
    mssa.forward = original
    b.add("patch embed", f"MSSA strided head view vs head-major copy, bs {bsz}, {n_tokens} tokens, dim {dim}, bf16 fwd+bwd",
          measured=strided * 1e3, unit="ms", baseline=f"{copy * 1e3:.2f} ms (copy)", ratio=copy / strided,
          target=">= 1.0")
