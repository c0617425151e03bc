"""White-box diagnostics on a fixed batch: per-layer coding rates, ISTA sparsity, cls attention, PCA.

Conventions (tokens are rows, Z is (N, d) for one image, N = 1 + L tokens):
  R(Z)        = 1/2 logdet(I_d + d / (N eps^2) Z^T Z)                                   (plain coding rate)
  R^c(Z; U)   = sum_k 1/2 logdet(I_p + p / (N eps^2) (Z U_k)^T (Z U_k))                 (compression term)
where U_k (d x p) is head k's block of the MSSA projection U (our `mssa.u`, the reference's `qkv`), and
Z = LN1(Z^l) is the input of layer l's attention. eps^2 = 0.5 by default (the CRATE papers' and ReduNet /
MCR^2 code's value). The authors' visualisation script (Ma-Lab-Berkeley/CRATE vis_utils/coding_rate.py)
instead L2-normalises every token inside each head and uses p / (N * 0.01): pass normalize_heads=True,
eps_sq=0.01 to reproduce it. Rates are computed per image in float64 and averaged over the batch.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def coding_rate(z: torch.Tensor, eps_sq: float = 0.5) -> torch.Tensor:
    """R(Z) for z of shape (..., N, d) -> (...). Uses the smaller Gram matrix (Sylvester's identity)."""
    if z.ndim < 2:
        raise ValueError(f"coding_rate: expected (..., N, d), got shape {tuple(z.shape)}")
    n, d = z.shape[-2:]
    z = z.to(torch.float64)
    gram = z.transpose(-1, -2) @ z if d <= n else z @ z.transpose(-1, -2)
    eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=z.device)
    return 0.5 * torch.linalg.slogdet(eye + (d / (n * eps_sq)) * gram).logabsdet


