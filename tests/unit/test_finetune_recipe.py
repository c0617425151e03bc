"""MAE's fine-tuning recipe pieces (issue 32): layer-wise lr decay groups as FAIR mae's param_groups_lrd builds
them, the label-smoothing cross entropy against its formula, and mixup / cutmix reproducible from a generator."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cratescale.config import JobConfig
from cratescale.engine.finetune_recipe import (finetune_loss, layer_id, mix, param_groups_lrd, peak_lr, set_lr,
                                               smooth_one_hot)
from cratescale.models import create_model, from_encoder


@pytest.mark.parametrize("name", ["crate_mae_debug", "vit_mae_debug"])
def test_layer_decay_groups(name):
    clf = from_encoder(create_model(name, depth=3), 5)
    groups = param_groups_lrd(clf, weight_decay=0.05, layer_decay=0.5)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in clf.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(id(p) for p in trainable) and len(seen) == len(set(seen))  # each once
    assert not clf.pos_embed.requires_grad  # the fixed sin-cos table is left out
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(clf.named_parameters())
    # num_layers = depth + 1 = 4: patch embed / cls at 0.5**4, block i at 0.5**(3 - i), fc_norm and head at 1
    expect = {"patch_embed.proj.weight": (0.5 ** 4, 0.05), "patch_embed.proj.bias": (0.5 ** 4, 0.0),
              "cls_token": (0.5 ** 4, 0.0), "blocks.0.norm1.weight": (0.5 ** 3, 0.0),
              "blocks.2.norm2.bias": (0.5, 0.0), "fc_norm.weight": (1.0, 0.0), "head.weight": (1.0, 0.05),
              "head.bias": (1.0, 0.0)}
    block_weight = "blocks.1.mssa.u.weight" if name.startswith("crate") else "blocks.1.attn.qkv.weight"
    expect[block_weight] = (0.5 ** 2, 0.05)
    for key, (scale, decay) in expect.items():
        g = by_param[id(names[key])]
        assert (g["lr_scale"], g["weight_decay"]) == (pytest.approx(scale), decay), key
    assert [layer_id(n, 4) for n in ("pos_embed", "blocks.0.x", "blocks.2.x", "head.bias")] == [0, 1, 3, 4]
    optimizer = torch.optim.AdamW(groups, lr=0.0)
    set_lr(optimizer, 1e-3)
    assert sorted({round(g["lr"] / 1e-3, 6) for g in optimizer.param_groups}) == [0.0625, 0.125, 0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups_lrd(clf, 0.05, 0.0)


def test_label_smoothing_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, targets, s = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g), 0.1
    logp = F.log_softmax(logits, dim=-1)
    formula = ((1 - s) * -logp.gather(1, targets[:, None]).squeeze(1) + s * -logp.mean(dim=-1)).mean()
    assert torch.allclose(finetune_loss(logits, targets, s), formula, atol=1e-6)
    soft = smooth_one_hot(targets, 5, s)  # the soft-target route with unmixed targets: the same loss
    assert torch.allclose(soft.sum(1), torch.ones(8)) and torch.allclose(finetune_loss(logits, soft), formula)
    assert finetune_loss(logits.bfloat16(), targets).dtype == torch.float32


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 3, 4, 0])


def test_mixup_and_cutmix():
    images, targets = _batch()
    same, soft, lam = mix(images, targets, 5, torch.Generator().manual_seed(0), smoothing=0.1)
    assert lam == 1.0 and torch.equal(same, images) and torch.equal(soft, smooth_one_hot(targets, 5, 0.1))
    mixed, soft, lam = mix(images, targets, 5, torch.Generator().manual_seed(0), mixup=0.8)
    assert 0.0 < lam < 1.0 and torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0))
    assert torch.allclose(soft, lam * F.one_hot(targets, 5) + (1 - lam) * F.one_hot(targets.flip(0), 5))
    cut, soft, lam = mix(images, targets, 5, torch.Generator().manual_seed(0), cutmix=1.0)
    pasted = (cut != images).any(dim=1)  # (B, H, W): where the flipped batch's box went
    assert pasted.any() and torch.equal(cut[pasted.unsqueeze(1).expand_as(cut)],
                                        images.flip(0)[pasted.unsqueeze(1).expand_as(cut)])
    assert lam == pytest.approx(1 - float(pasted[0].float().mean()))  # the exact share of pixels kept
    assert torch.allclose(soft.sum(1), torch.ones(6))
    with pytest.raises(ValueError, match="mixup"):
        mix(images, targets, 5, torch.Generator(), mixup=-1.0)


def test_mix_is_reproducible_and_resumable_from_the_generator_state():
    images, targets = _batch()
    g = torch.Generator().manual_seed(7)
    run = [mix(images, targets, 5, g, mixup=0.8, cutmix=1.0) for _ in range(12)]
    # cutmix leaves the pixels outside its box as they were; mixup changes every pixel
    assert {bool((m == images).any()) for m, _, _ in run} == {True, False}  # both ways, about even odds
    assert len({lam for _, _, lam in run}) == 12
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        mix(images, targets, 5, g, mixup=0.8, cutmix=1.0)
    saved = g.get_state()  # a checkpoint after three batches
    resumed = torch.Generator()
    resumed.set_state(saved)
    for (m, t, lam), expect in zip((mix(images, targets, 5, resumed, mixup=0.8, cutmix=1.0) for _ in range(9)),
                                   run[3:], strict=True):
        assert lam == expect[2] and torch.equal(m, expect[0]) and torch.equal(t, expect[1])


def test_peak_lr_scales_with_the_batch():
    job = JobConfig(finetune={"enabled": True, "steps": 10, "global_batch": 512, "micro_batch": 64})
    assert peak_lr(job.finetune) == pytest.approx(5e-4 * 2) and job.finetune_seed == job.seed
