"""Global sampler and loader state: the data order is a pure function of (seed, epoch).

Global batch g of an epoch is permutation positions [g*B, (g+1)*B); rank r of W takes the
contiguous slice [g*B + r*B/W, g*B + (r+1)*B/W). The epoch's last partial batch is dropped.
Because nothing here depends on W except which slice a rank reads, a state saved on W ranks
continues on W' ranks with exactly the same global sequence.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


class SamplerError(ValueError):
    """A sampler or loader-state argument is inconsistent."""


@dataclass(frozen=True)
class LoaderState:
    """The loader's whole state. samples_seen_in_epoch counts global samples (all ranks)."""

    epoch: int = 0
    samples_seen_in_epoch: int = 0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        missing = {"epoch", "samples_seen_in_epoch", "seed"} - set(d)
        if missing:
            raise SamplerError(f"LoaderState.from_dict: missing keys {sorted(missing)} in {d!r}")
        return cls(int(d["epoch"]), int(d["samples_seen_in_epoch"]), int(d["seed"]))

    @classmethod
    def from_step(cls, step: int, steps_per_epoch: int, global_batch: int, seed: int) -> "LoaderState":
        """State after `step` fully consumed global batches since the start of training."""
        if step < 0 or steps_per_epoch <= 0 or global_batch <= 0:
            raise SamplerError(f"LoaderState.from_step: bad step={step} steps_per_epoch={steps_per_epoch} "
                               f"global_batch={global_batch}")
        return cls(step // steps_per_epoch, (step % steps_per_epoch) * global_batch, seed)

    def global_step(self, steps_per_epoch: int, global_batch: int) -> int:
        """Absolute number of global batches consumed (inverse of from_step)."""
        if self.samples_seen_in_epoch % global_batch:
            raise SamplerError(f"LoaderState: samples_seen_in_epoch={self.samples_seen_in_epoch} is not a "
                               f"multiple of global_batch={global_batch}; cannot resume mid-batch")
        step_in_epoch = self.samples_seen_in_epoch // global_batch
        if step_in_epoch > steps_per_epoch:
            raise SamplerError(f"LoaderState: step {step_in_epoch} in epoch is past steps_per_epoch={steps_per_epoch}")
        return self.epoch * steps_per_epoch + step_in_epoch


class GlobalSampler:
    """Permutation of N sample positions per epoch, sliced into global batches and rank slices.

    `num_samples_or_ids` is either N (positions 0..N-1 are returned) or an array of sample ids
    (the permutation is applied to it). The permutation is np.random.Generator(PCG64([seed, epoch]))
    shuffling arange(N) (int32 when N < 2**31: half the memory, same order).
    """

    def __init__(self, num_samples_or_ids: int | np.ndarray, seed: int, global_batch: int):
        if isinstance(num_samples_or_ids, (int, np.integer)):
            self.sample_ids = None
            self.num_samples = int(num_samples_or_ids)
        else:
            self.sample_ids = np.asarray(num_samples_or_ids, dtype=np.int64)
            self.num_samples = len(self.sample_ids)
        if global_batch <= 0:
            raise SamplerError(f"GlobalSampler: global_batch must be positive, got {global_batch}")
        if self.num_samples < global_batch:
            raise SamplerError(f"GlobalSampler: {self.num_samples} samples is fewer than one global batch "
                               f"of {global_batch}")
        self.seed = int(seed)
        self.global_batch = int(global_batch)
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        """Positions (or sample ids) in epoch order; cached for the last epoch asked."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        dtype = np.int32 if self.num_samples < 2**31 else np.int64
        order = np.arange(self.num_samples, dtype=dtype)
        np.random.Generator(np.random.PCG64([self.seed & (2**63 - 1), int(epoch)])).shuffle(order)
        if self.sample_ids is not None:
            order = self.sample_ids[order]
        self._cached = (epoch, order)
        return order

    def _check_rank(self, rank: int, world_size: int) -> int:
        if world_size <= 0 or not 0 <= rank < world_size:
            raise SamplerError(f"GlobalSampler: bad rank={rank} for world_size={world_size}")
        if self.global_batch % world_size:
            raise SamplerError(f"GlobalSampler: global_batch={self.global_batch} is not divisible by "
                               f"world_size={world_size}")
        return self.global_batch // world_size

    def global_batch_at(self, epoch: int, step: int) -> np.ndarray:
        """All B entries of global batch `step` of `epoch`."""
        if not 0 <= step < self.steps_per_epoch:
            raise SamplerError(f"GlobalSampler: step {step} outside [0, {self.steps_per_epoch})")
        b = self.global_batch
        return self.permutation(epoch)[step * b:(step + 1) * b]

    def rank_slice(self, epoch: int, step: int, rank: int, world_size: int) -> np.ndarray:
        """Rank `rank`'s contiguous B/W entries of global batch `step` (a view)."""
        per_rank = self._check_rank(rank, world_size)
        start = step * self.global_batch + rank * per_rank
        if not 0 <= step < self.steps_per_epoch:
            raise SamplerError(f"GlobalSampler: step {step} outside [0, {self.steps_per_epoch})")
        return self.permutation(epoch)[start:start + per_rank]

    def epoch_rank_slices(self, epoch: int, world_size: int) -> np.ndarray:
        """View of shape (steps_per_epoch, W, B/W): [g, r] is rank r's slice of global batch g."""
        per_rank = self._check_rank(0, world_size)
        used = self.steps_per_epoch * self.global_batch
        return self.permutation(epoch)[:used].reshape(self.steps_per_epoch, world_size, per_rank)

    def locate(self, absolute_step: int) -> tuple[int, int]:
        """(epoch, step_in_epoch) of an absolute global step counted from epoch 0."""
        return divmod(int(absolute_step), self.steps_per_epoch)
