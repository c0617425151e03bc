"""DALI backend: parallel external source (our SampleFeed) -> image_slice decode -> resize -> normalize.

The feed runs in `py_workers` spawned processes and returns encoded bytes plus the per-sample
window and flip; DALI decodes only the window (ROI decode) on the CPU ("cpu") or with nvJPEG
("gpu" -> "mixed" decoder), resizes to image_size and normalises to CHW float32.
"""
from __future__ import annotations

import numpy as np
import torch

from .feed import SampleFeed

_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def build_pipeline(feed: SampleFeed, batch_size: int, image_size: int, num_threads: int, device: str,
                   py_workers: int, device_id: int | None = None, hw_decoder_load: float = 0.65,
                   prefetch_depth: int = 2):
    """prefetch_depth: batches DALI prepares ahead (more hides decode jitter, costs one batch of memory each).
    hw_decoder_load: with the mixed decoder, the share of images sent to the GPU's hardware JPEG engines
    (A100/H100 NVJPG, outside the SMs); the rest take the CUDA path (Huffman on the CPU threads)."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    if device == "gpu" and device_id is None:
        device_id = torch.cuda.current_device()
    # CPU: fork, like torch's DataLoader (no re-import of __main__, so scripts without a main guard,
    # notebooks and stdin work; the loaded manifest is inherited). GPU: spawn, as a CUDA context
    # cannot cross a fork; the feed then reloads the manifest in each worker.
    pipe = Pipeline(batch_size=batch_size, num_threads=max(1, num_threads),
                    device_id=device_id if device == "gpu" else None, py_num_workers=max(1, py_workers),
                    py_start_method="spawn" if device == "gpu" else "fork", prefetch_queue_depth=prefetch_depth)
    train = feed.mode == "train"
    dtypes = [types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.INT64, types.INT64, types.INT32, types.INT64]
    if train:
        dtypes.append(types.FLOAT)
    with pipe:
        outs = fn.external_source(source=feed, batch=False, parallel=True, num_outputs=len(dtypes), dtype=dtypes,
                                  prefetch_queue_depth=2)
        data, anchor, shape, flip, sid, label, bad, bad_row = outs[:8]
        mixed = {"device": "mixed", "hw_decoder_load": hw_decoder_load} if device == "gpu" else {"device": "cpu"}
        images = fn.decoders.image_slice(data, anchor, shape, output_type=types.RGB, normalized_anchor=True,
                                         normalized_shape=True, adjust_orientation=False, **mixed)
        images = fn.resize(images, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR,
                           antialias=True)
        images = fn.crop_mirror_normalize(images, mirror=fn.reshape(flip, shape=[]), mean=_MEAN, std=_STD,
                                          dtype=types.FLOAT, output_layout="CHW")
        pipe.set_outputs(images, sid, label, bad, bad_row, *(outs[8:] if train else []))
    pipe.build()
    return pipe


def _to_torch(tl) -> torch.Tensor:
    """A dense DALI TensorList (CPU or GPU) as a torch tensor."""
    if hasattr(tl, "as_cpu") and type(tl).__name__ == "TensorListGPU":
        from nvidia.dali.plugin.pytorch import feed_ndarray
        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.float32, device=torch.device("cuda", torch.cuda.current_device()))
        feed_ndarray(t, out)
        return out
    return torch.from_numpy(np.array(tl.as_tensor()))


class DaliBackend:
    def __init__(self, feed: SampleFeed, batch_size: int, image_size: int, num_threads: int = 1,
                 device: str = "cpu", py_workers: int = 1, **pipeline_options):
        self.train = feed.mode == "train"
        self.pipe = build_pipeline(feed, batch_size, image_size, num_threads, device, py_workers, **pipeline_options)

    def __iter__(self):
        while True:
            outs = self.pipe.run()
            batch = {"images": _to_torch(outs[0]),
                     "labels": _to_torch(outs[2]).reshape(-1),
                     "sample_ids": _to_torch(outs[1]).reshape(-1)}
            if self.train:
                batch["mask_noise"] = _to_torch(outs[5])
            batch["bad"] = _to_torch(outs[3]).reshape(-1)
            batch["bad_row"] = _to_torch(outs[4]).reshape(-1)
            yield batch

    def close(self) -> None:
        """Stop the pipeline and its Python workers now rather than at garbage collection."""
        pipe, self.pipe = getattr(self, "pipe", None), None
        if pipe is None:
            return
        pool = getattr(pipe, "_py_pool", None)
        if hasattr(pipe, "_shutdown"):
            pipe._shutdown()
        if pool is not None:
            pool.close()
