"""DALI backend: parallel external source (our SampleFeed) -> image_slice decode -> resize -> normalize.

The feed runs in `py_workers` worker processes and returns encoded bytes plus the per-sample
window and flip; DALI decodes only the window (ROI decode) on the CPU ("cpu") or with nvJPEG
("gpu" -> "mixed" decoder), resizes to image_size and normalises to CHW float32. On the GPU the
route (crop-window decode, or full decode + slice) is chosen by gpu_decode.py.
"""
from __future__ import annotations

import copy
import os
import signal
import sys

import numpy as np
import torch

from .feed import SampleFeed
from .gpu_decode import HW_DECODER_LOAD, choose_route, describe, probe_once

_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def worker_start_method(device: str, driver_initialised: bool) -> str:
    """How the feed's Python workers start. fork, like torch's DataLoader (no re-import of __main__, so scripts
    without a main guard, notebooks and stdin work; the loaded manifest is inherited), unless this process holds
    CUDA: DALI's pool refuses fork once the CUDA driver is initialised, which torch.cuda.is_available() alone
    does (a CPU pipeline for evaluation on a GPU node). spawn then; the feed reloads the manifest per worker."""
    return "spawn" if device == "gpu" or driver_initialised else "fork"


def _driver_initialised() -> bool:
    from nvidia.dali import backend

    return bool(backend.IsDriverInitialized())  # the same test DALI's worker pool makes before a fork


def build_pipeline(feed: SampleFeed, batch_size: int, image_size: int, num_threads: int, device: str,
                   py_workers: int, device_id: int | None = None, hw_decoder_load: float = HW_DECODER_LOAD,
                   prefetch_depth: int = 2, decode: str = "roi", parallel: bool = True):
    """prefetch_depth: batches DALI prepares ahead (more hides decode jitter, costs one batch of memory each).
    hw_decoder_load: with the mixed decoder, the share of images sent to the GPU's hardware JPEG engines
    (A100/H100 NVJPG, outside the SMs); the rest take the CUDA path (Huffman on the CPU threads).
    decode: "roi" decodes only the crop window (fn.decoders.image_slice); "full" decodes the whole image and
    slices the window out after (on the GPU with device "gpu"), the route around a crashing ROI decoder.
    parallel=False: the feed runs in this process and each run() is one whole iteration (the decode checker)."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    if decode not in ("roi", "full"):
        raise ValueError(f"build_pipeline: decode must be 'roi' or 'full', got {decode!r}")
    if device == "gpu" and device_id is None:
        device_id = torch.cuda.current_device()
    workers = dict(py_num_workers=max(1, py_workers),
                   py_start_method=worker_start_method(device, _driver_initialised())) if parallel else {}
    pipe = Pipeline(batch_size=batch_size, num_threads=max(1, num_threads),
                    device_id=device_id if device == "gpu" else None, prefetch_queue_depth=prefetch_depth, **workers)
    train = feed.mode == "train"
    dtypes = [types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.INT64, types.INT64, types.INT32, types.INT64]
    if train:
        dtypes.append(types.FLOAT)
    with pipe:
        queue = {"prefetch_queue_depth": 2} if parallel else {}
        outs = fn.external_source(source=feed, batch=False, parallel=parallel, num_outputs=len(dtypes),
                                  dtype=dtypes, **queue)
        data, anchor, shape, flip, sid, label, bad, bad_row = outs[:8]
        mixed = {"device": "mixed", "hw_decoder_load": hw_decoder_load} if device == "gpu" else {"device": "cpu"}
        window = {"normalized_anchor": True, "normalized_shape": True}
        if decode == "roi":
            images = fn.decoders.image_slice(data, anchor, shape, output_type=types.RGB, adjust_orientation=False,
                                             **window, **mixed)
        else:
            images = fn.decoders.image(data, output_type=types.RGB, adjust_orientation=False, **mixed)
            images = fn.slice(images, anchor, shape, **window)  # the same window, same (x, y) order
        images = fn.resize(images, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR,
                           antialias=True)
        images = fn.crop_mirror_normalize(images, mirror=fn.reshape(flip, shape=[]), mean=_MEAN, std=_STD,
                                          dtype=types.FLOAT, output_layout="CHW")
        pipe.set_outputs(images, sid, label, bad, bad_row, *(outs[8:] if train else []))
    pipe.build()
    return pipe


def gpu_to_torch(batch, feed_ndarray, device: torch.device, stream) -> torch.Tensor:
    """Copy a DALI GPU batch into a new torch tensor on `stream`, which must be torch's current stream: torch's
    allocator may hand `out` a block that kernels queued on that stream still read (saved activations in
    backward), and only a copy ordered on the same stream waits for them. Without cuda_stream, feed_ndarray
    copies on DALI's own stream: silent corruption with grad_accum > 1."""
    t = batch.as_tensor()
    out = torch.empty(t.shape(), dtype=torch.float32, device=device)
    feed_ndarray(t, out, cuda_stream=stream)
    return out


