"""Which JPEG decode route a DALI pipeline takes (data.gpu_decode: auto | roi | full), and the probe behind auto.

The crop-window decoder on the GPU (fn.decoders.image_slice, device "mixed", through nvImageCodec) has an open
upstream report of SIGSEGV on H100 on the first batch of ordinary ImageNet JPEGs (NVIDIA/nvImageCodec #55).
A crash there kills one rank while the others wait for the collective timeout, and the requeued job crashes the
same way. So "auto" first runs that decoder on two batches in a child process (a segfault there is reported,
not fatal) and, if the child fails, decodes whole images and slices the window on the GPU: slower, not silent.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import sys
from typing import Callable

GPU_DECODE = ("auto", "roi", "full")
# The share of images the mixed decoder sends to the hardware JPEG engines (data.hw_decoder_load): the one
# default of every loader; cratescale/config/schema.py states it too (config may not import data_pipeline),
# and tests/unit/test_config.py keeps the two equal.
HW_DECODER_LOAD = 0.75
PROBE_BATCHES = 2
PROBE_TIMEOUT_S = 180.0  # spawn + CUDA context + pipeline build + two batches; a hang counts as a failure


def choose_route(setting: str, device: str, probe: Callable[[], str | None]) -> dict:
    """The route record: {"setting", "device", "decode" ("roi" | "full"), "fallbacks", "reason"?}.
    "roi" / "full" force a route (on the CPU too, where both run libjpeg-turbo); "auto" decodes the window on the
    CPU and, on a GPU, calls probe() (None: the crop-window decoder worked, else why not), falling back to
    "full" when it failed."""
    if setting not in GPU_DECODE:
        raise ValueError(f"gpu_decode must be one of {list(GPU_DECODE)}, got {setting!r}")
    route = {"setting": setting, "device": device, "decode": "roi", "fallbacks": 0}
    if setting != "auto":
        return {**route, "decode": setting}
    if device != "gpu":
        return route
    reason = probe()
    if reason is None:
        return route
    return {**route, "decode": "full", "fallbacks": 1, "reason": reason}


def describe(route: dict) -> str:
    """One console line for a route that fell back."""
    return (f"[data_pipeline] crop-window GPU decode failed its {PROBE_BATCHES}-batch probe ({route['reason']}); "
            f"decoding full images + GPU slice instead (data.gpu_decode=auto; 'full' skips the probe)")


def run_isolated(target: Callable, args: tuple, timeout_s: float) -> str | None:
    """Run target(*args) in a spawned child: None when it returned, else one line saying how it failed (a signal
    such as SIGSEGV, an exception, or no answer within timeout_s). target must be importable by name."""
    ctx = mp.get_context("spawn")  # a CUDA context cannot cross a fork
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_guarded, args=(send, target, args), name="gpu-decode-probe")
    proc.start()
    send.close()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return f"no answer within {timeout_s:.0f} s (killed)"
    try:
        message = recv.recv() if recv.poll() else ""
    except EOFError:  # the child died (or exited) without a word
        message = ""
    recv.close()
    if proc.exitcode == 0:
        return None
    if proc.exitcode < 0:
        return f"killed by {signal.Signals(-proc.exitcode).name}"
    return message or f"exit code {proc.exitcode}"


def _guarded(send, target: Callable, args: tuple) -> None:
    try:
        target(*args)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        first = str(exc).strip().splitlines()
        send.send(f"{type(exc).__name__}: {first[0] if first else ''}"[:300])
        sys.exit(1)


def _probe_crop_decode(pipeline_args: dict, batches: int) -> None:
    from .dali_loader import build_pipeline, close_pipeline

    pipe = build_pipeline(**pipeline_args, decode="roi")
    try:
        for _ in range(batches):
            pipe.run()
    finally:
        close_pipeline(pipe)


_PROBED: dict[int | None, str | None] = {}


def probe_once(pipeline_args: dict) -> str | None:
    """probe_crop_decode, once per GPU per process: extraction and evaluation build a loader per shard."""
    device_id = pipeline_args.get("device_id")
    if device_id not in _PROBED:
        _PROBED[device_id] = probe_crop_decode(pipeline_args)
    return _PROBED[device_id]


def probe_crop_decode(pipeline_args: dict, batches: int = PROBE_BATCHES,
                      timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Run the crop-window pipeline (build_pipeline's keyword arguments, decode="roi") for `batches` batches in
    a child process; None if it worked, else why not. The child reads its own copy of the feed: the parent's
    order is untouched."""
    return run_isolated(_probe_crop_decode, (pipeline_args, batches), timeout_s)
