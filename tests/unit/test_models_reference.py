"""Loading the authors' CRATE-MAE checkpoints: key mapping, wrappers, errors, and agreement with a
module tree that mirrors the reference code's structure and parameter names (written here)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cratescale.models import (
    ReferenceLoadError,
    create_model,
    load_reference_state_dict,
    to_reference_state_dict,
)


# ---- a mirror of the reference module tree (names as listed in shared/reference/CRATE_MAE.md) ----
class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(dim), fn

    def forward(self, x):
        return self.fn(self.norm(x))


class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x):
        b, n, d = x.shape
        w = self.qkv(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
        attn = torch.softmax(w @ w.transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1)
        return self.to_out((attn @ w).transpose(1, 2).reshape(b, n, d))


class RefIsta(nn.Module):
    def __init__(self, dim, eta=0.1, lambd=0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) * 0.2)
        self.eta, self.lambd = eta, lambd

    def forward(self, x):
        grad_1 = F.linear(F.linear(x, self.weight), self.weight.t())
        grad_2 = F.linear(x, self.weight.t())
        return F.relu(x + self.eta * (grad_2 - grad_1) - self.eta * self.lambd)


class RefLinear(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) * 0.2)

    def forward(self, x):
        return F.linear(x, self.weight)


class RefEncoderBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([PreNorm(dim, RefAttention(dim, heads)), PreNorm(dim, RefIsta(dim))])])

    def forward(self, x):
        for attn, ff in self.layers:
            x = ff(attn(x) + x)
        return x


class RefDecoderBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([PreNorm(dim, RefLinear(dim)), PreNorm(dim, RefAttention(dim, heads))])])

    def forward(self, x):
        for ff, attn in self.layers:
            h = ff(x)
            x = h - attn(h)
        return x


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)


class RefCrateMAE(nn.Module):
    def __init__(self, dim=64, heads=4, depth=2, patch=8, length=16):
        super().__init__()
        self.patch_embed = PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, length + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(RefEncoderBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.decoder_pos_embed = nn.Parameter(self.pos_embed.detach().clone(), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(RefDecoderBlock(dim, heads) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, patch * patch * 3)
        with torch.no_grad():  # non-trivial LayerNorm affine values so the mapping of every tensor matters
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)

    def forward(self, imgs, noise, mask_ratio=0.75):
        x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2)
        n, length, d = x.shape
        keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep, None].repeat(1, 1, d))
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], 1)
        tokens = self.mask_token.repeat(n, length + 1 - x.shape[1], 1)
        x_ = torch.gather(torch.cat([x[:, 1:], tokens], 1), 1, ids_restore[..., None].repeat(1, 1, d))
        x = torch.cat([x[:, :1], x_], 1) + self.decoder_pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


def test_reference_tree_names_are_the_documented_ones():
    keys = set(RefCrateMAE().state_dict())
    for k in ("blocks.1.layers.0.0.norm.weight", "blocks.1.layers.0.0.fn.qkv.weight", "blocks.1.layers.0.0.fn.to_out.0.bias",
              "blocks.1.layers.0.1.norm.bias", "blocks.1.layers.0.1.fn.weight", "decoder_blocks.0.layers.0.0.fn.weight",
              "decoder_blocks.0.layers.0.1.fn.qkv.weight", "decoder_embed.weight", "decoder_pos_embed"):
        assert k in keys, k


def test_reference_weights_give_reference_outputs():
    torch.manual_seed(0)
    ref = RefCrateMAE().eval()
    ours = create_model("crate_mae_debug").eval()
    report = load_reference_state_dict(ours, ref.state_dict())
    assert sorted(report["ignored"]) == ["decoder_embed.bias", "decoder_embed.weight"]
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    _, pred, _ = ours(x, noise)
    torch.testing.assert_close(pred, ref(x, noise), rtol=1e-5, atol=1e-5)


def test_round_trip_through_reference_names():
    torch.manual_seed(1)
    a, b = create_model("crate_mae_debug"), create_model("crate_mae_debug")
    ref = to_reference_state_dict(a)
    assert set(ref) == set(RefCrateMAE().state_dict())  # the authors' code could load it strictly
    load_reference_state_dict(b, ref)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    x, noise = torch.randn(1, 3, 32, 32), torch.rand(1, 16)
    torch.testing.assert_close(a(x, noise)[0], b(x, noise)[0], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["all", "visible"])
def test_vit_mapping_is_identity(layout):
    a, b = create_model("vit_mae_debug", encoder_tokens=layout), create_model("vit_mae_debug", encoder_tokens=layout)
    ref = to_reference_state_dict(a)
    assert "blocks.0.attn.qkv.weight" in ref and "decoder_embed.weight" in ref
    load_reference_state_dict(b, ref)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_wrapper_and_module_prefix_are_accepted():
    src = RefCrateMAE()
    wrapped = {"model": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}
    ours = create_model("crate_mae_debug")
    load_reference_state_dict(ours, wrapped)
    assert torch.equal(ours.blocks[1].ista.weight, src.blocks[1].layers[0][1].fn.weight)
    assert torch.equal(ours.decoder_blocks[0].linear.weight, src.decoder_blocks[0].layers[0][0].fn.weight)
    assert torch.equal(ours.decoder_blocks[1].mssa.u.weight, src.decoder_blocks[1].layers[0][1].fn.qkv.weight)


def _fresh_and_snapshot():
    model = create_model("crate_mae_debug")
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_missing_tensor_is_named_and_nothing_loads():
    model, before = _fresh_and_snapshot()
    sd = RefCrateMAE().state_dict()
    del sd["blocks.1.layers.0.1.fn.weight"]
    with pytest.raises(ReferenceLoadError, match=r"missing \(1\): blocks\.1\.layers\.0\.1\.fn\.weight"):
        load_reference_state_dict(model, sd)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_misshapen_and_unexpected_tensors_are_named():
    model, _ = _fresh_and_snapshot()
    sd = RefCrateMAE().state_dict()
    sd["decoder_pred.weight"] = torch.zeros(10, 64)
    sd["blocks.7.layers.0.0.norm.weight"] = torch.zeros(64)
    with pytest.raises(ReferenceLoadError) as err:
        load_reference_state_dict(model, sd)
    msg = str(err.value)
    assert "misshapen (1): decoder_pred.weight (10, 64) vs model (192, 64)" in msg
    assert "unexpected (1): blocks.7.layers.0.0.norm.weight" in msg
    assert "crate_mae_debug" in msg


def test_non_tensor_entries_are_rejected():
    model, _ = _fresh_and_snapshot()
    with pytest.raises(ReferenceLoadError, match="not a tensor"):
        load_reference_state_dict(model, {"pos_embed": [1, 2, 3]})
    with pytest.raises(ReferenceLoadError, match="expected a dict"):
        load_reference_state_dict(model, [1, 2])