def _cuda_target() -> tuple[torch.device, "torch.cuda.Stream"]:
    device = torch.device("cuda", torch.cuda.current_device())
    return device, torch.cuda.current_stream(device)


def _copies_queued(tl) -> "torch.cuda.Event | None":
    """For a GPU batch: an event on torch's stream after its copy (queued there, asynchronously), else None."""
    if type(tl).__name__ != "TensorListGPU":
        return None
    event = torch.cuda.Event()
    event.record(_cuda_target()[1])
    return event


def _to_torch(tl) -> torch.Tensor:
    """A dense DALI TensorList (CPU or GPU) as a torch tensor."""
    if type(tl).__name__ == "TensorListGPU":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        return gpu_to_torch(tl, feed_ndarray, *_cuda_target())
    return torch.from_numpy(np.array(tl.as_tensor()))


class DaliBackend:
    def __init__(self, feed: SampleFeed, batch_size: int, image_size: int, num_threads: int = 1,
                 device: str = "cpu", py_workers: int = 1, gpu_decode: str = "auto", **pipeline_options):
        self.train = feed.mode == "train"
        args = dict(feed=feed, batch_size=batch_size, image_size=image_size, num_threads=num_threads,
                    device=device, py_workers=py_workers, **pipeline_options)
        if device == "gpu" and args.get("device_id") is None:
            args["device_id"] = torch.cuda.current_device()  # the probe's child must use this rank's GPU
        # {"setting", "device", "decode", "fallbacks", "reason"?}: goes into the run's start record
        self.decode_route = choose_route(gpu_decode, device, lambda: probe_once(args))
        if self.decode_route["fallbacks"]:
            print(describe(self.decode_route), file=sys.stderr, flush=True)
        self.feed, self.batch_size = feed, batch_size
        self._args = {**args, "decode": self.decode_route["decode"]}
        self.next_sample = feed.offset  # the feed's n of the first sample not yet handed out
        self.recoveries = 0
        self.pipe = build_pipeline(**self._args)

    def __iter__(self):
        copied = None
        while True:
            if copied is not None:  # the next run() may reuse the last outputs' memory: their copies must be done
                copied.synchronize()
            outs = self._run()
            self.next_sample += self.batch_size
            batch = {"images": _to_torch(outs[0]),
                     "labels": _to_torch(outs[2]).reshape(-1),
                     "sample_ids": _to_torch(outs[1]).reshape(-1)}
            if self.train:
                batch["mask_noise"] = _to_torch(outs[5])
            batch["bad"] = _to_torch(outs[3]).reshape(-1)
            batch["bad_row"] = _to_torch(outs[4]).reshape(-1)
            copied = _copies_queued(outs[0])
            yield batch

    def _run(self):
        """The next batch. A JPEG that passes the feed's byte check but does not decode ends DALI's whole pipeline
        (a critical error, not a per-sample one): find the sample, mark it failed so the feed gives its
        deterministic replacement (counted as bad, like PIL's), rebuild from the first sample not handed out."""
        failed: list[str] = []
        for _ in range(MAX_RECOVERIES_PER_BATCH):
            try:
                return self.pipe.run()
            except RuntimeError as exc:
                if not _is_decode_error(exc):
                    raise
                failed.append(self._recover(exc))
        raise UndecodableData(f"bad data: {MAX_RECOVERIES_PER_BATCH} undecodable samples within one batch from "
                              f"sample {self.next_sample} (DALI); first: "
                              + ", ".join(f"{where} (decode error)" for where in failed[:5]))

    def _recover(self, exc: RuntimeError) -> str:
        """Replace the sample that ended the pipeline and rebuild it; returns where that sample's bytes are."""
        close_pipeline(self.pipe)
        self.pipe = None
        n, why = first_undecodable(self._args, self.next_sample,
                                   self.batch_size * (self._args.get("prefetch_depth", 2) + 2), exc)
        self.feed.failed[n] = self.feed.failed.get(n, 0) + 1
        self.feed.offset = self.next_sample
        self.recoveries += 1
        path, offset, _ = self.feed.manifest.location(self.feed.sample(n, self.feed.failed[n] - 1)["row"])
        where = path if offset < 0 else f"{path}@{offset}"
        print(f"DALI: {where} {why}; sample replaced, pipeline rebuilt (recovery {self.recoveries})",
              file=sys.stderr, flush=True)
        self.pipe = build_pipeline(**self._args)
        return where

    def close(self) -> None:
        """Stop the pipeline and its Python workers now rather than at garbage collection."""
        pipe, self.pipe = getattr(self, "pipe", None), None
        if pipe is not None:
            close_pipeline(pipe)


