"""Loader factory: per-rank micro-batches in the global sampler's order, DALI or PIL backend.

    loader = make_train_loader(manifest, state=LoaderState(...), rank=r, world_size=W, global_batch=B,
                               micro_batch=b, image_size=224, num_patches=196, kind="dali")
    batch = next(loader)   # {"images", "labels", "sample_ids", "mask_noise"}
    loader.state()         # LoaderState after the last global batch whose micro-batches were all handed out

Each global step is B/(b*W) micro-batches per rank. A global batch counts as consumed when its
last micro-batch is handed out, so a checkpoint taken after that optimizer step resumes with the
next global batch on any world size. Infinite across epochs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .feed import NO_REPLACEMENT, SampleFeed, bad_reason
from .gpu_decode import HW_DECODER_LOAD
from .manifest_index import ManifestArrays
from .sampler import GlobalSampler, LoaderState, SamplerError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dali_import_error() -> str | None:
    """None when nvidia.dali imports, else the import error in one line (shown to the user, not swallowed)."""
    try:
        import nvidia.dali  # noqa: F401
        return None
    except Exception as exc:  # noqa: BLE001 - a broken install raises more than ImportError (OSError, ...)
        return " ".join(f"{type(exc).__name__}: {exc}".split())


def dali_available() -> bool:
    return dali_import_error() is None


@dataclass(frozen=True)
class DecoderChoice:
    """Which decoder makes the pixels and why. Decoders give different pixels (DALI's and PIL's resize and
    IDCT differ), so `identity` is recorded with every checkpoint and compared on resume."""
    kind: str             # "dali" | "pil"
    device: str | None    # DALI: "cpu" | "gpu" (the "mixed" nvJPEG decoder); PIL: None
    identity: str         # "DALI 2.4.0 cpu", "DALI 2.4.0 mixed", "PIL 13.0.0 libjpeg-turbo 3.2.0"
    why: str              # "data.loader=dali", "auto: nvidia.dali imports", "auto: nvidia.dali not importable (...)"


def _pil_identity() -> str:
    import PIL
    from PIL import features

    jpeg = features.version("libjpeg_turbo")
    return f"PIL {PIL.__version__} " + (f"libjpeg-turbo {jpeg}" if jpeg else f"libjpeg {features.version('jpg')}")


def choose_decoder(kind: str, device: str | None = None) -> DecoderChoice:
    """Resolve `data.loader` (auto | dali | pil) to a decoder; 'dali' without DALI is an error naming why."""
    if kind not in ("auto", "dali", "pil"):
        raise ValueError(f"loader kind must be 'dali', 'pil' or 'auto', got {kind!r}")
    error = None if kind == "pil" else dali_import_error()
    if kind == "dali" and error:
        raise ValueError(f"loader kind 'dali' asked for but nvidia.dali is not importable ({error}); "
                         f"use kind='pil' or 'auto'")
    if kind == "pil" or error:
        why = "data.loader=pil" if kind == "pil" else f"auto: nvidia.dali not importable ({error})"
        return DecoderChoice("pil", None, _pil_identity(), why)
    import nvidia.dali

    dev = resolve_device(device)
    why = "data.loader=dali" if kind == "dali" else "auto: nvidia.dali imports"
    return DecoderChoice("dali", dev, f"DALI {nvidia.dali.__version__} {'mixed' if dev == 'gpu' else 'cpu'}", why)


def resolve_kind(kind: str) -> str:
    return choose_decoder(kind, "cpu").kind


def resolve_device(device: str | None) -> str:
    if device is None:
        import torch
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "gpu"):
        raise ValueError(f"loader device must be 'cpu' or 'gpu', got {device!r}")
    return device


def _backend(choice: DecoderChoice, feed: SampleFeed, batch_size: int, image_size: int, num_threads: int,
             py_workers: int, hw_decoder_load: float = HW_DECODER_LOAD, prefetch_depth: int = 2, gpu_decode: str = "auto"):
    if choice.kind == "dali":
        from .dali_loader import DaliBackend
        return DaliBackend(feed, batch_size, image_size, num_threads, choice.device, py_workers,
                           gpu_decode=gpu_decode, hw_decoder_load=hw_decoder_load, prefetch_depth=prefetch_depth)
    from .pil_loader import PilBackend
    return PilBackend(feed, batch_size, image_size, num_threads, prefetch_depth)


class BadSamples:
    """This rank's samples that failed to read or decode: how many, how many found no replacement, and the
    first few as 'path (reason)' (tar members as 'shard@offset')."""
    KEEP = 5

    def __init__(self, manifest: ManifestArrays):
        self._manifest = manifest
        self.count = 0
        self.lost = 0  # no decodable replacement: these batches must never reach the model
        self.examples: list[str] = []

    def record(self, bad, bad_row) -> None:
        codes, rows = np.asarray(bad).reshape(-1), np.asarray(bad_row).reshape(-1)
        for i in np.flatnonzero(codes):
            code, row = int(codes[i]), int(rows[i])
            self.count += 1
            self.lost += bool(code & NO_REPLACEMENT)
            if len(self.examples) < self.KEEP and row >= 0:
                path, offset, _ = self._manifest.location(row)
                self.examples.append(f"{path if offset < 0 else f'{path}@{offset}'} ({bad_reason(code)})")


class TrainLoader:
    """Iterator of per-rank micro-batch dicts; tracks LoaderState and replaced (bad) samples."""

    def __init__(self, backend, feed: SampleFeed, sampler: GlobalSampler, accum: int, start_step: int):
        self._backend, self._it = backend, iter(backend)
        self.feed, self.sampler = feed, sampler
        self.grad_accum = accum
        self.steps_per_epoch = sampler.steps_per_epoch
        self.start_step = start_step
        self.micro_batches = 0
        self.bad = BadSamples(feed.manifest)

    @property
    def bad_samples(self) -> int:
        return self.bad.count

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        self.bad.record(batch.pop("bad"), batch.pop("bad_row"))
        self.micro_batches += 1
        return batch

    @property
    def decode_route(self) -> dict:
        """How images are decoded (dali_loader / gpu_decode.choose_route); PIL decodes on the CPU."""
        return getattr(self._backend, "decode_route", {"device": "cpu", "decode": "pil", "fallbacks": 0})

    def state(self) -> LoaderState:
        step = self.start_step + self.micro_batches // self.grad_accum
        epoch, g = divmod(step, self.steps_per_epoch)
        return LoaderState(epoch, g * self.sampler.global_batch, self.sampler.seed)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_train_loader(manifest_path, *, state: LoaderState, rank: int, world_size: int, global_batch: int,
                      micro_batch: int, image_size: int, num_patches: int, kind: str = "dali",
                      num_threads: int = 1, split: str = "train", device: str | None = None,
                      py_workers: int = 1, hw_decoder_load: float = HW_DECODER_LOAD, prefetch_depth: int = 2,
                      gpu_decode: str = "auto") -> TrainLoader:
    """Per-rank train micro-batches continuing from `state` (see module docstring). hw_decoder_load,
    prefetch_depth and gpu_decode (data_pipeline/gpu_decode.py) go to DALI; the PIL backend takes
    prefetch_depth per worker."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise SamplerError(f"make_train_loader: bad rank={rank} for world_size={world_size}")
    if global_batch % world_size or (global_batch // world_size) % micro_batch:
        raise SamplerError(f"make_train_loader: global_batch={global_batch} must equal micro_batch={micro_batch} "
                           f"x grad_accum x world_size={world_size}")
    ma = ManifestArrays(manifest_path, split)
    if len(ma.rows) == 0:
        raise SamplerError(f"make_train_loader: no rows with split={split!r} in {manifest_path}")
    sampler = GlobalSampler(len(ma.rows), state.seed, global_batch)
    start = state.global_step(sampler.steps_per_epoch, global_batch)
    feed = SampleFeed(str(manifest_path), mode="train", seed=state.seed, split=split, global_batch=global_batch,
                      rank=rank, world_size=world_size, start_step=start, num_patches=num_patches)
    feed._ma, feed._sampler = ma, sampler  # reuse in this process; workers reload lazily
    backend = _backend(choose_decoder(kind, device), feed, micro_batch, image_size, num_threads, py_workers,
                       hw_decoder_load=hw_decoder_load, prefetch_depth=prefetch_depth, gpu_decode=gpu_decode)
    return TrainLoader(backend, feed, sampler, global_batch // world_size // micro_batch, start)


class EvalLoader:
    """Finite iterator over `rows` in order, batch_size each (last one smaller), no mask noise. A row that
    could not be read or decoded keeps its place with `valid` False (its image is filler: leave it out)."""

    def __init__(self, backend, n: int, batch_size: int, manifest: ManifestArrays):
        self._backend, self._it = backend, iter(backend)
        self.n, self.batch_size = n, batch_size
        self.batches = math.ceil(n / batch_size)
        self.done = 0
        self.bad = BadSamples(manifest)

    @property
    def bad_samples(self) -> int:
        return self.bad.count

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.done >= self.batches:
            self.close()
            raise StopIteration
        batch = next(self._it)
        keep = min(self.batch_size, self.n - self.done * self.batch_size)
        self.done += 1
        if keep < self.batch_size:  # the feed clamps past the end; drop the padding
            batch = {k: v[:keep] for k, v in batch.items()}
        batch["valid"] = batch["bad"] == 0
        self.bad.record(batch.pop("bad"), batch.pop("bad_row"))
        return batch

    def close(self) -> None:
        self._backend.close()


def make_eval_loader(manifest_path, rows: np.ndarray, batch_size: int, image_size: int, kind: str = "dali",
                     num_threads: int = 1, device: str | None = None, py_workers: int = 1,
                     hw_decoder_load: float = HW_DECODER_LOAD, prefetch_depth: int = 2) -> EvalLoader:
    """Resize (short side image_size*256/224) + centre crop, rows in the given order, no drop."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or len(rows) == 0 or batch_size <= 0:
        raise ValueError(f"make_eval_loader: need a non-empty 1-D array of rows and batch_size > 0, "
                         f"got shape {rows.shape}, batch_size={batch_size}")
    ma = ManifestArrays(manifest_path, None)
    if rows.min() < 0 or rows.max() >= ma.total_rows:
        raise ValueError(f"make_eval_loader: row indices must be in [0, {ma.total_rows}) for {manifest_path}")
    feed = SampleFeed(str(manifest_path), mode="eval", rows=rows)
    feed._ma = ma
    backend = _backend(choose_decoder(kind, device), feed, batch_size, image_size, num_threads, py_workers,
                       hw_decoder_load=hw_decoder_load, prefetch_depth=prefetch_depth)
    return EvalLoader(backend, len(rows), batch_size, ma)
