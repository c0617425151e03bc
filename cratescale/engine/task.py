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
from cratescale.engine.heldout import heldout_noise, rank_val_rows, summed_over_ranks, val_batches
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
        every = self.job.logging.heldout_every_steps
        return every is not None and (step % every == 0 or step == total)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, step: int, decoder: Any, world_size: int, rank: int) -> dict:
        """The held-out reconstruction loss: the MAE loss over the masked patches of the val split's images, each
        masked by noise from (seed, row) (engine/heldout.py), each rank a strided share, averaged over images."""
        loss_sum = images_seen = 0.0
        device = next(model.parameters()).device
        for images, _, rows in val_batches(model, self.manifest, rank_val_rows(self.manifest, rank, world_size),
                                           self.job.schedule.micro_batch, self.job.data.image_size, decoder,
                                           self.job.data.num_threads):
            noise = heldout_noise(rows, self.job.seed, model.num_patches)
            loss, _, _ = model(images.to(device), noise.to(device))
            loss_sum += float(loss) * len(rows)  # every image has as many masked patches: its mean weighs equally
            images_seen += len(rows)
        loss_sum, images_seen = summed_over_ranks([loss_sum, images_seen])
        return {"kind": "heldout", "step": step, "recon_loss": loss_sum / images_seen if images_seen else float("nan"),
                "n": int(images_seen)}
