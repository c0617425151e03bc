"""AdamW parameter groups and the warmup + cosine learning-rate schedule (a pure function of the step)."""
from __future__ import annotations

import math

import torch
from torch import nn

from cratescale.config import JobConfig

# Tokens and tables that are not weights of a linear map: no decay, as in MAE/timm.
_NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.split(".")[-1] in _NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, job: JobConfig, groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """AdamW over `groups` (the training task's; default: pretraining's decay / no-decay split)."""
    groups = param_groups(model, job.optim.weight_decay) if groups is None else groups
    return torch.optim.AdamW(groups, lr=peak_lr(job), betas=tuple(job.optim.betas))


def peak_lr(job: JobConfig) -> float:
    return job.optim.base_lr * job.schedule.global_batch / 256


def total_steps(job: JobConfig, steps_per_epoch: int) -> int:
    if job.schedule.steps is not None:
        return job.schedule.steps
    return max(1, int(round(job.schedule.epochs * steps_per_epoch)))


def warmup_steps(job: JobConfig, steps_per_epoch: int) -> int:
    if job.schedule.warmup_steps is not None:
        return job.schedule.warmup_steps
    return int(round(job.schedule.warmup_epochs * steps_per_epoch))


def lr_at(step: int, peak: float, warmup: int, total: int, floor: float = 0.0) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then half-cosine down to `floor`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
