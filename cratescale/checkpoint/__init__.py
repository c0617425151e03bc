"""Checkpoints: two-phase commit store, Parquet catalog, retention, universal conversion, zarr export.

Imports torch/deepspeed/zarr/pyarrow only (nothing from cratescale but itself). `export` and `universal`
are imported lazily by name so `from cratescale.checkpoint import CheckpointStore` stays light.
"""
from cratescale.checkpoint.commit import (CheckpointCorruptError, CheckpointError, CheckpointStore,
                                          CheckpointWriteError, Commit, StaleIncarnationError)
from cratescale.checkpoint.retention import steps_to_keep

DS_TAG = "ds"  # DeepSpeed tag every rank saves under (step_N/ds/); same value as universal.DS_TAG

__all__ = ["CheckpointCorruptError", "CheckpointError", "CheckpointStore", "CheckpointWriteError", "Commit",
           "DS_TAG", "StaleIncarnationError", "steps_to_keep"]
