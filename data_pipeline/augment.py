"""Per-sample randomness from (seed, epoch, sample_id) alone, vectorised over a batch.

A counter-based hash (splitmix64 finalizer) gives independent uniform streams per sample, so a
sample's crop window, flip and MAE mask noise do not depend on which rank or world size loads it,
and cost microseconds for a whole batch (no per-sample Generator construction).

Crop windows are returned normalised to the image: anchor (x, y) and shape (w, h) in [0, 1], the
"WH" order DALI's decoders.image_slice uses. The random-resized-crop follows torchvision's
algorithm (10 attempts, then a centre fallback) in pixel units from the manifest's width/height,
so the window is the same one torchvision would pick for those draws.
"""
from __future__ import annotations

import math

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1

# Stream numbers: independent uniforms per sample.
_S_SCALE, _S_RATIO, _S_I, _S_J, _S_FLIP, _S_NOISE = 0, 16, 32, 33, 34, 1024
ATTEMPTS = 10


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def sample_keys(seed: int, epoch: int, sample_ids: np.ndarray) -> np.ndarray:
    """One 64-bit key per sample from (seed, epoch, sample_id)."""
    ids = np.atleast_1d(np.asarray(sample_ids)).astype(np.uint64)
    with np.errstate(over="ignore"):
        k = _mix(np.full(1, int(seed) & _MASK64, dtype=np.uint64) + _GOLDEN)
        k = _mix(k ^ np.uint64(int(epoch) & _MASK64))
        return _mix((k + _GOLDEN) ^ (ids * _GOLDEN))


def uniforms(keys: np.ndarray, first_stream: int, count: int) -> np.ndarray:
    """float64 uniforms in [0, 1), shape (n, count), streams first_stream.. for each key."""
    streams = np.arange(first_stream, first_stream + count, dtype=np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        h = _mix(keys[:, None] ^ (streams[None, :] * _M2))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def mask_noise(keys: np.ndarray, num_patches: int) -> np.ndarray:
    """MAE mask noise, float32 (n, num_patches) in [0, 1) (24-bit values, exact in float32)."""
    streams = np.arange(_S_NOISE, _S_NOISE + num_patches, dtype=np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        h = _mix(keys[:, None] ^ (streams[None, :] * _M2))
    return ((h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 2**24)).astype(np.float32)


def _sizes(widths: np.ndarray, heights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Unknown sizes (<= 0) are treated as square so the window is still valid.
    w = np.asarray(widths, dtype=np.float64)
    h = np.asarray(heights, dtype=np.float64)
    bad = (w <= 0) | (h <= 0)
    return np.where(bad, 1000.0, w), np.where(bad, 1000.0, h)


def random_resized_crop(keys: np.ndarray, widths: np.ndarray, heights: np.ndarray,
                        scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[np.ndarray, np.ndarray]:
    """torchvision RandomResizedCrop windows -> (anchor (n,2) xy, shape (n,2) wh), float32 normalised."""
    W, H = _sizes(widths, heights)
    n = len(keys)
    area = (W * H)[:, None]
    u_s = uniforms(keys, _S_SCALE, ATTEMPTS)
    u_r = uniforms(keys, _S_RATIO, ATTEMPTS)
    target = area * (scale[0] + (scale[1] - scale[0]) * u_s)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * u_r)
    cw = np.round(np.sqrt(target * aspect))
    ch = np.round(np.sqrt(target / aspect))
    ok = (cw > 0) & (cw <= W[:, None]) & (ch > 0) & (ch <= H[:, None])
    first = np.argmax(ok, axis=1)
    any_ok = ok[np.arange(n), first]
    cw = cw[np.arange(n), first]
    ch = ch[np.arange(n), first]
    # Centre fallback with the aspect clamped into `ratio` (torchvision's rule).
    in_ratio = W / H
    fw = np.where(in_ratio < ratio[0], W, np.where(in_ratio > ratio[1], np.round(H * ratio[1]), W))
    fh = np.where(in_ratio < ratio[0], np.round(W / ratio[0]), H)
    cw = np.where(any_ok, cw, fw)
    ch = np.where(any_ok, ch, fh)
    u_pos = uniforms(keys, _S_I, 2)
    i = np.where(any_ok, np.floor(u_pos[:, 0] * (H - ch + 1)), np.floor((H - ch) / 2))
    j = np.where(any_ok, np.floor(u_pos[:, 1] * (W - cw + 1)), np.floor((W - cw) / 2))
    anchor = np.stack([j / W, i / H], axis=1).astype(np.float32)
    shape = np.stack([cw / W, ch / H], axis=1).astype(np.float32)
    return anchor, _clamp(anchor, shape)


def _clamp(anchor: np.ndarray, shape: np.ndarray) -> np.ndarray:
    # float32 rounding must never push anchor + shape past 1 (DALI refuses out-of-bounds slices).
    return np.minimum(shape, np.float32(1.0) - anchor).astype(np.float32)


def flips(keys: np.ndarray) -> np.ndarray:
    """Horizontal flip flags, int32 0/1 (p = 0.5)."""
    return (uniforms(keys, _S_FLIP, 1)[:, 0] < 0.5).astype(np.int32)


def center_window(widths: np.ndarray, heights: np.ndarray,
                  crop_fraction: float = 224 / 256) -> tuple[np.ndarray, np.ndarray]:
    """Eval view as a window: resize short side to S/crop_fraction, centre-crop S x S.

    In source pixels that is a centred square of side crop_fraction * short_side.
    """
    W, H = _sizes(widths, heights)
    side = crop_fraction * np.minimum(W, H)
    shape = np.stack([side / W, side / H], axis=1)
    anchor = ((1.0 - shape) / 2.0).astype(np.float32)
    return anchor, _clamp(anchor, shape.astype(np.float32))


def train_params(seed: int, epoch: int, sample_ids: np.ndarray, widths: np.ndarray, heights: np.ndarray,
                 num_patches: int) -> dict[str, np.ndarray]:
    """All per-sample train randomness for a batch: anchor, shape, flip, mask_noise."""
    keys = sample_keys(seed, epoch, sample_ids)
    anchor, shape = random_resized_crop(keys, widths, heights)
    return {"anchor": anchor, "shape": shape, "flip": flips(keys), "mask_noise": mask_noise(keys, num_patches)}
