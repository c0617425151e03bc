"""Single-GPU benchmark of cratescale (run by bench/gpu.sh): bf16 training steps of CRATE-MAE-Base and
ViT-MAE-Base (largest batch that fits, the fastest SDPA kernel, eager and torch.compile, token layouts
"all" and "visible") with images/s and MFU against a measured bf16 matmul peak; checkpoint write GB/s
(torch.save + fsync, and DeepSpeed ZeRO-2 through CheckpointStore); batched nvJPEG decode images/s.

    python3 -m bench.gpu_bench [--budget 420] [--data .gpudata] [--out-dir DIR]
    python3 -m bench.gpu_bench --cpu-smoke [--data DIR_OR_TAR]      # same code paths, debug models, CPU
    python3 -m bench.gpu_bench --prepare-data SRC.tar DEST.tar [--max-images 300]

Every section runs under a time box (SIGALRM) inside one global deadline; a failing section prints its error
and the rest runs. Rows are printed as they finish; the markdown table and JSON are rewritten after every
row to --out-dir (default $OUT), so a killed run still leaves partial results.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from cratescale.models import create_model

from bench.gpu_decode import load_jpegs, prepare_data, section_decode  # noqa: F401
from bench.gpu_harness import Bench, markdown, sync
from bench.gpu_kernels import kernel_train_row, section_mssa_kernel, section_patch_embed_and_view, section_small_batch  # noqa: E501
from bench.gpu_train import engine_row, engine_step, job_engine, make_step, section_attention, train_row

REPO = Path(__file__).resolve().parents[1]


def section_env(b: Bench) -> None:
    meta = {"torch": torch.__version__, "python": sys.version.split()[0], "host": socket.gethostname()}
    if b.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta.update(device=f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs",
                    flash_sdp=torch.backends.cuda.flash_sdp_enabled(), cuda=torch.version.cuda)
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
    # CPU smoke: fp32, since a CPU without bf16 GEMM units emulates bf16 matmul ~40x slower than fp32 (measured
    # 1.3 vs 49 GFLOP/s here), far below what the model's own ops reach: MFU would read > 1.
    dtype = torch.float32 if b.args.cpu_smoke else torch.bfloat16
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
    # the smoke's tiny matmul is at the mercy of any other process: its best is the peak (the GPU takes the median)
    tflops = 2 * n**3 / (min(times) if b.args.cpu_smoke else statistics.median(times)) / 1e12
    b.peak_flops = tflops * 1e12
    b.meta["peak_tflops"] = round(tflops, 3)
    b.add("peak", f"{'fp32' if b.args.cpu_smoke else 'bf16'} matmul {n}^3", measured=tflops, unit="TFLOP/s",
          note=f"{'best' if b.args.cpu_smoke else 'median'} of {len(times)}; datasheet H100 SXM dense bf16 989, H200 989")


def _ckpt_model(b: Bench):
    torch.manual_seed(0)
    model = create_model(b.args.ckpt_model).to(b.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    make_step(b, model, model, opt, 2, autocast=True)()  # fills AdamW's exp_avg / exp_avg_sq
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


class _TimedStore:
    """A CheckpointStore whose commits are timed, so a save splits into DeepSpeed's writes and our commit."""

    def __init__(self, store) -> None:
        self.store, self.commit_s = store, []

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def commit(self, step: int, meta: dict, *args, **kwargs):  # the ranks' sealed lists pass through
        t0 = time.perf_counter()
        try:
            return self.store.commit(step, meta, *args, **kwargs)
        finally:
            self.commit_s.append(time.perf_counter() - t0)


def section_ckpt_deepspeed(b: Bench) -> None:
    """The trainer's own collective save (engine.state.save_state) of the job's engine, world size 1."""
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        b.add("checkpoint", "DeepSpeed ZeRO-2 via CheckpointStore", note=f"skipped: deepspeed does not import ({exc})")
        return
    from cratescale.checkpoint import CheckpointStore
    from cratescale.engine.state import save_state

    torch.manual_seed(0)
    size = create_model(b.args.ckpt_model).img_size
    engine, _, _, backend = job_engine(b, b.args.ckpt_model, 2, size)
    engine_step(engine, engine.module, 2)()  # fills AdamW's moments
    store = _TimedStore(CheckpointStore(Path(tempfile.mkdtemp(prefix="ckpt_ds_", dir=b.args.ckpt_dir)), keep_last=1))
    results = []
    try:
        for step in range(1, b.args.ckpt_repeats + 1):
            t0 = time.perf_counter()
            commit = save_state(engine, store, step, {"bench": True}, rank=0)
            results.append((time.perf_counter() - t0, store.commit_s[-1], commit.bytes))
    finally:
        shutil.rmtree(store.root, ignore_errors=True)
    total, commit_s, nbytes = min(results)
    b.add("checkpoint", f"DeepSpeed ZeRO-2 bf16 {b.args.ckpt_model} via save_state + CheckpointStore",
          measured=nbytes / total / 1e9, unit="GB/s",
          note=f"{nbytes / 1e6:,.1f} MB, {backend}, best of {len(results)}: DeepSpeed writes {total - commit_s:.2f}s "
               f"+ commit (crc32+fsync+rename) {commit_s:.2f}s")
    _ckpt_async_row(b, engine, [r[0] for r in results])
    del engine
    torch.distributed.destroy_process_group()


