"""PIL + torch DataLoader backend: the fallback and the baseline, same samples and windows as DALI.

Each DataLoader item is one whole micro-batch (index k = the rank's k-th micro-batch), so worker
processes build batches in parallel and the DataLoader returns them in order.
"""
from __future__ import annotations

import io
import itertools

import numpy as np
import torch
from PIL import Image

from .feed import MAX_REPLACEMENTS, SampleFeed

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def decode_window(data: bytes, anchor: np.ndarray, shape: np.ndarray, flip: int, size: int) -> np.ndarray:
    """Decode, crop the normalised window, resize to size x size (bilinear, antialiased), flip: HWC uint8 RGB."""
    img = Image.open(io.BytesIO(data))
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")  # CMYK, palette, ...: convert before resampling
    w, h = img.size
    x0, y0 = float(anchor[0]) * w, float(anchor[1]) * h
    box = (x0, y0, x0 + float(shape[0]) * w, y0 + float(shape[1]) * h)
    img = img.resize((size, size), Image.BILINEAR, box=box)
    if img.mode != "RGB":
        img = img.convert("RGB")  # greyscale -> 3 channels
    arr = np.asarray(img)
    return np.ascontiguousarray(arr[:, ::-1]) if flip else arr


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """(b, H, W, 3) uint8 -> (b, 3, H, W) float32, ImageNet mean/std."""
    x = images_u8.permute(0, 3, 1, 2).float().div_(255.0)
    return x.sub_(_MEAN).div_(_STD).contiguous()


class _MicroBatches(torch.utils.data.Dataset):
    def __init__(self, feed: SampleFeed, batch_size: int, image_size: int):
        self.feed, self.batch_size, self.image_size = feed, batch_size, image_size

    def __len__(self) -> int:  # unbounded; iteration is driven by the sampler below
        return 2**62

    def _decoded(self, n: int) -> tuple[dict, np.ndarray]:
        # Corrupt entropy data passes the cheap byte check but stops PIL: the feed's deterministic replacement
        # follows (counted as bad), and when that does not decode either, the next one, as DALI's recovery does.
        # The chain ends: past MAX_REPLACEMENTS candidates the feed gives FILLER (it decodes) marked
        # NO_REPLACEMENT, and the trainer stops before such a batch trains.
        for failed in range(MAX_REPLACEMENTS + 2):
            s = self.feed.sample(n, failed)
            try:
                return s, decode_window(s["data"], s["anchor"], s["shape"], int(s["flip"]), self.image_size)
            except Exception:  # noqa: BLE001 - any decoder error: this candidate is undecodable
                continue
        raise AssertionError(f"sample {n}: the feed's FILLER did not decode")  # unreachable: FILLER decodes

    def __getitem__(self, k: int) -> dict:
        pairs = [self._decoded(k * self.batch_size + i) for i in range(self.batch_size)]
        samples = [s for s, _ in pairs]
        images = np.stack([img for _, img in pairs])
        out = {"images": normalize(torch.from_numpy(images)),
               "labels": torch.tensor([int(s["label"]) for s in samples], dtype=torch.int64),
               "sample_ids": torch.tensor([int(s["sample_id"]) for s in samples], dtype=torch.int64),
               "bad": torch.tensor([int(s["bad"]) for s in samples], dtype=torch.int32),
               "bad_row": torch.tensor([int(s["bad_row"]) for s in samples], dtype=torch.int64)}
        if self.feed.mode == "train":
            out["mask_noise"] = torch.from_numpy(np.stack([s["noise"] for s in samples]).astype(np.float32))
        return out


class PilBackend:
    def __init__(self, feed: SampleFeed, batch_size: int, image_size: int, num_threads: int = 1,
                 prefetch_depth: int = 2):
        workers = num_threads if num_threads > 1 else 0
        # pinned batches make the trainer's .to(device, non_blocking=True) an asynchronous copy
        self._loader = torch.utils.data.DataLoader(
            _MicroBatches(feed, batch_size, image_size), batch_size=None, sampler=itertools.count(),
            num_workers=workers, prefetch_factor=prefetch_depth if workers else None, persistent_workers=False,
            pin_memory=torch.cuda.is_available())
        self._iter = None

    def __iter__(self):
        self._iter = iter(self._loader)
        return self._iter

    def close(self) -> None:
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
