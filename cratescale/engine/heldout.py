"""What the evaluations inside a training run share: this rank's strided share of the val split, read in order
by the eval loader with the model in eval mode, sums over ranks, and seeds drawn from integers.

Pretraining's held-out reconstruction loss (`logging.heldout_every_steps`) masks each image with noise drawn from
(seed, manifest row): every step and every model trained on the same data (the compare job's members) is scored
on the same masks. Nothing here touches a random stream of training: a run with the evaluation on ends with the
same weights as one without (tests/dist/test_heldout.py).
"""
from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from cratescale.engine.state import collective_device
from data_pipeline.loader import make_eval_loader
from data_pipeline.manifest_index import ManifestArrays


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence: distinct tuples give unrelated streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def rank_val_rows(manifest, rank: int, world_size: int) -> np.ndarray:
    """The manifest rows of the val split this rank evaluates: every world_size-th, from its rank. Read once per
    process and world, not at every evaluation."""
    return _rank_val_rows(str(manifest), rank, world_size)


@functools.lru_cache(maxsize=4)
def _rank_val_rows(manifest: str, rank: int, world_size: int) -> np.ndarray:
    rows = np.asarray(ManifestArrays(manifest, "val").rows, dtype=np.int64)[rank::world_size]
    rows.flags.writeable = False  # shared by every call
    return rows


def val_batches(model: torch.nn.Module, manifest, rows: np.ndarray, batch_size: int, image_size: int, decoder,
                num_threads: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """(images, labels, manifest rows) of the rows that decoded, in order, with `model` in eval mode until the
    iteration ends (then back in the mode it was in)."""
    if len(rows) == 0:
        return
    loader = make_eval_loader(manifest, rows, batch_size, image_size, kind=decoder.kind, device=decoder.device,
                              num_threads=num_threads)
    was_training = model.training
    model.eval()
    try:
        start = 0
        for batch in loader:
            valid = torch.as_tensor(batch["valid"]).bool()
            batch_rows = rows[start:start + len(valid)][valid.numpy()]
            start += len(valid)
            yield batch["images"][valid], torch.as_tensor(batch["labels"])[valid].long(), batch_rows
    finally:
        model.train(was_training)
        loader.close()


def summed_over_ranks(values: list[float]) -> list[float]:
    """Each value summed over the ranks (float64; as given when there is no process group)."""
    total = torch.tensor(values, dtype=torch.float64, device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.tolist()


def heldout_noise(rows: np.ndarray, seed: int, num_patches: int) -> torch.Tensor:
    """(len(rows), num_patches) masking noise, each row's from its own generator seeded by (seed, row)."""
    return torch.stack([torch.rand(num_patches, generator=torch.Generator().manual_seed(seed_of(seed, row)))
                        for row in rows.tolist()])
