"""MSSA's self-attention, softmax(X X^T / sqrt(p)) X, as Triton kernels that use q = k = v.

SDPA gets the same tensor three times and its backward writes three gradients that autograd then sums
(about 6% of a CRATE-MAE-B step on an H100). Here the backward is one kernel per block of tokens that
writes dX = dQ + dK + dV once, and it reads each score block once for both of its roles: with q = k the
scores are symmetric, S_ji = S_ij^T, so the block S_ij = X_i X_j^T serves the rows of i as queries
(P_ij = exp(S_ij - lse_i)) and as keys (P_ji^T = exp(S_ij - lse_j)). Five block matmuls per pair instead
of FlashAttention-2's seven, no atomics, no second dQ kernel.

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before this
module is imported), which is how CI checks them against the reference attention.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK = 64  # tokens per block, both roles; 197 tokens = 4 blocks
# Triton 3.9's interpreter computes tl.dot on bf16 operands wrongly (it has no bf16 matmul) and rounds fp32 to
# bf16 toward zero; there the operands go up to fp32 first and the casts round to nearest-even by hand, as
# the GPU does. bf16 x bf16 products are exact in fp32, so this is the GPU's bf16 MMA with fp32 accumulation
# up to summation order.
UPCAST = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b).to(tl.float32)


@triton.jit
def _cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 -> dtype, rounding to nearest-even also in the interpreter."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tile(base, offs_n, offs_d, stride_n, stride_d, n_tokens, head_dim):
    """A (tokens, head_dim) tile; rows past the sequence and columns past the head width read 0."""
    mask = (offs_n[:, None] < n_tokens) & (offs_d[None, :] < head_dim)
    return tl.load(base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _forward_kernel(X, O, LSE, sxb, sxh, sxn, sxd, sob, soh, son, sod, n_heads, n_tokens, head_dim, scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    x_base = X + b * sxb + h * sxh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = _tile(x_base, offs_m, offs_d, sxn, sxd, n_tokens, head_dim)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for start in range(0, n_tokens, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _tile(x_base, offs_n, offs_d, sxn, sxd, n_tokens, head_dim)
        s = _dot(q, tl.trans(k), UPCAST) * scale
        s = tl.where(offs_n[None, :] < n_tokens, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(_cast(p, k.dtype, UPCAST), k, UPCAST)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_mask = (offs_m[:, None] < n_tokens) & (offs_d[None, :] < head_dim)
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod
    tl.store(o_ptrs, _cast(acc, O.dtype.element_ty, UPCAST), mask=o_mask)
    tl.store(LSE + pid_bh * n_tokens + offs_m, m_i + tl.log(l_i), mask=offs_m < n_tokens)


@triton.jit
def _backward_kernel(X, DO, LSE, DELTA, DX, sxb, sxh, sxn, sxd, sgb, sgh, sgn, sgd, n_heads, n_tokens, head_dim,
                     scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr):
    """dX_i = dQ_i + dK_i + dV_i for one block i of tokens. DO and DX share the strides sg*."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    x_base = X + b * sxb + h * sxh
    g_off = b * sgb + h * sgh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    x_i = _tile(x_base, offs_m, offs_d, sxn, sxd, n_tokens, head_dim)
    do_i = _tile(DO + g_off, offs_m, offs_d, sgn, sgd, n_tokens, head_dim)
    row_ok = offs_m < n_tokens
    lse_i = tl.load(LSE + pid_bh * n_tokens + offs_m, mask=row_ok, other=float("inf"))
    delta_i = tl.load(DELTA + pid_bh * n_tokens + offs_m, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for start in range(0, n_tokens, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < n_tokens
        x_j = _tile(x_base, offs_n, offs_d, sxn, sxd, n_tokens, head_dim)
        do_j = _tile(DO + g_off, offs_n, offs_d, sgn, sgd, n_tokens, head_dim)
        lse_j = tl.load(LSE + pid_bh * n_tokens + offs_n, mask=col_ok, other=float("inf"))
        delta_j = tl.load(DELTA + pid_bh * n_tokens + offs_n, mask=col_ok, other=0.0)
        s = _dot(x_i, tl.trans(x_j), UPCAST) * scale        # S_ij, and S_ji^T
        # i as queries: P_ij, dS_ij = P_ij (dO_i X_j^T - delta_i)
        p = tl.where(col_ok[None, :], tl.exp(s - lse_i[:, None]), 0.0)
        ds = p * (_dot(do_i, tl.trans(x_j), UPCAST) - delta_i[:, None])
        # i as keys and values: P_ji^T, dS_ji^T = P_ji^T (X_i dO_j^T - delta_j)
        pt = tl.where(row_ok[:, None], tl.exp(s - lse_j[None, :]), 0.0)
        dst = pt * (_dot(x_i, tl.trans(do_j), UPCAST) - delta_j[None, :])
        acc += _dot(_cast(pt, do_j.dtype, UPCAST), do_j, UPCAST)                      # dV_i
        acc += _dot(_cast(ds + dst, x_j.dtype, UPCAST), x_j, UPCAST) * scale         # dQ_i + dK_i
    mask = row_ok[:, None] & (offs_d[None, :] < head_dim)
    tl.store(DX + g_off + offs_m[:, None] * sgn + offs_d[None, :] * sgd, _cast(acc, DX.dtype.element_ty, UPCAST), mask=mask)


def _token_major_like(x: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, N, D) tensor laid out as (B, N, H, D), so MSSA's merge of the heads is a free view."""
    b, h, n, d = x.shape
    return torch.empty(b, n, h, d, dtype=x.dtype, device=x.device).transpose(1, 2)


def _launch_grid(x: torch.Tensor) -> tuple[int, int]:
    b, h, n, _ = x.shape
    return triton.cdiv(n, BLOCK), b * h


@torch.library.custom_op("cratescale::mssa_forward", mutates_args=())
def _forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n, d = x.shape
    out = _token_major_like(x)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=x.device)
    _forward_kernel[_launch_grid(x)](x, out, lse, *x.stride(), *out.stride(), h, n, d, d**-0.5,
                                     BLOCK_M=BLOCK, BLOCK_N=BLOCK, D=max(16, triton.next_power_of_2(d)), UPCAST=UPCAST)
    return out, lse


@_forward.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _token_major_like(x), x.new_empty(x.shape[:3], dtype=torch.float32)


@torch.library.custom_op("cratescale::mssa_backward", mutates_args=())
def _backward(x: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    grad_x = _token_major_like(x)
    grad_out = grad_out if grad_out.stride() == grad_x.stride() else grad_x.copy_(grad_out).clone()
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # rowsum(dO * O), FlashAttention's D
    _backward_kernel[_launch_grid(x)](x, grad_out, lse, delta, grad_x, *x.stride(), *grad_x.stride(), h, n, d,
                                      d**-0.5, BLOCK_M=BLOCK, BLOCK_N=BLOCK, D=max(16, triton.next_power_of_2(d)), UPCAST=UPCAST)
    return grad_x


@_backward.register_fake
def _(x: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    return _token_major_like(x)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], *output)


def _autograd_backward(ctx, grad_out: torch.Tensor, _grad_lse: torch.Tensor):
    x, out, lse = ctx.saved_tensors
    return _backward(x, out, lse, grad_out)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def mssa_self_attention(x: torch.Tensor) -> torch.Tensor:
    """softmax(x x^T / sqrt(p)) x over (B, heads, n, p); x may be a strided view. The result is laid out
    token-major, (B, n, heads, p) in memory."""
    if x.dim() != 4:
        raise ValueError(f"mssa_self_attention: expected (B, heads, n, p), got shape {tuple(x.shape)}")
    return _forward(x)[0]
