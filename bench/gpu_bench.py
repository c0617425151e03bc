"""Single-GPU benchmark of cratescale (run by bench/gpu.sh): bf16 training steps of CRATE-MAE-Base and
ViT-MAE-Base (largest batch that fits, flash attention through SDPA, eager and torch.compile, token layouts
"all" and "visible") with images/s and MFU against a measured bf16 matmul peak; checkpoint write GB/s
(torch.save + fsync, and DeepSpeed ZeRO-2 through CheckpointStore); batched nvJPEG decode images/s.

    python3 bench/gpu_bench.py [--budget 420] [--data .gpudata] [--out-dir DIR]
    python3 bench/gpu_bench.py --cpu-smoke [--data DIR_OR_TAR]      # same code paths, debug models, CPU
    python3 bench/gpu_bench.py --prepare-data SRC.tar DEST.tar [--max-images 300]

Every section runs under a time box (SIGALRM) inside one global deadline; a failing section prints its error
and the rest runs. Rows are printed as they finish; the markdown table and JSON are rewritten after every
row to --out-dir (default $OUT), so a killed run still leaves partial results.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling gpu_harness / gpu_decode modules
sys.path.insert(0, str(REPO))
from cratescale.models import create_model, param_counts, train_flops_per_image  # noqa: E402

from gpu_harness import (COLUMNS, Bench, SectionTimeout, cleanup, is_oom, markdown, sync,  # noqa: E402,F401
                         time_box)
from gpu_decode import load_jpegs, prepare_data, section_decode  # noqa: E402,F401


def section_env(b: Bench) -> None:
    meta = {"torch": torch.__version__, "python": sys.version.split()[0], "host": socket.gethostname()}
    if b.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta.update(device=f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs",
                    flash_sdp=torch.backends.cuda.flash_sdp_enabled(), cuda=torch.version.cuda)
        try:  # flash is forced in the training rows; if this card/build refuses it, let SDPA choose instead
            q = torch.randn(2, 12, 197, 64, device="cuda", dtype=torch.bfloat16)
            with _sdpa_context(b):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            meta["sdpa"] = "flash forced" if not b.args.no_force_flash else "SDPA's choice (--no-force-flash)"
        except RuntimeError as exc:
            b.args.no_force_flash = True
            meta["sdpa"] = f"SDPA's choice: flash refused ({str(exc).splitlines()[0][:120]})"
    else:
        meta.update(device=f"CPU smoke ({os.cpu_count()} cores, {torch.get_num_threads()} threads), no GPU")
    for mod in ("torchvision", "deepspeed", "triton"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            meta[mod] = f"absent ({type(exc).__name__})"
    b.meta.update(meta)
    b.add("env", "machine", note="; ".join(f"{k}={v}" for k, v in meta.items()))


def section_matmul(b: Bench) -> None:
    n = b.args.matmul_n
    dtype = torch.bfloat16
    pairs = [(torch.randn(n, n, device=b.device, dtype=dtype), torch.randn(n, n, device=b.device, dtype=dtype))
             for _ in range(2)]  # two input sets, alternated, so no product is served from cache
    for x, y in pairs:
        x @ y
    sync(b.device)
    times = []
    for i in range(b.args.matmul_iters):
        x, y = pairs[i % 2]
        t0 = time.perf_counter()
        x @ y
        sync(b.device)
        times.append(time.perf_counter() - t0)
    tflops = 2 * n**3 / statistics.median(times) / 1e12
    b.peak_flops = tflops * 1e12
    b.meta["peak_tflops"] = round(tflops, 1)
    b.add("peak", f"bf16 matmul {n}^3", measured=tflops, unit="TFLOP/s",
          note=f"median of {len(times)}; datasheet H100 SXM dense bf16 989, H200 989")


def _sdpa_context(b: Bench):
    if b.device.type != "cuda" or b.args.no_force_flash:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def _make_step(b: Bench, model: torch.nn.Module, fwd: Callable, opt: torch.optim.Optimizer, batch: int):
    images = torch.randn(batch, 3, model.img_size, model.img_size, device=b.device)
    length = model.num_patches

    def step() -> None:
        noise = torch.rand(batch, length, device=b.device)
        with _sdpa_context(b), torch.autocast(b.device.type, dtype=torch.bfloat16):
            loss, _, _ = fwd(images, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _time_steps(b: Bench, step: Callable[[], None], min_steps: int, seconds: float, max_steps: int) -> float:
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


def _find_batch(b: Bench, model, fwd, opt, start: int, cap: int) -> tuple[int, list[list[float]]]:
    """Double the batch until OOM (or cap); keep the last that fit. Returns (batch, [[batch, s/step], ...])."""
    best, probes, batch = 0, [], start
    while batch <= cap:
        try:
            step = _make_step(b, model, fwd, opt, batch)
            step()
            probes.append([batch, _time_steps(b, step, 2, 0.0, 2)])
            best = batch
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            print(f"   batch {batch}: out of memory, keeping {best}", flush=True)
            break
        finally:
            step = None
            opt.zero_grad(set_to_none=True)
            cleanup()
        batch *= 2
    if best == 0:
        raise RuntimeError(f"not even batch {start} fits")
    return best, probes


def train_row(b: Bench, name: str, layout: str, compiled: bool) -> None:
    torch.manual_seed(0)
    overrides = {"encoder_tokens": layout}
    model = create_model(name, **overrides).to(b.device)
    flops = train_flops_per_image(model)
    fused = {"fused": True} if b.device.type == "cuda" else {}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05,
                            betas=(0.9, 0.95), **fused)
    fwd = torch.compile(model) if compiled else model
    eager = b.train.get((name, layout, False))
    if compiled:
        if eager is None:
            raise RuntimeError("the eager row of this model/layout did not finish; no batch to reuse")
        batch, probes = eager["batch"], []
        t0 = time.perf_counter()
        step = _make_step(b, model, fwd, opt, batch)
        step()
        sync(b.device)
        compile_s = time.perf_counter() - t0
    else:
        batch, probes = _find_batch(b, model, fwd, opt, b.args.batch_start, b.args.batch_cap)
        step, compile_s = _make_step(b, model, fwd, opt, batch), 0.0
    if b.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        per_step = _time_steps(b, step, 3, b.args.row_seconds, 50)
    except Exception as exc:  # noqa: BLE001 - a batch that fit the probe can still fragment memory: halve once
        if not is_oom(exc) or compiled:
            raise
        step = None
        opt.zero_grad(set_to_none=True)
        cleanup()
        batch //= 2
        step = _make_step(b, model, fwd, opt, batch)
        per_step = _time_steps(b, step, 3, b.args.row_seconds, 50)
    rate = batch / per_step
    mem = torch.cuda.max_memory_allocated() / 2**30 if b.device.type == "cuda" else None
    res = {"model": name, "layout": layout, "compile": compiled, "batch": batch, "step_s": per_step,
           "images_per_s": rate, "flops_per_image": flops, "params": param_counts(model)["total"],
           "probes": probes, "peak_mem_gib": mem, "compile_s": compile_s}
    b.train[(name, layout, compiled)] = res
    base_key, target, base_label = _baseline_for(b, name, layout, compiled)
    base = b.train.get(base_key) if base_key else None
    mfu = rate * flops / b.peak_flops if b.peak_flops else None
    mode = "compile" if compiled else "eager"
    mem_s = f"{mem:.1f} GiB" if mem is not None else "n/a"
    note = f"bs={batch}, {per_step * 1e3:.1f} ms/step, peak mem {mem_s}, {flops / 1e9:.2f} GFLOP/img"
    if compiled:
        note += f", compile+first step {compile_s:.0f}s"
    b.add("train bf16", f"{name} {layout} {mode}", measured=rate, unit="img/s",
          baseline=f"{base['images_per_s']:,.0f} ({base_label})" if base else (base_label or ""),
          ratio=rate / base["images_per_s"] if base else None, target=target, mfu=mfu, note=note, extra=res)


def _baseline_for(b: Bench, name: str, layout: str, compiled: bool):
    """What each training row is compared with, and the target of the ratio (img/s measured / baseline)."""
    if compiled:
        return (name, layout, False), ">= 1.0", "same, eager"
    if name.startswith("crate") and layout == "visible":
        return (name, "all", False), ">= 1.54", "same model, layout all"
    if name.startswith("crate"):
        vit = name.replace("crate_mae", "vit_mae")
        return (vit, layout, False), ">= 2.2", f"{vit} {layout}"
    if layout == "visible":
        return (name, "all", False), None, "same model, layout all"
    return None, None, ""


def _ckpt_model(b: Bench):
    torch.manual_seed(0)
    model = create_model(b.args.ckpt_model).to(b.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _make_step(b, model, model, opt, 2)()  # fills AdamW's exp_avg / exp_avg_sq
    return model, opt


def section_ckpt_torch(b: Bench) -> None:
    model, opt = _ckpt_model(b)
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    root = Path(tempfile.mkdtemp(prefix="ckpt_torch_", dir=b.args.ckpt_dir))
    times, size = [], 0
    for i in range(b.args.ckpt_repeats):
        path = root / f"state_{i}.pt"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        times.append(time.perf_counter() - t0)
        size = path.stat().st_size
        path.unlink()
    shutil.rmtree(root, ignore_errors=True)
    gbs = size / min(times) / 1e9
    b.add("checkpoint", f"torch.save {b.args.ckpt_model} model+AdamW, fsync", measured=gbs, unit="GB/s",
          note=f"{size / 1e6:,.1f} MB from {b.device.type} memory to {root.parent}; best of {len(times)} "
               f"({', '.join(f'{t:.2f}s' for t in times)})")


def _init_single_rank(b: Bench) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if b.device.type == "cuda" else "gloo"
    if backend == "gloo":
        import importlib  # the shared-memory op build (~30 s) is useless for gloo; see ENVIRONMENT.md

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    return backend


def section_ckpt_deepspeed(b: Bench) -> None:
    try:
        import deepspeed
    except Exception as exc:  # noqa: BLE001
        b.add("checkpoint", "DeepSpeed ZeRO-2 via CheckpointStore", note=f"skipped: deepspeed does not import ({exc})")
        return
    from cratescale.checkpoint import CheckpointStore

    backend = _init_single_rank(b)
    torch.manual_seed(0)
    model = create_model(b.args.ckpt_model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    images = torch.randn(2, 3, model.img_size, model.img_size, device=engine.device, dtype=torch.bfloat16)
    loss, _, _ = engine(images, torch.rand(2, model.num_patches, device=engine.device))
    engine.backward(loss)
    engine.step()
    store = CheckpointStore(Path(tempfile.mkdtemp(prefix="ckpt_ds_", dir=b.args.ckpt_dir)), keep_last=1)
    results = []
    try:
        _ds_saves(b, engine, store, results)
    finally:
        shutil.rmtree(store.root, ignore_errors=True)
    total, save_s, size = min(results)
    b.add("checkpoint", f"DeepSpeed ZeRO-2 bf16 {b.args.ckpt_model} via CheckpointStore", measured=size / total / 1e9,
          unit="GB/s", note=f"{size / 1e6:,.1f} MB, {backend}, best of {len(results)}: save_checkpoint {save_s:.2f}s + "
                           f"commit (crc32+fsync+rename) {total - save_s:.2f}s")
    del engine
    torch.distributed.destroy_process_group()


def _ds_saves(b: Bench, engine, store, results: list) -> None:
    for step in range(1, b.args.ckpt_repeats + 1):
        t0 = time.perf_counter()
        path = store.begin(step)  # the trainer's collective protocol, world size 1
        engine.save_checkpoint(str(path), tag="ds")
        torch.save({"torch": torch.get_rng_state()}, path / "rank0_rng.pt")
        t1 = time.perf_counter()
        commit = store.commit(step, {"bench": True})
        results.append((time.perf_counter() - t0, t1 - t0, commit.bytes))


def run(args: argparse.Namespace) -> Bench:
    b = Bench(args)
    b.section("env", 30, 1, lambda: section_env(b))
    b.section("peak", 60, 5, lambda: section_matmul(b))
    combos = [(m, layout) for layout in ("all", "visible") for m in args.models]
    for name, layout in combos:
        b.section(f"train {name} {layout} eager", args.row_budget, 5, lambda n=name, la=layout: train_row(b, n, la, False))
    b.section("checkpoint torch.save", 90, 5, lambda: section_ckpt_torch(b))
    b.section("checkpoint deepspeed", 120, 10, lambda: section_ckpt_deepspeed(b))
    b.section("decode", 90, 5, lambda: section_decode(b))
    for name, layout in combos:
        if args.cpu_smoke:
            b.add("train bf16", f"{name} {layout} compile", note="skipped: cpu-smoke (compile costs ~20 s on CPU)")
            continue
        b.section(f"train {name} {layout} compile", args.compile_budget, 45,
                  lambda n=name, la=layout: train_row(b, n, la, True))
    print()
    print(markdown(b.rows, b.meta))
    b.flush()
    return b


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="CPU, debug models, tiny batches, no compile")
    p.add_argument("--budget", type=float, default=None, help="global deadline in seconds (420 GPU, 55 smoke)")
    p.add_argument("--data", default=None, help="folder or tar of JPEGs for the decode rows")
    p.add_argument("--out-dir", default=os.environ.get("OUT"), help="where gpu_results.{md,json} go ($OUT)")
    p.add_argument("--ckpt-dir", default=None, help="local-disk folder for checkpoint writes (default: TMPDIR)")
    p.add_argument("--no-force-flash", action="store_true", help="let SDPA pick its kernel instead of flash")
    p.add_argument("--prepare-data", nargs=2, metavar=("SRC", "DEST_TAR"), help="make the .gpudata tar and exit")
    p.add_argument("--max-images", type=int, default=None)
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    defaults = dict(budget=55 if smoke else 420, max_images=16 if smoke else 1000)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    # ViT first: it is the baseline of the CRATE row of the same layout.
    args.models = ["vit_mae_debug", "crate_mae_debug"] if smoke else ["vit_mae_base", "crate_mae_base"]
    args.ckpt_model = "crate_mae_debug" if smoke else "crate_mae_base"
    args.matmul_n, args.matmul_iters = (256, 5) if smoke else (8192, 20)
    args.batch_start, args.batch_cap = (2, 8) if smoke else (32, 2048)
    args.row_seconds, args.row_budget, args.compile_budget = (0.2, 20, 30) if smoke else (3.0, 75, 150)
    args.ckpt_repeats, args.decode_seconds, args.decode_batch = (1, 0.3, 8) if smoke else (2, 3.0, 128)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.prepare_data:
        prepare_data(Path(args.prepare_data[0]), Path(args.prepare_data[1]), args.max_images)
        return
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device visible; use --cpu-smoke on a machine without a GPU")
    if args.cpu_smoke:
        torch.set_num_threads(1)  # shared 2-core machine
        os.environ["DS_ACCELERATOR"] = "cpu"  # before any deepspeed import: it picks its accelerator once
    run(args)


if __name__ == "__main__":
    main()
