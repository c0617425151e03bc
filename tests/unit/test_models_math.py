"""CRATE layers and the whole reference-layout forward against float64 transcriptions of the equations
in shared/reference/CRATE_MAE.md, written here independently of cratescale.models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cratescale.models import create_model
from cratescale.models.layers import (
    ISTA,
    MSSA,
    CrateDecoderLayer,
    CrateEncoderLayer,
    attend,
    random_masking,
    sincos_pos_embed_2d,
)

D, HEADS, N, B = 32, 4, 9, 2


def ln(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def ref_mssa(z, u_weight, out_weight, out_bias, heads):
    """W = Z U^T; per head A_k = softmax(W_k W_k^T / sqrt(p)); O_k = A_k W_k; concat; output linear."""
    w = z @ u_weight.T
    p = w.shape[-1] // heads
    outs = []
    for k in range(heads):
        wk = w[..., k * p:(k + 1) * p]
        scores = wk @ wk.transpose(-1, -2) / math.sqrt(p)
        a = torch.exp(scores - scores.max(-1, keepdim=True).values)
        a = a / a.sum(-1, keepdim=True)
        outs.append(a @ wk)
    return torch.cat(outs, -1) @ out_weight.T + out_bias


def ref_ista(y, dictionary, eta, lambd):
    """Row form with three products, exactly as written: ReLU(Y + eta*(Y D - Y D^T D) - eta*lambda)."""
    grad = y @ dictionary - y @ dictionary.T @ dictionary
    return torch.clamp(y + eta * grad - eta * lambd, min=0)


def rand_params(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return module


def test_mssa_matches_float64_transcription():
    torch.manual_seed(0)
    m = rand_params(MSSA(D, HEADS), 1).double()
    z = torch.randn(B, N, D, dtype=torch.float64)
    want = ref_mssa(z, m.u.weight, m.proj.weight, m.proj.bias, HEADS)
    torch.testing.assert_close(m(z), want, rtol=1e-10, atol=1e-10)
    out, attn = m(z, return_attention=True)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    assert attn.shape == (B, HEADS, N, N)
    torch.testing.assert_close(attn.sum(-1), torch.ones(B, HEADS, N, dtype=torch.float64))
    # float32 module against the float64 truth
    m32 = rand_params(MSSA(D, HEADS), 1)
    torch.testing.assert_close(m32(z.float()).double(), want, rtol=1e-4, atol=1e-4)


def test_attend_cpu_path_equals_sdpa():
    # accelerators take F.scaled_dot_product_attention: both must use the same scale convention
    q, k, v = (torch.randn(2, 3, 7, 16) for _ in range(3))
    torch.testing.assert_close(attend(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta,lambd", [(0.1, 0.5), (0.3, 0.05)])
def test_ista_matches_float64_transcription(eta, lambd):
    m = rand_params(ISTA(D, eta=eta, lambd=lambd), 2).double()
    y = torch.randn(B, N, D, dtype=torch.float64)
    want = ref_ista(y, m.weight, eta, lambd)
    got = m(y)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert (got == 0).any() and (got > 0).any()  # the threshold is active on this input


def test_encoder_layer_matches_float64_transcription():
    m = rand_params(CrateEncoderLayer(D, HEADS, eta=0.1, lambd=0.5), 3).double()
    z = torch.randn(B, N, D, dtype=torch.float64)
    a = ln(z, m.norm1.weight, m.norm1.bias, 1e-5)
    half = z + ref_mssa(a, m.mssa.u.weight, m.mssa.proj.weight, m.mssa.proj.bias, HEADS)
    want = ref_ista(ln(half, m.norm2.weight, m.norm2.bias, 1e-5), m.ista.weight, 0.1, 0.5)
    got = m(z)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert (got >= 0).all()
    out, mssa_in, attn = m.forward_trace(z, True)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mssa_in, a, rtol=1e-10, atol=1e-10)
    assert attn.shape == (B, HEADS, N, N)


def test_decoder_layer_matches_float64_transcription():
    m = rand_params(CrateDecoderLayer(D, HEADS), 4).double()
    z = torch.randn(B, N, D, dtype=torch.float64)
    half = ln(z, m.norm1.weight, m.norm1.bias, 1e-5) @ m.linear.weight.T
    a = ln(half, m.norm2.weight, m.norm2.bias, 1e-5)
    want = half - ref_mssa(a, m.mssa.u.weight, m.mssa.proj.weight, m.mssa.proj.bias, HEADS)
    torch.testing.assert_close(m(z), want, rtol=1e-10, atol=1e-10)


def ref_sincos(dim, grid):
    """MAE's numpy recipe transcribed: meshgrid(w, h) -> first half from columns, second from rows."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = []
    for r in range(grid):
        for c in range(grid):
            col, row = c * omega, r * omega
            rows.append(torch.cat([col.sin(), col.cos(), row.sin(), row.cos()]))
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.stack(rows)])