def subspace_coding_rate(z: torch.Tensor, u_weight: torch.Tensor, num_heads: int, eps_sq: float = 0.5,
                         normalize_heads: bool = False) -> torch.Tensor:
    """R^c(Z; U) for z (..., N, d) and the MSSA projection weight (K*p, d) (nn.Linear layout) -> (...)."""
    kp = u_weight.shape[0]
    if kp % num_heads or z.shape[-1] != u_weight.shape[1]:
        raise ValueError(f"subspace_coding_rate: U {tuple(u_weight.shape)} does not fit {num_heads} heads "
                         f"on features of width {z.shape[-1]}")
    w = z.to(torch.float64) @ u_weight.to(torch.float64).T          # (..., N, K*p)
    w = w.unflatten(-1, (num_heads, kp // num_heads)).transpose(-2, -3)  # (..., K, N, p)
    if normalize_heads:
        w = F.normalize(w, dim=-1)
    return coding_rate(w, eps_sq).sum(-1)


def sparsity_stats(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image statistics of z (B, N, d): zero fraction, mean nonzeros (l0) and l1 per token, and the
    mean over tokens of l0/l1 (tokens with l1 = 0 are left out of that mean)."""
    z = z.to(torch.float64)
    l0 = (z != 0).sum(-1).to(torch.float64)
    l1 = z.abs().sum(-1)
    ok = l1 > 0
    ratio = torch.where(ok, l0 / l1.clamp_min(1e-300), torch.zeros_like(l1))
    return {"zero_fraction": (z == 0).to(torch.float64).mean((-1, -2)), "l0": l0.mean(-1), "l1": l1.mean(-1),
            "l0_over_l1": ratio.sum(-1) / ok.sum(-1).clamp_min(1)}


def cls_attention_maps(attn: torch.Tensor, grid: int) -> np.ndarray:
    """(B, heads, 1+L, 1+L) -> (B, heads, grid, grid): attention of the cls query over the patches."""
    b, h, n, _ = attn.shape
    if n != 1 + grid * grid:
        raise ValueError(f"cls_attention_maps: {n} tokens do not make 1 + {grid}x{grid}")
    return attn[:, :, 0, 1:].reshape(b, h, grid, grid).float().cpu().numpy()


def pca_rgb(patches: torch.Tensor, grid: int) -> np.ndarray:
    """(B, L, d) patch features -> (B, grid, grid, 3) in [0, 1]: top 3 principal components over all
    patches of the batch, each min-max scaled. Signs are fixed (largest loading positive) so the colours
    do not flip between runs."""
    b, n, d = patches.shape
    x = patches.reshape(-1, d).to(torch.float64)
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[:3]
    comps = comps * torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    y = x @ comps.T
    if y.shape[1] < 3:
        y = torch.cat([y, torch.zeros(len(y), 3 - y.shape[1], dtype=y.dtype)], 1)
    lo, hi = y.min(0).values, y.max(0).values
    y = (y - lo) / (hi - lo).clamp_min(1e-12)
    return y.reshape(b, grid, grid, 3).cpu().numpy()


def _mssa_of(block: torch.nn.Module):
    mssa = getattr(block, "mssa", None)
    if mssa is None or not hasattr(mssa, "u"):
        return None
    return mssa.u.weight.detach(), int(mssa.num_heads)


def _mean_std(values: torch.Tensor) -> tuple[float, float]:
    v = values.detach().to(torch.float64).cpu()
    return float(v.mean()), float(v.std(unbiased=False))


@torch.no_grad()
def run_diagnostics(model: torch.nn.Module, images: torch.Tensor, *, eps_sq: float = 0.5,
                    normalize_heads: bool = False) -> dict[str, Any]:
    """Per-layer curves (mean and std over images) plus last-layer cls attention and PCA colours."""
    model.eval()
    out = model.encode(images, layers=True, return_attention=True)
    grid = int(model.img_size // model.patch_size)
    curves: dict[str, list[float]] = {}
    stds: dict[str, list[float]] = {}

    def add(name: str, values: torch.Tensor) -> None:
        m, s = _mean_std(values)
        curves.setdefault(name, []).append(m)
        stds.setdefault(name, []).append(s)

    for i, (z_in, z_out) in enumerate(zip(out["mssa_in"], out["layers"])):
        proj = _mssa_of(model.blocks[i])
        if proj is not None:
            add("coding_rate_subspace", subspace_coding_rate(z_in, proj[0], proj[1], eps_sq, normalize_heads))
        add("coding_rate", coding_rate(z_in, eps_sq))
        for key, v in sparsity_stats(z_out).items():
            add(key, v)
    last = out["layers"][-1]
    return {"curves": curves, "curves_std": stds, "eps_sq": eps_sq, "normalize_heads": normalize_heads,
            "num_images": int(images.shape[0]), "depth": len(out["layers"]),
            "attention": cls_attention_maps(out["attention"][-1], grid),
            "pca": pca_rgb(last[:, 1:], grid)}


def denormalize(images: torch.Tensor) -> np.ndarray:
    """ImageNet-normalized (B, 3, H, W) -> (B, H, W, 3) float in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype).view(1, 3, 1, 1)
    return (images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def reconstructions(model: torch.nn.Module, images: torch.Tensor, seed: int = 0) -> dict[str, np.ndarray]:
    """original | masked input | reconstruction (visible patches pasted back), each (B, H, W, 3) in [0, 1]."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(images.shape[0], model.num_patches, generator=gen)
    _, pred, mask = model(images, noise=noise)
    target = model.patchify(images)
    if model.config.get("norm_pix_loss"):
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + mean
    m = mask.unsqueeze(-1).to(target.dtype)
    masked = model.unpatchify(target * (1 - m))
    recon = model.unpatchify(target * (1 - m) + pred * m)
    # Masked patches shown grey (0 in normalized space is the dataset mean colour).
    return {"original": denormalize(images), "masked": denormalize(masked), "reconstruction": denormalize(recon),
            "mask_ratio": float(mask.float().mean())}
