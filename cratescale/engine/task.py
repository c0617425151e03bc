"""What a training run trains: the trainer's loop, commits and resume are the same for every task, and the task
says which model, which optimizer groups, which loss and which identity. Pretraining (`PretrainTask`, the MAE
loss over the job's model) is one; fine-tuning (engine/finetune_task.py) is the other.

A task's batch sizes, length, warm-up and peak learning rate are its job's `schedule` and `optim` sections: a
fine-tune run's job is the pretraining job with those sections taken from `finetune.*` (launch/finetune_stage.py),
so DeepSpeed's config, the loader, the commit metadata and the status read them as they do for pretraining.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from cratescale.config import JobConfig, job_identity
from cratescale.engine import optim
from cratescale.engine.model_build import build_model
from data_pipeline.manifest import manifest_fingerprint


class TrainingTask(Protocol):
    floor_lr: float  # the cosine schedule's end

    def identity(self) -> dict[str, Any]:
        """What a commit records and a resume compares (config/identity.py's shape: version, fields, manifest)."""

    def build_model(self, fresh: bool, rank: int) -> torch.nn.Module:
        """The model before DeepSpeed wraps it; `fresh`: no commit will be loaded into it."""

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        """AdamW's groups; a group's optional lr_scale multiplies the step's learning rate."""

    def loss(self, engine: Any, batch: dict, images: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """The loss of one micro-batch (`images` already on the engine's device)."""

    def start_record(self, model: torch.nn.Module, fresh: bool) -> dict[str, Any] | None:
        """A metrics row about the starting point, written once by rank 0 (None: no row)."""

    def eval_due(self, step: int, total: int) -> bool:
        """Whether to evaluate after `step`."""

    def evaluate(self, model: torch.nn.Module, step: int, decoder: Any, world_size: int, rank: int) -> dict:
        """A metrics row (every rank calls it: collectives allowed)."""


class PretrainTask:
    """The job's masked autoencoder and its own loss (the model returns (loss, prediction, mask))."""

    floor_lr = 0.0

    def __init__(self, job: JobConfig, manifest: Path) -> None:
        self.job, self.manifest = job, Path(manifest)

    def identity(self) -> dict[str, Any]:
        return job_identity(self.job, manifest_fingerprint(self.manifest))

    def build_model(self, fresh: bool, rank: int) -> torch.nn.Module:
        model = build_model(self.job)
        if fresh and self.job.checkpoint.start_fresh_from_weights:
            from cratescale.checkpoint.export import load_export

            state_dict, _, _ = load_export(Path(self.job.checkpoint.start_fresh_from_weights))
            model.load_state_dict(state_dict)
        return model

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        return optim.param_groups(model, self.job.optim.weight_decay)

    def loss(self, engine: Any, batch: dict, images: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        loss, _, _ = engine(images, batch["mask_noise"].to(engine.device, non_blocking=True))
        return loss

    def start_record(self, model: torch.nn.Module, fresh: bool) -> dict[str, Any] | None:
        return None

    def eval_due(self, step: int, total: int) -> bool:
        return False

    def evaluate(self, model: torch.nn.Module, step: int, decoder: Any, world_size: int, rank: int) -> dict:
        raise NotImplementedError("pretraining has no evaluation in the loop")
