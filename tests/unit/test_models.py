"""Model registry, parameter counts, token layouts, loss, encode and gradients (tiny configs)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from cratescale.models import (
    ModelConfigError,
    ModelInputError,
    create_model,
    list_models,
    model_from_config,
    param_counts,
    train_flops_per_image,
)
from cratescale.models.flops import forward_flops_per_image

# (total, trainable, reference) for every registered size; the reference column is the authors' code's
# count from shared/reference/CRATE_MAE.md (it always builds a decoder_embed linear).
EXPECTED = {
    "crate_mae_tiny": (11_407_488, 11_256_192, 11_555_328),
    "crate_mae_small": (25_073_472, 24_846_528, 25_405_824),
    "crate_mae_base": (44_047_872, 43_745_280, 44_638_464),
    "crate_mae_large": (153_224_960, 152_821_504, 154_274_560),
    "vit_mae_base": (143_790_336, 143_487_744, 143_790_336),
    "vit_mae_base_fair": (111_907_840, 111_655_680, 111_907_840),
    "crate_mae_debug": (77_824, 75_648, 81_984),
    "vit_mae_debug": (231_488, 229_312, 231_488),
}


def meta_model(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def test_every_registered_model_has_expected_counts():
    assert set(list_models()) == set(EXPECTED)
    for name, (total, trainable, reference) in EXPECTED.items():
        c = param_counts(meta_model(name))
        assert (c["total"], c["trainable"], c["reference"]) == (total, trainable, reference), name


def crate_count_by_hand(d, depth, dec_depth, patch=16, chans=3, length=196):
    layer = 3 * d * d + 5 * d  # U, out proj (+bias), D or W_dec, two LayerNorms
    pixels = patch * patch * chans
    return ((depth + dec_depth) * layer + (pixels * d + d) + 2 * d + 2 * (length + 1) * d + 4 * d
            + (d * pixels + pixels))


@pytest.mark.parametrize("name,d,depth", [("crate_mae_base", 768, 12), ("crate_mae_large", 1024, 24)])
def test_crate_count_formula(name, d, depth):
    assert param_counts(meta_model(name))["total"] == crate_count_by_hand(d, depth, depth)


def test_layouts_share_parameters_for_crate():
    a = create_model("crate_mae_debug", encoder_tokens="all").state_dict()
    v = create_model("crate_mae_debug", encoder_tokens="visible").state_dict()
    assert {k: t.shape for k, t in a.items()} == {k: t.shape for k, t in v.items()}


def test_config_is_json_and_rebuilds():
    m = create_model("crate_mae_debug", lambd=0.25, encoder_tokens="visible")
    cfg = json.loads(json.dumps(m.config))
    assert cfg["name"] == "crate_mae_debug" and cfg["lambd"] == 0.25 and cfg["arch"] == "crate_mae"
    again = model_from_config(cfg)
    assert again.config == m.config
    assert (m.num_patches, m.patch_size, m.img_size) == (16, 8, 32)


@pytest.mark.parametrize(
    "name,kw,needle",
    [
        ("crate_mae_nope", {}, "unknown model"),
        ("crate_mae_debug", {"bogus": 1}, "bogus"),
        ("crate_mae_debug", {"encoder_tokens": "some"}, "encoder_tokens"),
        ("crate_mae_debug", {"decoder_embed_dim": 32}, "decoder_embed_dim"),
        ("vit_mae_base_fair", {"encoder_tokens": "all"}, "decoder_embed_dim"),
        ("crate_mae_debug", {"mask_ratio": 1.0}, "mask_ratio"),
        ("crate_mae_debug", {"img_size": 30}, "patch_size"),
        ("crate_mae_debug", {"embed_dim": "64"}, "embed_dim='64' must be int"),  # typed per architecture
        ("vit_mae_debug", {"qkv_bias": 1}, "qkv_bias=1 must be bool"),
        ("crate_mae_debug", {"qkv_bias": True}, "unknown CrateMAE settings \\['qkv_bias'\\]"),
    ],
)
def test_bad_config_raises_clear_error(name, kw, needle):
    with pytest.raises(ModelConfigError, match=needle):
        with torch.device("meta"):
            create_model(name, **kw)


def test_bad_inputs_raise():
    m = create_model("crate_mae_debug")
    with pytest.raises(ModelInputError, match="noise"):
        m(torch.randn(2, 3, 32, 32), torch.rand(2, 15))
    with pytest.raises(ModelInputError, match="images"):
        m(torch.randn(2, 3, 40, 40))
    with pytest.raises(ModelInputError, match="layer index"):
        m.encode(torch.randn(1, 3, 32, 32), layers=[5])


def test_patchify_roundtrip_and_order():
    m = create_model("crate_mae_debug")
    x = torch.randn(2, 3, 32, 32)
    patches = m.patchify(x)
    assert patches.shape == (2, 16, 192)
    assert torch.equal(m.unpatchify(patches), x)
    # patch 1 is row 0, column 1; its first values are pixel (0, 8) channels 0..2, then pixel (0, 9)
    assert torch.equal(patches[0, 1, :6], torch.stack([x[0, :, 0, 8], x[0, :, 0, 9]]).flatten())


MODELS_AND_LAYOUTS = [(n, lay) for n in ("crate_mae_debug", "vit_mae_debug") for lay in ("all", "visible")]


@pytest.mark.parametrize("name,layout", MODELS_AND_LAYOUTS)
def test_forward_shapes_mask_and_loss_definition(name, layout):
    torch.manual_seed(0)
    m = create_model(name, encoder_tokens=layout)
    x, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    loss, pred, mask = m(x, noise)
    assert pred.shape == (3, 16, 192) and mask.shape == (3, 16) and loss.dim() == 0
    keep = torch.topk(noise, 4, dim=1, largest=False).indices
    want_mask = torch.ones(3, 16).scatter_(1, keep, 0.0)
    assert torch.equal(mask, want_mask)
    per_patch = ((pred - m.patchify(x)) ** 2).mean(-1)
    torch.testing.assert_close(loss, (per_patch * mask).sum() / mask.sum())
    # norm_pix_loss: each target patch normalized by its mean and unbiased variance
    m.norm_pix_loss = True
    loss_n, pred_n, _ = m(x, noise)
    t = m.patchify(x)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    torch.testing.assert_close(loss_n, (((pred_n - t) ** 2).mean(-1) * mask).sum() / mask.sum())


@pytest.mark.parametrize("name,layout", MODELS_AND_LAYOUTS)
def test_masked_pixels_cannot_reach_the_prediction(name, layout):
    # both layouts must hide removed patches from the encoder entirely
    torch.manual_seed(1)
    m = create_model(name, encoder_tokens=layout).eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    _, pred, mask = m(x, noise)
    pixels = m.patchify(x)
    scrambled = torch.where(mask[..., None].bool(), torch.randn_like(pixels) * 5, pixels)
    _, pred2, mask2 = m(m.unpatchify(scrambled), noise)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(pred, pred2, rtol=1e-5, atol=1e-5)
    # ... while a visible patch does change it
    changed = torch.where(mask[..., None].bool(), pixels, pixels + 1.0)
    _, pred3, _ = m(m.unpatchify(changed), noise)
    assert not torch.allclose(pred, pred3, atol=1e-3)


@pytest.mark.parametrize("name", ["crate_mae_debug", "vit_mae_debug"])
def test_layouts_pick_same_mask_and_encoder_token_counts(name):
    noise = torch.rand(2, 16)
    seen = {}
    for layout in ("all", "visible"):
        m = create_model(name, encoder_tokens=layout)
        shapes = []
        m.blocks[0].register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape)))
        _, _, mask = m(torch.randn(2, 3, 32, 32), noise)
        seen[layout] = (mask, shapes[0])
    assert torch.equal(seen["all"][0], seen["visible"][0])
    assert seen["all"][1] == (2, 17, 64)  # cls + all 16 patches (4 visible, 12 mask tokens)
    assert seen["visible"][1] == (2, 5, 64)  # cls + 4 visible patches


def test_noise_none_draws_fresh_masks():
    m = create_model("crate_mae_debug")
    x = torch.randn(2, 3, 32, 32)
    masks = [m(x)[2] for _ in range(4)]
    assert all((mk.sum(1) == 12).all() for mk in masks)
    assert any(not torch.equal(masks[0], mk) for mk in masks[1:])


@pytest.mark.parametrize("name,layout", MODELS_AND_LAYOUTS)
def test_backward_reaches_every_trainable_parameter(name, layout):
    torch.manual_seed(2)
    m = create_model(name, encoder_tokens=layout)
    loss, _, _ = m(torch.randn(2, 3, 32, 32), torch.rand(2, 16))
    loss.backward()
    for pname, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
        else:
            assert p.grad is None and "pos_embed" in pname, pname


@pytest.mark.parametrize("name", ["crate_mae_debug", "vit_mae_debug"])
def test_encode_keys_shapes_and_consistency(name):
    torch.manual_seed(3)
    m = create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    out = m.encode(x, layers=True, return_attention=True)
    assert set(out) == {"cls", "mean", "layers", "mssa_in", "attention"}
    assert out["cls"].shape == (2, 64) and out["mean"].shape == (2, 64)
    assert len(out["layers"]) == len(out["mssa_in"]) == len(out["attention"]) == 2
    assert all(t.shape == (2, 17, 64) for t in out["layers"] + out["mssa_in"])
    assert all(a.shape == (2, 4, 17, 17) for a in out["attention"])
    torch.testing.assert_close(out["attention"][0].sum(-1), torch.ones(2, 4, 17))
    final = m.norm(out["layers"][-1])
    torch.testing.assert_close(out["cls"], final[:, 0])
    torch.testing.assert_close(out["mean"], final[:, 1:].mean(1))
    # mssa_in is LN1 of the previous layer's output
    torch.testing.assert_close(out["mssa_in"][1], m.blocks[1].norm1(out["layers"][0]))
    if name.startswith("crate"):
        assert all((t >= 0).all() for t in out["layers"])
    plain = m.encode(x)
    assert set(plain) == {"cls", "mean"}
    torch.testing.assert_close(plain["cls"], out["cls"])
    one = m.encode(x, layers=[-1])
    torch.testing.assert_close(one["layers"][0], out["layers"][1])


@pytest.mark.parametrize("name,layout", MODELS_AND_LAYOUTS)
def test_bf16_autocast_close_to_fp32(name, layout):
    torch.manual_seed(4)
    m = create_model(name, encoder_tokens=layout)
    x, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    loss32, _, _ = m(x, noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, pred16, _ = m(x, noise)
    assert pred16.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    assert torch.isfinite(loss16)
    assert abs(loss16.item() - loss32.item()) <= 0.03 * loss32.item()
    loss16.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name,layout", MODELS_AND_LAYOUTS)
def test_flops_match_torch_flop_counter(name, layout):
    from torch.utils.flop_counter import FlopCounterMode

    m = create_model(name, encoder_tokens=layout)
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with FlopCounterMode(display=False) as counter:
        m(x, noise)
    assert counter.get_total_flops() == 2 * forward_flops_per_image(m)
    assert train_flops_per_image(m) == 3 * forward_flops_per_image(m)


def test_flops_orderings_at_base_size():
    crate_all, crate_vis = meta_model("crate_mae_base"), meta_model("crate_mae_base", encoder_tokens="visible")
    vit_all = meta_model("vit_mae_base", encoder_tokens="all")
    # CRATE layer: 4 n d^2 + 2 n^2 d MACs (encoder), 3 n d^2 + 2 n^2 d (decoder); n = 197, d = 768
    n, d = 197, 768
    macs = 12 * (4 * n * d * d + 2 * n * n * d) + 12 * (3 * n * d * d + 2 * n * n * d) + 2 * 196 * 768 * 768
    assert train_flops_per_image(crate_all) == 6 * macs
    assert train_flops_per_image(crate_vis) < 0.6 * train_flops_per_image(crate_all)
    assert train_flops_per_image(crate_all) < 0.4 * train_flops_per_image(vit_all)


def test_models_package_imports_only_torch_and_stdlib():
    allowed = {"torch", "math", "typing", "__future__", "re", "dataclasses"}
    # from_pretrained reads an export folder (config.json + safetensors) itself, so that loading needs torch alone.
    # The package's CLI (python -m cratescale.models) parses its options and names the installed version.
    reads_files = {"pretrained.py": {"json", "struct", "sys", "pathlib"}, "__main__.py": {"argparse", "importlib"}}
    root = Path(__file__).resolve().parents[2] / "cratescale" / "models"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module.split(".")[0]]
            else:
                continue
            assert set(names) <= allowed | reads_files.get(path.name, set()), f"{path.name} imports {names}"


@pytest.mark.parametrize("name", ["crate_mae_debug", "vit_mae_debug"])
def test_bf16_weights_forward_backward(name):
    # DeepSpeed's bf16 mode casts the whole model rather than using autocast
    torch.manual_seed(5)
    m = create_model(name, encoder_tokens="visible")
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss32 = m(x, noise)[0].item()
    m = m.bfloat16()
    loss, pred, _ = m(x.bfloat16(), noise)
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - loss32) <= 0.05 * loss32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_bf16_model_reconstructs_the_fp32_pixels_it_is_given(norm_pix):
    """Issue 12: a bf16 model (DeepSpeed's bf16 mode) takes fp32 pixels, casts its own input, and its loss target
    (and the norm_pix statistics) are the fp32 pixels; bf16-cast pixels still give the quantised target."""
    torch.manual_seed(5)
    m = create_model("crate_mae_debug", norm_pix_loss=norm_pix).bfloat16()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss32, pred32, mask = m(x, noise)
    loss16, pred16, _ = m(x.bfloat16(), noise)
    assert torch.equal(pred32, pred16)  # the encoder sees the same bf16 input either way
    assert torch.equal(loss32, m.forward_loss(x, pred32, mask))
    assert torch.equal(loss16, m.forward_loss(x.bfloat16(), pred16, mask))
    assert loss32.item() != loss16.item()  # the target is what differs
    enc32, enc16 = m.encode(x), m.encode(x.bfloat16())
    assert torch.equal(enc32["cls"], enc16["cls"])
