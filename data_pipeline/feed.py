"""SampleFeed: the map from a rank's n-th sample to (bytes, crop window, flip, ids, mask noise).

It is a pure function of its constructor arguments and n, so it can run in DALI's parallel
external-source workers (pickled, spawned) or torch DataLoader workers alike, and both backends
see the same samples with the same augmentation parameters. Torch-free on purpose: spawned
workers stay light.

Train mode: n -> absolute global step s = start_step + n // (B/W), slot j = n % (B/W); the
sample is the sampler's permutation of epoch s // steps_per_epoch at position
(s % steps_per_epoch) * B + rank * B/W + j. A sample whose bytes fail the cheap check is replaced
by the next position of the same epoch permutation (wrapping), independent of W.
Eval mode: n -> rows[n] (clamped at the end: the caller trims), centre window, no flip.

Every sample carries `row` (the manifest row its bytes come from), `bad` (0, or why it failed: READ_ERROR / DECODE_ERROR, plus NO_REPLACEMENT when
nothing decodable was found) and `bad_row` (the manifest row that failed, -1 if none), so the caller can
count, name the paths and stop. A sample with NO_REPLACEMENT (train) or any bad code (eval) carries FILLER
bytes only so the decoder's batch keeps its shape: the trainer stops before such a batch reaches the model,
extraction stores NaN for it. Nothing is ever trained or embedded from FILLER.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from .augment import center_window, train_params
from .manifest_index import ManifestArrays
from .reader import ByteReader
from .sampler import GlobalSampler
from .validate import quick_jpeg_ok

MAX_REPLACEMENTS = 64
READ_ERROR, DECODE_ERROR, NO_REPLACEMENT = 1, 2, 4  # `bad` codes; NO_REPLACEMENT is or-ed onto a reason


def bad_reason(code: int) -> str:
    """What a `bad` code says, in words."""
    reason = "read error" if code & READ_ERROR else "decode error"
    return reason + (", no decodable replacement" if code & NO_REPLACEMENT else "")


def _filler_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (124, 116, 104)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


FILLER = _filler_jpeg()  # decoder input for a marked sample; see the module docstring


class SampleFeed:
    def __init__(self, manifest_path: str, *, mode: str, seed: int = 0, split: str = "train",
                 global_batch: int = 1, rank: int = 0, world_size: int = 1, start_step: int = 0,
                 num_patches: int = 0, rows: np.ndarray | None = None):
        if mode not in ("train", "eval"):
            raise ValueError(f"SampleFeed: mode must be 'train' or 'eval', got {mode!r}")
        self.manifest_path, self.mode, self.seed, self.split = os.path.abspath(manifest_path), mode, int(seed), split
        self.global_batch, self.rank, self.world_size = int(global_batch), int(rank), int(world_size)
        self.per_rank = self.global_batch // self.world_size
        self.start_step, self.num_patches = int(start_step), int(num_patches)
        self.eval_rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._ma: ManifestArrays | None = None
        self._sampler: GlobalSampler | None = None
        self._reader = ByteReader()
        self._step_cache: tuple[int, dict] | None = None
        # Where a (re)built DALI pipeline's sample 0 falls, and the samples a decoder could not decode (n ->
        # how many candidates failed, so the feed gives the next one): see dali_loader.DaliBackend._recover.
        self.offset = 0
        self.failed: dict[int, int] = {}

    def __getstate__(self):
        # Workers reload the manifest themselves: pickling 14M rows per worker would cost more.
        d = dict(self.__dict__)
        d["_ma"] = d["_sampler"] = d["_step_cache"] = None
        return d

    @property
    def manifest(self) -> ManifestArrays:
        if self._ma is None:
            self._ma = ManifestArrays(self.manifest_path, self.split if self.mode == "train" else None)
            if self.mode == "train":
                self._sampler = GlobalSampler(len(self._ma.rows), self.seed, self.global_batch)
        return self._ma

    @property
    def sampler(self) -> GlobalSampler:
        _ = self.manifest
        return self._sampler

    # -- train ---------------------------------------------------------------------------
    def _step_params(self, step: int) -> dict:
        """Rows and augmentation of this rank's whole slice of absolute step `step` (cached)."""
        if self._step_cache is not None and self._step_cache[0] == step:
            return self._step_cache[1]
        ma, sampler = self.manifest, self.sampler
        epoch, g = sampler.locate(step)
        rows = ma.rows[sampler.rank_slice(epoch, g, self.rank, self.world_size)]
        p = train_params(self.seed, epoch, ma.sample_id[rows], ma.width[rows], ma.height[rows], self.num_patches)
        p.update(rows=rows, epoch=epoch, position=g * self.global_batch + self.rank * self.per_rank)
        self._step_cache = (step, p)
        return p

    def _read_checked(self, row: int) -> tuple[bytes | None, int]:
        """(bytes, 0), or (None, READ_ERROR) when they cannot be read whole, (None, DECODE_ERROR) when they
        fail the cheap JPEG check."""
        path, offset, size = self.manifest.location(row)
        try:
            data = self._reader.read(path, offset, size)
        except OSError:
            return None, READ_ERROR
        if len(data) != size:  # truncated or replaced since ingest: what the manifest recorded is gone
            return None, READ_ERROR
        return (data, 0) if quick_jpeg_ok(data, size) else (None, DECODE_ERROR)

    def train_sample(self, n: int, failed: int = 0) -> dict:
        """The rank's n-th sample; `failed` > 0: its bytes did not decode, and neither did the first
        failed - 1 replacements: give the next replacement."""
        step, j = self.start_step + n // self.per_rank, n % self.per_rank
        p = self._step_params(step)
        ma, row = self.manifest, int(p["rows"][j])
        data, code = (None, DECODE_ERROR) if failed else self._read_checked(row)
        if data is not None:
            return {"data": data, "anchor": p["anchor"][j], "shape": p["shape"][j], "flip": p["flip"][j],
                    "sample_id": ma.sample_id[row], "label": ma.label[row], "noise": p["mask_noise"][j], "bad": 0,
                    "bad_row": -1, "row": row}
        return self._replacement(p["epoch"], p["position"] + j, code, row, skip=max(0, int(failed) - 1))

    def _replacement(self, epoch: int, position: int, code: int, bad_row: int, skip: int = 0) -> dict:
        """The next decodable sample after `position` in this epoch's permutation (W-independent), passing over
        `skip` that a decoder refused; FILLER marked NO_REPLACEMENT when none of the next MAX_REPLACEMENTS is."""
        ma, perm = self.manifest, self.sampler.permutation(epoch)
        for k in range(1, MAX_REPLACEMENTS + 1):
            row = int(ma.rows[perm[(position + k) % len(perm)]])
            data, _ = self._read_checked(row)
            if data is not None and skip == 0:
                break
            skip -= data is not None
        else:
            data, code = FILLER, code | NO_REPLACEMENT
        sid = ma.sample_id[row]
        p = train_params(self.seed, epoch, np.array([sid]), ma.width[[row]], ma.height[[row]], self.num_patches)
        if data is FILLER:  # the whole 16 px frame: a window sized for the real image could round to 0 px
            p["anchor"][:], p["shape"][:] = 0.0, 1.0
        return {"data": data, "anchor": p["anchor"][0], "shape": p["shape"][0], "flip": p["flip"][0],
                "sample_id": sid, "label": ma.label[row], "noise": p["mask_noise"][0], "bad": code,
                "bad_row": bad_row, "row": row}

    # -- eval ----------------------------------------------------------------------------
    def eval_sample(self, n: int, failed: int = 0) -> dict:
        ma, row = self.manifest, self.row(n)
        anchor, shape = center_window(ma.width[[row]], ma.height[[row]])
        data, bad = (None, DECODE_ERROR) if failed else self._read_checked(row)
        if bad:  # keep the row's id and label so results stay aligned; the caller marks the row invalid
            data, anchor[:], shape[:] = FILLER, 0.0, 1.0
        return {"data": data, "anchor": anchor[0], "shape": shape[0], "flip": np.int32(0),
                "sample_id": ma.sample_id[row], "label": ma.label[row], "noise": None, "bad": bad,
                "bad_row": row if bad else -1, "row": row}

    def row(self, n: int) -> int:
        """The manifest row sample n reads (before any replacement)."""
        if self.mode == "eval":
            return int(self.eval_rows[min(n, len(self.eval_rows) - 1)])
        step, j = self.start_step + n // self.per_rank, n % self.per_rank
        return int(self._step_params(step)["rows"][j])

    def sample(self, n: int, failed: int = 0) -> dict:
        """Sample n; with failed > 0 the deterministic replacement a decoder falls back to."""
        return self.train_sample(n, failed) if self.mode == "train" else self.eval_sample(n, failed)

    def __call__(self, sample_info) -> tuple:
        """DALI external_source (sample mode) entry point."""
        n = self.offset + int(sample_info.idx_in_epoch)
        s = self.sample(n, self.failed.get(n, 0))
        out = (np.frombuffer(s["data"], dtype=np.uint8), np.asarray(s["anchor"], np.float32),
               np.asarray(s["shape"], np.float32), np.array([s["flip"]], np.int32),
               np.array([s["sample_id"]], np.int64), np.array([s["label"]], np.int64), np.array([s["bad"]], np.int32),
               np.array([s["bad_row"]], np.int64))
        if self.mode == "train":
            out += (np.asarray(s["noise"], np.float32),)
        return out
