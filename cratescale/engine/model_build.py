"""The model a job trains, built one way for training, planning, export and extraction (none of which needs
the training loop to get it)."""
from __future__ import annotations

from pathlib import Path

import torch

from cratescale.config import JobConfig
from cratescale.distributed.wrap import (apply_activation_checkpointing, apply_mssa_kernel, compile_model,
                                        select_attention_backend)
from cratescale.models import create_model
from data_pipeline.manifest_index import count_split


def count_train_samples(manifest: Path) -> int:
    return count_split(manifest, "train")


def build_model(job: JobConfig) -> torch.nn.Module:
    torch.manual_seed(job.seed)  # identical init on every rank
    overrides = dict(job.model.overrides)
    overrides.setdefault("img_size", job.data.image_size)
    return create_model(job.model.name, **overrides)


def wrap_for_training(model: torch.nn.Module, job: JobConfig) -> torch.nn.Module:
    """What only training wants (export, planning and extraction take the plain model)."""
    select_attention_backend(job.parallel.attention)
    if job.parallel.attention == "mssa_triton":
        apply_mssa_kernel(model)
    if job.parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if job.parallel.compile:
        compile_model(model, None if job.parallel.compile_mode == "default" else job.parallel.compile_mode)
    return model
