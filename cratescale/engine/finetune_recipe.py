"""MAE's fine-tuning recipe as torch-only pieces: layer-wise learning-rate decay parameter groups, the label-
smoothing cross entropy, and mixup / cutmix on a batch.

After FAIR's mae (util/lr_decay.py `param_groups_lrd`, main_finetune.py) and timm (data/mixup.py `Mixup` in batch
mode, loss/cross_entropy.py). Parameter names are the classifier's (models/classifier.py), which are timm's ViT
names: `patch_embed.*`, `cls_token`, `pos_embed`, `blocks.<i>.*`, then `fc_norm.*` and `head.*`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cratescale.config.schema import FinetuneConfig

# Tokens and tables: no weight decay (MAE's no_weight_decay_list; 1-D parameters, norms and biases, get none too).
NO_DECAY = ("cls_token", "pos_embed")
CUTMIX_SWITCH_PROB = 0.5  # timm's default: with both on, each batch takes cutmix or mixup with equal odds


def peak_lr(cfg: FinetuneConfig) -> float:
    """MAE's linear scaling rule: blr * global batch / 256."""
    return cfg.base_lr * cfg.global_batch / 256


def layer_id(name: str, num_layers: int) -> int:
    """MAE's get_layer_id_for_vit: 0 for the patch embedding, cls token and positions, i+1 for block i, and
    num_layers (= blocks + 1) for everything after the blocks (fc_norm, head)."""
    if name in NO_DECAY or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise learning-rate decay: the group of layer id k has
    lr_scale = layer_decay ** (num_layers - k), so the head learns at the full rate and each block below it at
    `layer_decay` times the one above. Frozen parameters (the fixed sin-cos positions) are left out. The
    learning rate of a step is lr * group["lr_scale"] (`set_lr`)."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay={layer_decay} must be in (0, 1]")
    num_layers = len(model.blocks) + 1
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name in NO_DECAY
        lid = layer_id(name, num_layers)
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (num_layers - lid)}
        groups[key]["params"].append(param)
    return list(groups.values())


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each group's learning rate for this step: lr times its lr_scale (1 for groups without one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def finetune_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross entropy in fp32 (at least). Class indices (B,): with label smoothing s, (1-s) * NLL + s * mean over
    classes of -log p (timm's LabelSmoothingCrossEntropy). Soft targets (B, C), from `mix`: they carry their
    smoothing already, so the loss is sum(-t * log p) (timm's SoftTargetCrossEntropy)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if targets.dim() == 2:
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def smooth_one_hot(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((len(targets), num_classes), off, device=targets.device).scatter_(
        1, targets.view(-1, 1), 1.0 - smoothing + off)


def _beta(generator: torch.Generator, alpha: float) -> float:
    # torch's Beta sampler takes no generator: numpy's, seeded from the torch generator, keeps one stream of state.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _cutmix_box(h: int, w: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """timm's rand_bbox: a box of area (1 - lam) * h * w around a uniform centre, clipped to the image."""
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(h * ratio), int(w * ratio)
    cy = int(torch.randint(0, h, (1,), generator=generator))
    cx = int(torch.randint(0, w, (1,), generator=generator))
    return max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)


def mix(images: torch.Tensor, targets: torch.Tensor, num_classes: int, generator: torch.Generator,
        mixup: float = 0.0, cutmix: float = 0.0, smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """timm's batch-mode Mixup: (mixed images, soft targets (B, C), lam). One lam ~ Beta(alpha, alpha) per batch;
    each image is mixed with the batch's reverse (images.flip(0)). With both alphas > 0 a batch takes cutmix with
    probability 0.5, else mixup; cutmix pastes one box and lam becomes the exact share of pixels kept. All the
    randomness comes from `generator` (CPU), so a batch's mix is reproducible from the generator's state (save
    `generator.get_state()` with a checkpoint, or seed one per step). Both alphas 0: the images unchanged and the
    smoothed one-hot targets."""
    if mixup < 0 or cutmix < 0:
        raise ValueError(f"mix: mixup={mixup} and cutmix={cutmix} must be >= 0")
    lam = 1.0
    if mixup > 0 or cutmix > 0:
        use_cutmix = cutmix > 0 and (mixup <= 0 or float(torch.rand((), generator=generator)) < CUTMIX_SWITCH_PROB)
        lam = _beta(generator, cutmix if use_cutmix else mixup)
        flipped = images.flip(0)
        if use_cutmix:
            h, w = images.shape[-2:]
            y0, y1, x0, x1 = _cutmix_box(h, w, lam, generator)
            images = images.clone()
            images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            images = images * lam + flipped * (1.0 - lam)
    soft = smooth_one_hot(targets, num_classes, smoothing)
    return images, soft * lam + soft.flip(0) * (1.0 - lam), lam
