"""cratescale's data pipeline: ingest -> Parquet manifest, global sampler, DALI/PIL loaders.

Modules: ingest (CLI + Ray fan-out), sources/work/tario/validate/synthetic (ingest internals),
manifest (schema, read/write), manifest_index (the shared mapped index every rank and worker
reads the manifest through), sampler (GlobalSampler, LoaderState), augment (per-sample
randomness), feed (sampler order -> bytes + augmentation), loader (make_train_loader,
make_eval_loader), dali_loader / pil_loader (backends), reader (file / tar+offset bytes).
Imports nothing from cratescale and never calls torch.distributed: it is told rank and world size.
Kept import-light on purpose (no torch, DALI or Ray here): import the module you need.
"""
from .sampler import GlobalSampler, LoaderState

__all__ = ["GlobalSampler", "LoaderState"]
