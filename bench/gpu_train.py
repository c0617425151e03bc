"""Training-step rows of bench/gpu_bench.py: plain-torch steps (bf16 weights as DeepSpeed's bf16 mode keeps
them, or autocast), eager and torch.compile, optional activation checkpointing, a kernel profile, and the
product path itself (the job's DeepSpeed ZeRO-2 engine built from jobs/imagenet21k.yaml)."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

import torch

from cratescale.distributed.wrap import apply_activation_checkpointing, apply_mssa_kernel, select_attention_backend
from cratescale.models import create_model, param_counts, train_flops_per_image
from bench.gpu_harness import Bench, cleanup, is_oom, sync

REPO = Path(__file__).resolve().parents[1]


def section_attention(b: Bench) -> None:
    """SDPA forward + backward on MSSA's shape, q = k = v one tensor (B, heads, 197, 64), per kernel; with
    --sdpa best the fastest is selected process-wide for every later row (and passed to the engine's job)."""
    bsz, heads, n, p = (8, 4, 17, 16) if b.args.cpu_smoke else (b.args.attn_batch, 12, 197, 64)
    x = torch.randn(bsz, n, heads * p, device=b.device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(bsz, heads, n, p, device=b.device, dtype=torch.bfloat16)
    flops = 3 * 4 * bsz * heads * n * n * p  # model FLOPs: two matmuls forward, twice that backward
    times: dict[str, float] = {}
    for name in ("flash", "cudnn", "efficient"):
        select_attention_backend(name)
        w = x.view(bsz, n, heads, p).transpose(1, 2)

        def step() -> None:
            torch.nn.functional.scaled_dot_product_attention(w, w, w).backward(grad)
        try:
            step()
            times[name] = time_steps(b, step, 3, b.args.row_seconds / 3, 50)
        except RuntimeError as exc:
            b.add("attention", f"SDPA {name} fwd+bwd", note=f"refused: {str(exc).splitlines()[0][:150]}")
            continue
        base = times.get("flash")
        b.add("attention", f"SDPA {name} fwd+bwd", measured=flops / times[name] / 1e12, unit="TFLOP/s",
              baseline=f"{flops / base / 1e12:.3g} (flash)" if base and name != "flash" else "",
              ratio=base / times[name] if base else None,
              note=f"({bsz}, {heads}, {n}, {p}) bf16, {times[name] * 1e3:.2f} ms")
    chosen = b.args.sdpa
    if chosen == "best":
        chosen = min(times, key=times.get) if times else "auto"
    select_attention_backend(chosen)
    b.meta["sdpa"] = chosen
    b.add("attention", "selected for the training rows", note=chosen)


def make_step(b: Bench, model: torch.nn.Module, fwd: Callable, opt, batch: int, autocast: bool = False):
    """One optimizer step on a fixed random batch. bf16 weights (autocast=False) is what DeepSpeed's bf16
    mode runs; autocast keeps fp32 weights and casts per op."""
    dtype = torch.float32 if autocast else next(model.parameters()).dtype
    images = torch.randn(batch, 3, model.img_size, model.img_size, device=b.device, dtype=dtype)
    amp = torch.autocast(b.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def step() -> None:
        noise = torch.rand(batch, model.num_patches, device=b.device)
        with amp:
            loss, _, _ = fwd(images, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(b: Bench, step: Callable[[], None], min_steps: int, seconds: float, max_steps: int) -> float:
    """Seconds per step. min_steps give an estimate; if `seconds` allow more, that many more steps run back to
    back (no sync in between, so the host can run ahead as in training) and are the result."""
    sync(b.device)
    t0 = time.perf_counter()
    for _ in range(min_steps):
        step()
    sync(b.device)
    per_step = (time.perf_counter() - t0) / min_steps
    more = min(max_steps, int(seconds / per_step)) - min_steps
    if more < 2:
        return per_step
    t0 = time.perf_counter()
    for _ in range(more):
        step()
    sync(b.device)
    return (time.perf_counter() - t0) / more


def first_step_s(b: Bench, step: Callable[[], None]) -> float:
    """Seconds of one step, synced: a row's first step (loader start-up, compile, CUDA-graph capture)."""
    t0 = time.perf_counter()
    step()
    sync(b.device)
    return time.perf_counter() - t0


def find_batch(b: Bench, make: Callable[[int], Callable[[], None]], start: int, cap: int):
    """Double the batch until OOM (or cap); keep the last that fit. Returns (batch, [[batch, s/step], ...])."""
    best, probes, batch = 0, [], start
    while batch <= cap:
        step = None
        try:
            step = make(batch)
            step()
            probes.append([batch, time_steps(b, step, 2, 0.0, 2)])
            best = batch
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            print(f"   batch {batch}: out of memory, keeping {best}", flush=True)
            break
        finally:
            step = None
            cleanup()
        batch *= 2
    if best == 0:
        raise RuntimeError(f"not even batch {start} fits")
    return best, probes


def _model_and_optimizer(b: Bench, name: str, layout: str, autocast: bool, act_ckpt: bool, mssa_kernel: bool = False):
    torch.manual_seed(0)
    model = create_model(name, encoder_tokens=layout).to(b.device)
    if mssa_kernel:
        apply_mssa_kernel(model)
    if not autocast:
        model = model.to(torch.bfloat16)
    if act_ckpt:
        apply_activation_checkpointing(model)
    fused = {"fused": True} if b.device.type == "cuda" else {}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05,
                            betas=(0.9, 0.95), **fused)
    return model, opt


def train_row(b: Bench, name: str, layout: str, compiled: bool, variant: str = "", profile: bool = False) -> None:
    """variant: "" (bf16 weights), "autocast", "act-ckpt" (bf16 weights + activation checkpointing, at
    twice the eager batch) or "mssa_triton" (bf16 weights, MSSA takes the q = k = v Triton kernel)."""
    model, opt = _model_and_optimizer(b, name, layout, variant == "autocast", variant == "act-ckpt",
                                      variant == "mssa_triton")
    flops = train_flops_per_image(model)
    fwd = torch.compile(model) if compiled else model

    def make(batch: int):
        opt.zero_grad(set_to_none=True)
        return make_step(b, model, fwd, opt, batch, autocast=variant == "autocast")

    eager = b.train.get((name, layout, False, ""))
    if compiled or variant:
        if eager is None:
            raise RuntimeError(f"the eager row of {name} {layout} did not finish; no batch to start from")
        batch, probes = eager["batch"] * (2 if variant == "act-ckpt" else 1), []
        t0 = time.perf_counter()
        step = make(batch)
        first_s = time.perf_counter() - t0 + first_step_s(b, step)
    else:
        batch, probes = find_batch(b, make, b.args.batch_start, b.args.batch_cap)
        step, first_s = make(batch), 0.0
    if b.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    per_step = time_steps(b, step, 3, b.args.row_seconds, 50)
    rate = batch / per_step
    mem = torch.cuda.max_memory_allocated() / 2**30 if b.device.type == "cuda" else None
    res = {"model": name, "layout": layout, "compile": compiled, "variant": variant, "batch": batch,
           "step_s": per_step, "images_per_s": rate, "flops_per_image": flops, "probes": probes,
           "params": param_counts(model)["total"], "img_size": model.img_size, "peak_mem_gib": mem, "first_step_s": first_s}
    b.train[(name, layout, compiled, variant)] = res
    what = f"{name} {layout} {'compile' if compiled else 'eager'}" + (f" {variant}" if variant else "")
    note = (f"bs={batch}, {per_step * 1e3:.1f} ms/step, peak mem {mem:.1f} GiB" if mem is not None else
            f"bs={batch}, {per_step * 1e3:.1f} ms/step") + f", {flops / 1e9:.2f} GFLOP/img"
    if compiled:
        note += f", compile+first step {first_s:.0f}s"
    add_rate_row(b, what, rate, flops, baseline_for(b, name, layout, compiled, variant), note, res)
    if profile:
        profile_steps(b, step, what)


def add_rate_row(b: Bench, what: str, rate: float, flops: float, baseline, note: str, extra: dict) -> None:
    base_key, target, base_label = baseline
    base = b.train.get(base_key) if base_key else None
    b.add("train bf16", what, measured=rate, unit="img/s",
          baseline=f"{base['images_per_s']:,.0f} ({base_label})" if base else (base_label or ""),
          ratio=rate / base["images_per_s"] if base else None, target=target,
          mfu=rate * flops / b.peak_flops if b.peak_flops else None, note=note, extra=extra)


def baseline_for(b: Bench, name: str, layout: str, compiled: bool, variant: str):
    """What a row is compared with (a b.train key), the target of measured/baseline, and the label."""
    if variant == "mssa_triton":
        return (name, layout, compiled, ""), ">= 1.0", "same, SDPA"
    if variant:
        return (name, layout, compiled, ""), None, "same, bf16 weights, no checkpointing"
    if compiled:
        return (name, layout, False, ""), ">= 1.0", "same, eager"
    if name.startswith("crate") and layout == "visible":
        return (name, "all", False, ""), ">= 1.54", "same model, layout all"
    if name.startswith("crate"):
        vit = name.replace("crate_mae", "vit_mae")
        return (vit, layout, False, ""), ">= 2.0", f"{vit} {layout}"
    if layout == "visible":
        return (name, "all", False, ""), None, "same model, layout all"
    return None, None, ""


def _self_us(event, cuda: bool) -> float:
    if not cuda:
        return float(event.self_cpu_time_total)
    return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0))


def profile_steps(b: Bench, step: Callable[[], None], what: str, steps: int = 3) -> None:
    """Kernel time shares of a few steps: the full table to gpu_profile_<what>.txt, the top ones in a row."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(b.device)
    cuda = b.device.type == "cuda"
    # on a GPU the kernels themselves (device events); CPU ops would count their kernels a second time
    events = [e for e in prof.key_averages() if not cuda or e.device_type == DeviceType.CUDA]
    events = sorted((e for e in events if _self_us(e, cuda) > 0), key=lambda e: _self_us(e, cuda), reverse=True)
    total = sum(_self_us(e, cuda) for e in events) or 1.0
    lines = [f"{_self_us(e, cuda) / total:6.1%} {_self_us(e, cuda) / steps / 1e3:9.2f} ms/step  "
             f"x{e.count // steps:<4} {e.key[:150]}" for e in events[:60]]
    if b.out_dir:
        b.out_dir.mkdir(parents=True, exist_ok=True)
        (b.out_dir / f"gpu_profile_{what.replace(' ', '_')}.txt").write_text(
            f"{what}: self device time by kernel/op, {steps} steps, {total / steps / 1e3:.1f} ms/step summed\n"
            + "\n".join(lines) + "\n")
    top = "; ".join(f"{e.key[:48]} {_self_us(e, cuda) / total:.0%}" for e in events[:6])
    b.add("profile", what, measured=total / steps / 1e3, unit="ms/step (summed self time)", note=top)


def job_engine(b: Bench, name: str, batch: int, img_size: int, compiled: bool = False,
               overrides: tuple[str, ...] = ()):
    """The product's own path at world size 1: jobs/imagenet21k.yaml (demo.yaml in the smoke) -> build_model
    -> wrap_for_training -> deepspeed.initialize with the generated config (ZeRO-2, bf16). Returns
    (engine, plain model, job file, backend)."""
    import deepspeed

    from cratescale.config import load_job
    from cratescale.distributed import WorldInfo, deepspeed_config, init_distributed
    from cratescale.distributed.rendezvous import free_port
    from cratescale.engine import optim
    from cratescale.engine.model_build import build_model, wrap_for_training

    job_file, extra = ("demo.yaml", ["model.overrides={}", f"data.image_size={img_size}", "parallel.precision=bf16"]
                       ) if b.args.cpu_smoke else ("imagenet21k.yaml", [])
    extra.append(f"model.name={name}")
    job = load_job(REPO / "jobs" / job_file, extra + [
        "cluster.nodes=1", "cluster.tasks_per_node=1", f"schedule.global_batch={batch}",
        f"schedule.micro_batch={batch}", f"parallel.compile={str(compiled).lower()}",
        f"parallel.attention={b.meta.get('sdpa', 'auto')}", *overrides])
    backend = init_distributed(WorldInfo(0, 1, 0, "127.0.0.1", free_port(), "bench"))  # no-op once initialized
    model = wrap_for_training(build_model(job), job)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optim.make_optimizer(model, job),
                                      config=deepspeed_config(job, 1))
    return engine, model, job_file, backend


def engine_step(engine, model, batch: int) -> Callable[[], None]:
    images = torch.randn(batch, 3, model.img_size, model.img_size, device=engine.device, dtype=torch.bfloat16)

    def step() -> None:
        loss, _, _ = engine(images, torch.rand(batch, model.num_patches, device=engine.device))
        engine.backward(loss)
        engine.step()

    return step


def engine_row(b: Bench, compiled: bool, overrides: tuple[str, ...] = ()) -> None:
    """Training steps of the product's own engine (job_engine) against the plain torch step."""
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        b.add("train bf16", "DeepSpeed engine", note=f"skipped: deepspeed does not import ({exc})")
        return
    name = b.args.models[1]
    eager = b.train.get((name, "all", False, ""))
    if eager is None:
        raise RuntimeError(f"the eager row of {name} all did not finish; no batch to run the engine at")
    batch = eager["batch"]
    engine, model, job_file, backend = job_engine(b, name, batch, eager["img_size"], compiled, overrides)
    step = engine_step(engine, model, batch)
    first_s = first_step_s(b, step)
    per_step = time_steps(b, step, 3, b.args.row_seconds, 50)
    flops = train_flops_per_image(model)
    what = f"{name} all DeepSpeed ZeRO-2 engine" + (" compile" if compiled else "") + "".join(
        f" {o}" for o in overrides)
    res = {"batch": batch, "img_size": model.img_size, "step_s": per_step, "images_per_s": batch / per_step, "first_step_s": first_s}
    b.train[(name, "all", compiled, "engine" + ",".join(overrides))] = res
    add_rate_row(b, what, batch / per_step, flops,
                 ((name, "all", compiled, ""), ">= 0.9", "plain torch step, same model/batch/mode"),
                 f"bs={batch}, {per_step * 1e3:.1f} ms/step, {backend}, first step {first_s:.0f}s, "
                 f"job {job_file}", res)
    del engine  # the process group stays for the DeepSpeed checkpoint section, which ends it