def close_pipeline(pipe) -> None:
    pool = getattr(pipe, "_py_pool", None)
    if hasattr(pipe, "_shutdown"):
        pipe._shutdown()
    if pool is not None:
        pool.close()


MAX_RECOVERIES_PER_BATCH = 64  # past this many undecodable samples in one batch the data is not worth training on


def _is_decode_error(exc: BaseException) -> bool:
    return "Critical error in pipeline" in str(exc) and "fn.decoders.image" in str(exc)


def _decode_reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if "failure" in line or "rror:" in line]
    return lines[-1] if lines else "decoder error"


def first_undecodable(args: dict, start: int, window: int, exc: RuntimeError) -> tuple[int, str]:
    """(n, why): the feed's n of the first sample from `start` that the same decoder, on the same device with
    the same window, fails on alone (batch 1, one iteration per run), and how it failed. On the CPU the check
    runs in a forked child, so a decoder that crashes on a sample (a signal: DALI's executor thread has died
    by SIGSEGV on damaged JPEGs) kills the child, not this rank: the sample the child was decoding is the one.
    Raises UndecodableData (the bad-data line) when none of the next `window` fails alone."""
    if args["device"] == "gpu":  # a forked child cannot use this process's CUDA context: check here
        try:
            return _check_alone(args, start, window, lambda line: None)
        except UndecodableData:
            raise _nothing_alone(exc, start, window) from exc
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report each sample before decoding it, then the verdict; leave without cleanup
        os.close(read)
        out = os.fdopen(write, "w", buffering=1)
        try:
            n, _ = _check_alone(args, start, window, lambda line: print(line, file=out, flush=True))
            print(f"failed {n}", file=out, flush=True)
        except UndecodableData:
            print("none", file=out, flush=True)
        except BaseException as err:  # noqa: BLE001 - told to the parent, which raises it
            print("error " + f"{type(err).__name__}: {err}".replace("\n", " "), file=out, flush=True)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as lines:
        verdict, _, arg = ([line.strip() for line in lines][-1:] or ["none"])[0].partition(" ")
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and verdict == "decoding":
        return int(arg), f"crashed the decoder ({signal.Signals(os.WTERMSIG(status)).name})"
    if verdict == "failed":
        return int(arg), f"did not decode ({_decode_reason(exc)})"
    if verdict == "error":
        raise RuntimeError(f"DALI decode check of samples from {start}: {arg}") from exc
    raise _nothing_alone(exc, start, window) from exc


def _check_alone(args: dict, start: int, window: int, report) -> tuple[int, str]:
    feed = copy.copy(args["feed"])
    feed.offset, feed.failed = start, dict(feed.failed)
    checker = dict(args, feed=feed, batch_size=1, prefetch_depth=1, parallel=False)
    pipe, j = build_pipeline(**checker), 0
    try:
        while j < window:
            report(f"decoding {start + j}")
            try:
                pipe.run()
            except RuntimeError as err:
                if _is_decode_error(err):
                    return start + j, f"did not decode ({_decode_reason(err)})"
                raise
            j += 1
    finally:
        close_pipeline(pipe)
    raise _nothing_alone(None, start, window)


def _nothing_alone(exc: RuntimeError | None, start: int, window: int) -> "UndecodableData":
    why = f" ({_decode_reason(exc)})" if exc is not None else ""
    return UndecodableData(f"bad data: the DALI pipeline failed{why} but none of samples {start}..{start + window - 1} "
                           f"fails alone")


class UndecodableData(ValueError):
    """DALI's recovery cannot go on (too many undecodable samples in a batch, or a failure no single sample
    causes): the bad-data line. A ValueError: the same data fails the same way, so it is not retried."""
