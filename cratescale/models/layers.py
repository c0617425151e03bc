"""Building blocks: MSSA, ISTA, the CRATE encoder/decoder layers, patch embedding, sin-cos positions,
masking and the ViT block used by the baseline.

Tokens are rows: a token tensor is (B, n, d). Every function here is a pure torch op so the same code
runs on CPU, on GPU (where F.scaled_dot_product_attention picks flash attention, see `attend`) and on the meta device.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_LN_EPS = 1e-5  # LayerNorm eps inside CRATE blocks (reference PreNorm uses nn.LayerNorm defaults)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(p)) v over (B, heads, n, p) tensors.

    Accelerators get F.scaled_dot_product_attention (flash / memory-efficient kernels). On CPU, torch's
    fused flash kernel measured 2-3x slower than plain batched matmuls at MAE token counts (197 tokens,
    head width 64, fp32 and bf16, 2 threads), so the CPU takes the explicit form.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v)
    attn = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1)
    return attn @ v



def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a residual branch (B, ...): each sample's branch is zeroed with probability p and the
    kept ones scaled by 1/(1-p), as timm's DropPath. Identity when p is 0 or in eval mode (pretraining and every
    existing model run with p 0: their computation is unchanged)."""
    if p <= 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep.div_(1.0 - p)


def attention_with_maps(attention: nn.Module, a: torch.Tensor, want_attention: bool):
    """(attention(a), its maps) when asked, else (attention(a), None)."""
    return attention(a, return_attention=True) if want_attention else (attention(a), None)

class MSSA(nn.Module):
    """Multi-head subspace self-attention: one bias-free projection U is query, key and value.

    out = concat_k(softmax(W_k W_k^T / sqrt(p)) W_k) P^T + b, with W = x U^T.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MSSA: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.u = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=True)
        # A kernel for softmax(w w^T / sqrt(p)) w that training may set from outside (one that knows q = k = v);
        # None: `attend`. Not a parameter or buffer, so checkpoints and exports do not see it.
        self.self_attention: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        b, n, d = x.shape
        w = self.u(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, K, n, p), a strided view
        if (w.device.type == "cpu" and self.self_attention is None) or return_attention:
            # the explicit matmul path reads one head-major copy faster; the kernels take the strided view
            w = w.contiguous()
        attn = None
        if return_attention:
            # Explicit maps are only needed for diagnostics; training takes the fused kernel below.
            attn = torch.softmax((w @ w.transpose(-1, -2)) * self.head_dim**-0.5, dim=-1)
            o = attn @ w
        elif self.self_attention is not None:
            o = self.self_attention(w)
        else:
            o = attend(w, w, w)
        o = self.proj(o.transpose(1, 2).reshape(b, n, d))
        return (o, attn) if return_attention else o


class ISTA(nn.Module):
    """One proximal-gradient step of sparse coding against dictionary D (a d x d weight, no bias).

    Row form: ReLU(Y + eta*(Y D - Y D^T D) - eta*lambd) = ReLU(Y + eta*(Y - Y D^T) D - eta*lambd):
    two matmuls instead of the reference's three.
    """

    def __init__(self, dim: int, eta: float = 0.1, lambd: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        self.eta = float(eta)
        self.lambd = float(lambd)
        nn.init.kaiming_uniform_(self.weight)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        shape = y.shape
        y2 = y.reshape(-1, shape[-1])
        residual = y2 - F.linear(y2, self.weight)  # Y - Y D^T
        # addmm fuses "input + eta * residual @ D"; the threshold is folded into the input term.
        z = torch.addmm(y2 - self.eta * self.lambd, residual, self.weight, alpha=self.eta)
        return F.relu(z).view(shape)


class CrateEncoderLayer(nn.Module):
    """Z_half = Z + MSSA(LN1(Z)); Z_next = ISTA(LN2(Z_half)) (no residual: output is non-negative).

    `drop_prob` (stochastic depth, set by fine-tuning; a plain float, so state dicts do not see it) drops the MSSA
    branch only: ISTA has no residual around it, and dropping it would zero the tokens instead of skipping a step."""

    def __init__(self, dim: int, num_heads: int, eta: float, lambd: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_LN_EPS)
        self.mssa = MSSA(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_LN_EPS)
        self.ista = ISTA(dim, eta, lambd)
        self.drop_prob = 0.0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z + drop_path(self.mssa(self.norm1(z)), self.drop_prob, self.training)
        return self.ista(self.norm2(z))

    def forward_trace(self, z: torch.Tensor, want_attention: bool):
        """Like forward, also returning the MSSA input LN1(Z) and (optionally) the attention maps."""
        a = self.norm1(z)
        o, attn = attention_with_maps(self.mssa, a, want_attention)
        return self.ista(self.norm2(z + drop_path(o, self.drop_prob, self.training))), a, attn


class CrateDecoderLayer(nn.Module):
    """The encoder layer run backwards: Z_half = LN_a(Z) W_dec^T; Z_next = Z_half - MSSA(LN_b(Z_half))."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_LN_EPS)
        self.linear = DecoderLinear(dim)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_LN_EPS)
        self.mssa = MSSA(dim, num_heads)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.linear(self.norm1(z))
        return h - self.mssa(self.norm2(h))