def _ckpt_async_row(b: Bench, engine, sync_s: list[float]) -> None:
    """Issue 18: the asynchronous commit of the same engine (bf16 weights + fp32 master, copied to pinned host
    buffers at the boundary): the training stall against the synchronous commit above, and its total time."""
    from cratescale.checkpoint import CheckpointStore
    from cratescale.engine.commit_async import AsyncCommitter

    store = CheckpointStore(Path(tempfile.mkdtemp(prefix="ckpt_async_", dir=b.args.ckpt_dir)), keep_last=1)
    done: list[dict] = []
    committer = AsyncCommitter(engine, store, 0, on_done=done.append)
    try:
        for step in range(1, b.args.ckpt_repeats + 1):
            committer.commit(step, {"bench": True}, final=True)
    finally:
        shutil.rmtree(store.root, ignore_errors=True)
    stall = statistics.median(r["stall_s"] for r in done)
    total = statistics.median(r["seconds"] for r in done)
    b.add("checkpoint", f"async commit {b.args.ckpt_model}: stall / synchronous commit (pinned staging)",
          measured=stall / statistics.median(sync_s), unit="x",
          note=f"target <= 0.15; stall {stall:.3f}s, total {total:.2f}s (medians of {len(done)}), pinned "
               f"{committer.pin}")


def sections(b: Bench) -> list[tuple[str, float, float, Callable[[], None]]]:
    """(name, time box, least time left to start, fn) in priority order: what the targets need first."""
    a = b.args
    vit, crate = a.models

    def train(name: str, layout: str, compiled: bool, **kw) -> Callable[[], None]:
        return lambda: train_row(b, name, layout, compiled, **kw)

    eager_rows = [(f"train {m} {la} eager", a.row_budget, 5, train(m, la, False, profile=(m, la) == (crate, "all")))
                  for la in ("all", "visible") for m in (vit, crate)]
    return [
        ("env", 30, 1, lambda: section_env(b)),
        ("peak", 60, 5, lambda: section_matmul(b)),
        ("attention", 40, 5, lambda: section_attention(b)),
        ("mssa kernel", 60, 5, lambda: section_mssa_kernel(b)),
        *eager_rows,
        (f"train {crate} all eager mssa_triton", a.row_budget, 5, lambda: kernel_train_row(b, False)),
        (f"train {crate} all compile", a.compile_budget, 45, train(crate, "all", True, profile=True)),
        (f"train {vit} all compile", a.compile_budget, 45, train(vit, "all", True)),
        (f"train {crate} all compile mssa_triton", a.compile_budget, 45, lambda: kernel_train_row(b, True)),
        (f"engine {crate} all eager", 90, 15, lambda: engine_row(b, False)),
        (f"engine {crate} all compile", a.compile_budget, 45, lambda: engine_row(b, True)),
        ("small batch", 240, 5 if a.cpu_smoke else 60, lambda: section_small_batch(b)),
        ("patch embed and strided view", 40, 5, lambda: section_patch_embed_and_view(b)),
        (f"engine {crate} all compile overlap_comm", a.compile_budget, 45,
         lambda: engine_row(b, True, ("parallel.overlap_comm=true",))),
        ("checkpoint torch.save", 90, 5, lambda: section_ckpt_torch(b)),
        ("checkpoint deepspeed", 120, 10, lambda: section_ckpt_deepspeed(b)),
        ("decode", 90, 5, lambda: section_decode(b)),
        (f"train {crate} all eager act-ckpt", a.row_budget, 5, train(crate, "all", False, variant="act-ckpt")),
        (f"train {crate} all eager autocast", a.row_budget, 5, train(crate, "all", False, variant="autocast")),
        (f"train {crate} visible compile", a.compile_budget, 45, train(crate, "visible", True)),
        (f"train {vit} visible compile", a.compile_budget, 45, train(vit, "visible", True)),
    ]


def run(args: argparse.Namespace) -> Bench:
    b = Bench(args)
    only = [x.strip() for x in args.only.split(",")] if args.only else None
    for name, box, min_s, fn in sections(b):
        if only and name not in ("env", "peak", "attention") and not any(x in name for x in only):
            continue
        if args.cpu_smoke and " compile" in name:
            b.add(name, "(section)", note="skipped: cpu-smoke (compile costs ~20 s on CPU)")
            continue
        if args.cpu_smoke and name.endswith("mssa_triton"):
            b.add(name, "(section)", note="skipped: cpu-smoke (Triton's interpreter takes seconds per layer; "
                                         "tests/dist/test_mssa_kernel_train.py trains with the kernel)")
            continue
        b.section(name, box, min_s, fn)
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
    p.add_argument("--sdpa", default="best", choices=["best", "auto", "flash", "cudnn", "efficient"],
                   help="attention kernel of the training rows; best: the fastest in the attention section")
    p.add_argument("--batch-start", type=int, default=None, help="first batch of the eager rows' doubling search")
    p.add_argument("--batch-cap", type=int, default=None, help="last batch of that search")
    p.add_argument("--prepare-data", nargs=2, metavar=("SRC", "DEST_TAR"), help="make the .gpudata tar and exit")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--only", default=None, help="comma-separated substrings of section names to run (env and "
                                                "peak always run), e.g. 'crate_mae_base all'")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    defaults = dict(budget=55 if smoke else 420, max_images=16 if smoke else 1000,
                    batch_start=2 if smoke else 32, batch_cap=8 if smoke else 2048)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    # ViT first: it is the baseline of the CRATE row of the same layout.
    args.models = ["vit_mae_debug", "crate_mae_debug"] if smoke else ["vit_mae_base", "crate_mae_base"]
    args.ckpt_model = "crate_mae_debug" if smoke else "crate_mae_base"
    args.matmul_n, args.matmul_iters = (256, 20) if smoke else (8192, 20)
    args.attn_batch = 1024
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
        os.environ["TRITON_INTERPRET"] = "1"  # before the MSSA kernel is imported: Triton's CPU interpreter
    run(args)


if __name__ == "__main__":
    main()