def test_sincos_table_matches_mae_recipe():
    got = sincos_pos_embed_2d(16, 3)
    assert got.shape == (10, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_sincos(16, 3), rtol=1e-6, atol=1e-6)
    assert (got[0] == 0).all()


def test_masking_keeps_smallest_noise_and_is_deterministic():
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(5))
    m1, m2 = random_masking(noise, 0.75), random_masking(noise.clone(), 0.75)
    assert torch.equal(m1.mask, m2.mask) and torch.equal(m1.ids_keep, m2.ids_keep)
    assert (m1.mask.sum(1) == 12).all()
    for i in range(3):
        kept = set(torch.topk(noise[i], 4, largest=False).indices.tolist())
        assert set(m1.ids_keep[i].tolist()) == kept
        assert set(torch.nonzero(m1.mask[i] == 0).flatten().tolist()) == kept
        # ids_restore inverts the shuffle
        shuffle = torch.argsort(noise[i])
        assert torch.equal(shuffle[m1.ids_restore[i]], torch.arange(16))


def reference_forward(model, images, noise):
    """The authors' forward in the reference layout, transcribed in float64 from CRATE_MAE.md."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    p, d, length = c["patch_size"], c["embed_dim"], model.num_patches
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2)
    keep = int(length * (1 - c["mask_ratio"]))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(images.shape[0], length, dtype=torch.float64)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    fill = sd["mask_token"].expand(images.shape[0], length - keep, d)
    x = torch.gather(torch.cat([x_kept, fill], 1), 1, ids_restore[..., None].expand(-1, -1, d))
    x = torch.cat([sd["cls_token"].expand(images.shape[0], -1, -1), x], 1) + sd["decoder_pos_embed"]
    for i in range(c["depth"]):
        b = f"blocks.{i}."
        a = ln(x, sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-5)
        x = x + ref_mssa(a, sd[b + "mssa.u.weight"], sd[b + "mssa.proj.weight"], sd[b + "mssa.proj.bias"], c["num_heads"])
        x = ref_ista(ln(x, sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-5), sd[b + "ista.weight"], c["eta"], c["lambd"])
    x = ln(x, sd["norm.weight"], sd["norm.bias"], 1e-6)
    for i in range(c["decoder_depth"]):
        b = f"decoder_blocks.{i}."
        h = ln(x, sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-5) @ sd[b + "linear.weight"].T
        a = ln(h, sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-5)
        x = h - ref_mssa(a, sd[b + "mssa.u.weight"], sd[b + "mssa.proj.weight"], sd[b + "mssa.proj.bias"],
                         c["decoder_num_heads"])
    x = ln(x, sd["decoder_norm.weight"], sd["decoder_norm.bias"], 1e-6)
    pred = (x @ sd["decoder_pred.weight"].T + sd["decoder_pred.bias"])[:, 1:]
    g = length ** 0.5
    target = images.reshape(images.shape[0], 3, int(g), p, int(g), p).permute(0, 2, 4, 3, 5, 1).reshape(pred.shape)
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum(), pred, mask


@pytest.mark.parametrize("lambd", [0.5, 0.05])
def test_reference_layout_forward_matches_transcription(lambd):
    torch.manual_seed(0)
    model = create_model("crate_mae_debug", lambd=lambd)
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, model.num_patches)
    want_loss, want_pred, want_mask = reference_forward(model, images.double(), noise)
    loss, pred, mask = model.double()(images.double(), noise)
    torch.testing.assert_close(mask.double(), want_mask)
    torch.testing.assert_close(pred, want_pred, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=1e-9)