class DecoderLinear(nn.Module):
    """W_dec: plain d x d linear without bias, kaiming-uniform (kept apart from nn.Linear so the
    model-wide xavier init does not touch it, as in the reference)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with a strided Conv2d (weight xavier on its (d, C*p*p) view)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"PatchEmbed: img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        nn.init.xavier_uniform_(self.proj.weight.view(dim, -1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The stride-p conv as one GEMM over (c, row, col)-ordered patches, same weights and values: on an
        # H100 cuDNN ran this conv (and its layout transposes) at 4.6% of a CRATE-MAE-B training step.
        b, c, h, w = images.shape
        p = self.patch_size
        patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return F.linear(patches, self.proj.weight.view(self.proj.out_channels, -1), self.proj.bias)  # (B, L, d)


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table, (1 + grid*grid, dim) with an all-zero cls row.

    First half of the channels encodes the column index, second half the row index (MAE's meshgrid
    puts w first); each half is [sin, cos] over frequencies 1/10000^(i/(dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: dim {dim} must be a multiple of 4")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows = coords.repeat_interleave(grid)  # token t = r * grid + c
    cols = coords.repeat(grid)

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    table = torch.cat([one_axis(cols), one_axis(rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0)
    return table.float()


class Masking(NamedTuple):
    ids_keep: torch.Tensor  # (B, keep) indices of visible patches, ascending noise order
    ids_restore: torch.Tensor  # (B, L) inverse permutation of argsort(noise)
    mask: torch.Tensor  # (B, L) float, 1 = removed, in the original patch order


def random_masking(noise: torch.Tensor, mask_ratio: float) -> Masking:
    """MAE masking driven by per-sample noise: keep the int(L*(1-ratio)) patches with smallest noise."""
    b, length = noise.shape
    keep = int(length * (1 - mask_ratio))
    # stable sort: ties (impossible for U[0,1) floats in practice) still resolve the same everywhere
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    mask = torch.ones(b, length, device=noise.device, dtype=torch.float32)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(ids_shuffle[:, :keep], ids_restore, mask)


class ViTAttention(nn.Module):
    """timm-style attention: qkv linear (bias configurable), output projection with bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ViTAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).contiguous()
        q, k, v = qkv.unbind(0)
        attn = None
        if return_attention:
            attn = torch.softmax((q @ k.transpose(-1, -2)) * self.head_dim**-0.5, dim=-1)
            o = attn @ v
        else:
            o = attend(q, k, v)
        o = self.proj(o.transpose(1, 2).reshape(b, n, d))
        return (o, attn) if return_attention else o


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block with timm/MAE parameter names (norm1, attn, norm2, mlp); `drop_prob` is
    stochastic depth on both residual branches (timm's DropPath), 0 unless fine-tuning sets it."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = ViTAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_prob = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_prob, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_prob, self.training)

    def forward_trace(self, x: torch.Tensor, want_attention: bool):
        a = self.norm1(x)
        o, attn = attention_with_maps(self.attn, a, want_attention)
        x = x + drop_path(o, self.drop_prob, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_prob, self.training), a, attn


def init_mae_weights(module: nn.Module) -> None:
    """MAE/reference init: every nn.Linear xavier-uniform with zero bias, LayerNorm weight 1 bias 0.

    ISTA dictionaries and W_dec are plain Parameters (kaiming-uniform at construction) and are left alone.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

