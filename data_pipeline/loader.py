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
from typing import Iterator

import numpy as np

from .feed import SampleFeed
from .manifest import ManifestArrays
from .sampler import GlobalSampler, LoaderState, SamplerError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except Exception:
        return False


def resolve_kind(kind: str) -> str:
    if kind == "auto":
        return "dali" if dali_available() else "pil"
    if kind not in ("dali", "pil"):
        raise ValueError(f"loader kind must be 'dali', 'pil' or 'auto', got {kind!r}")
    if kind == "dali" and not dali_available():
        raise ValueError("loader kind 'dali' asked for but nvidia.dali is not importable; use kind='pil' or 'auto'")
    return kind


def resolve_device(device: str | None) -> str:
    if device is None:
        import torch
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "gpu"):
        raise ValueError(f"loader device must be 'cpu' or 'gpu', got {device!r}")
    return device


def _backend(kind: str, feed: SampleFeed, batch_size: int, image_size: int, num_threads: int,
             device: str | None, py_workers: int, hw_decoder_load: float = 0.65, prefetch_depth: int = 2):
    if resolve_kind(kind) == "dali":
        from .dali_loader import DaliBackend
        return DaliBackend(feed, batch_size, image_size, num_threads, resolve_device(device), py_workers,
                           hw_decoder_load=hw_decoder_load, prefetch_depth=prefetch_depth)
    from .pil_loader import PilBackend
    return PilBackend(feed, batch_size, image_size, num_threads, prefetch_depth)


class TrainLoader:
    """Iterator of per-rank micro-batch dicts; tracks LoaderState and replaced (bad) samples."""

    def __init__(self, backend, feed: SampleFeed, sampler: GlobalSampler, accum: int, start_step: int):
        self._backend, self._it = backend, iter(backend)
        self.feed, self.sampler = feed, sampler
        self.grad_accum = accum
        self.steps_per_epoch = sampler.steps_per_epoch
        self.start_step = start_step
        self.micro_batches = 0
        self.bad_samples = 0

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        self.bad_samples += int(batch.pop("bad").sum())
        self.micro_batches += 1
        return batch

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
                      py_workers: int = 1, hw_decoder_load: float = 0.65, prefetch_depth: int = 2) -> TrainLoader:
    """Per-rank train micro-batches continuing from `state` (see module docstring). hw_decoder_load and
    prefetch_depth go to DALI (dali_loader.build_pipeline); the PIL backend takes prefetch_depth per worker."""
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
    backend = _backend(kind, feed, micro_batch, image_size, num_threads, device, py_workers,
                       hw_decoder_load=hw_decoder_load, prefetch_depth=prefetch_depth)
    return TrainLoader(backend, feed, sampler, global_batch // world_size // micro_batch, start)


class EvalLoader:
    """Finite iterator over `rows` in order, batch_size each (last one smaller), no mask noise."""

    def __init__(self, backend, n: int, batch_size: int):
        self._backend, self._it = backend, iter(backend)
        self.n, self.batch_size = n, batch_size
        self.batches = math.ceil(n / batch_size)
        self.done = 0
        self.bad_samples = 0

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
        self.bad_samples += int(batch.pop("bad").sum())
        return batch

    def close(self) -> None:
        self._backend.close()


def make_eval_loader(manifest_path, rows: np.ndarray, batch_size: int, image_size: int, kind: str = "dali",
                     num_threads: int = 1, device: str | None = None, py_workers: int = 1,
                     hw_decoder_load: float = 0.65, prefetch_depth: int = 2) -> EvalLoader:
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
    backend = _backend(kind, feed, batch_size, image_size, num_threads, device, py_workers,
                       hw_decoder_load=hw_decoder_load, prefetch_depth=prefetch_depth)
    return EvalLoader(backend, len(rows), batch_size)
