"""The fine-tuning classifier (issue 32): MAE's global-pool head on a registry encoder, stochastic depth that leaves
pretraining and its state dicts alone, the two arms (an export's encoder; the initialization, same seed), and the
fine-tuned export's bitwise round trip with its class names."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from cratescale.checkpoint.classifier_export import classifier_from_export, export_classifier, load_classifier
from cratescale.checkpoint.export import ExportError, export_weights, load_model, read_export_header
from cratescale.models import ModelConfigError, create_model, from_encoder, scratch_classifier
from cratescale.models.classifier import HEAD_INIT_STD, drop_path_rates, set_drop_path
from cratescale.models.layers import drop_path

ENCODERS = ("crate_mae_debug", "vit_mae_debug")
NAMES = ["cat", "dog", "ship"]


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _mae_export(tmp_path, name: str = "crate_mae_debug"):
    torch.manual_seed(3)
    model = create_model(name)
    return export_weights(model.state_dict(), model.config, {"run": "t", "step": 7}, tmp_path / f"{name}_export"), model


@pytest.mark.parametrize("name", ENCODERS)
def test_drop_path_leaves_state_dict_and_pretraining_unchanged(name):
    model = create_model(name)
    keys = list(model.state_dict())
    torch.manual_seed(0)
    loss0, _, _ = model(_images(), torch.rand(4, model.num_patches))
    set_drop_path(model.blocks, 0.3)
    assert list(model.state_dict()) == keys  # a float attribute, no parameter or buffer
    set_drop_path(model.blocks, 0.0)
    torch.manual_seed(0)
    loss1, _, _ = model(_images(), torch.rand(4, model.num_patches))
    assert torch.equal(loss0, loss1)
    model.eval()
    set_drop_path(model.blocks, 0.5)  # eval: identity, whatever the rate
    with torch.no_grad():
        a = model.encode(_images())["mean"]
        set_drop_path(model.blocks, 0.0)
        assert torch.equal(a, model.encode(_images())["mean"])


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(4000, 5, 3)
    y = drop_path(x, 0.25, training=True)
    per_sample = y[:, 0, 0]
    assert per_sample.unique().tolist() == pytest.approx([0.0, 1 / 0.75])  # whole samples, kept ones rescaled
    assert (y == per_sample[:, None, None]).all()
    assert abs(float((per_sample == 0).float().mean()) - 0.25) < 0.03
    assert torch.equal(drop_path(x, 0.25, training=False), x) and torch.equal(drop_path(x, 0.0, True), x)
    assert drop_path_rates(4, 0.3) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    with pytest.raises(ModelConfigError, match="drop_path"):
        drop_path_rates(4, 1.0)


@pytest.mark.parametrize("name", ENCODERS)
def test_head_reads_the_mean_of_the_last_blocks_patch_tokens(name):
    torch.manual_seed(1)
    encoder = create_model(name).eval()
    with torch.no_grad():
        last = encoder.encode(_images(), layers=[-1])["layers"][-1]  # the last block's output, before `norm`
    clf = from_encoder(encoder, 3, NAMES, drop_path=0.2, head_seed=5).eval()
    with torch.no_grad():
        assert torch.allclose(clf.features(_images()), clf.fc_norm(last[:, 1:].mean(dim=1)), atol=1e-6)
        assert clf(_images()).shape == (4, 3)
    keys = set(clf.state_dict())
    assert {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias", "cls_token", "pos_embed"} <= keys
    assert not {k for k in keys if k.startswith(("decoder", "mask_token", "norm."))}, keys
    assert clf.training is False and from_encoder(create_model(name).eval(), 3).blocks[0].training  # train mode
    assert [b.drop_prob for b in clf.blocks] == pytest.approx([0.0, 0.2])
    # trunc_normal_'s bounds are absolute (+-2, as in timm and MAE): at std 2e-5 a plain normal in effect
    weight = clf.head.weight.detach()
    assert float(clf.head.bias.detach().abs().max()) == 0.0 and 0.5 < float(weight.std()) / HEAD_INIT_STD < 1.5


def test_scratch_arm_is_the_seeded_initialization_and_heads_match():
    torch.manual_seed(11)
    reference = create_model("crate_mae_debug")  # how build_model makes the init (and the init baseline)
    before = torch.get_rng_state()
    scratch = scratch_classifier(reference.config, 3, NAMES, seed=11)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left alone
    ref = reference.state_dict()
    for key, value in scratch.state_dict().items():
        if not key.startswith(("head", "fc_norm")):
            assert torch.equal(value, ref[key]), key
    other = scratch_classifier(reference.config, 3, NAMES, seed=12)
    assert not torch.equal(other.blocks[0].mssa.u.weight, scratch.blocks[0].mssa.u.weight)
    pretrained = from_encoder(create_model("crate_mae_debug"), 3, NAMES, head_seed=11)
    assert torch.equal(pretrained.head.weight, scratch.head.weight)  # both arms start from one head


def test_pretrained_arm_keeps_the_exports_encoder(tmp_path):
    export, mae = _mae_export(tmp_path)
    clf = classifier_from_export(export, 3, NAMES, drop_path=0.1, head_seed=0)
    mae_state = mae.state_dict()
    for key, value in clf.state_dict().items():
        if not key.startswith(("head", "fc_norm")):
            assert torch.equal(value, mae_state[key]), key
    assert clf.training


@pytest.mark.parametrize("name", ENCODERS)
def test_fine_tuned_export_round_trip_is_bitwise(tmp_path, monkeypatch, name):
    export, _ = _mae_export(tmp_path, name)
    clf = classifier_from_export(export, 3, NAMES, drop_path=0.1, head_seed=2)
    with torch.no_grad():
        for p in clf.parameters():  # as if trained: every tensor differs from its initialization
            p.add_(torch.randn_like(p) * 1e-3)
    out = export_classifier(clf, {"run": "t", "step": 40, "arm": "pretrained"}, tmp_path / "ft")
    header = read_export_header(out)
    assert header["model_config"]["class_names"] == NAMES and header["model_config"]["num_classes"] == 3
    assert header["model_config"]["encoder"]["name"] == name
    assert json.loads((out / "config.json").read_text())["arch"] == "classifier"

    def no_pickle(*args, **kwargs):
        raise AssertionError("loading an export must not unpickle")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    back, info = load_classifier(out)
    assert info["step"] == 40 and back.class_names == NAMES and not back.training
    state, again = clf.state_dict(), back.state_dict()
    assert list(state) == list(again)
    for key in state:
        assert state[key].dtype == again[key].dtype and torch.equal(state[key], again[key]), key
    assert [b.drop_prob for b in back.blocks] == [b.drop_prob for b in clf.blocks]
    with torch.no_grad():
        assert torch.equal(clf.eval()(_images()), back(_images()))


def test_exports_of_the_wrong_kind_are_one_line_errors(tmp_path):
    export, _ = _mae_export(tmp_path)
    with pytest.raises(ExportError, match="not a fine-tuned classifier") as err:
        load_classifier(export)
    assert "\n" not in str(err.value)
    ft = export_classifier(scratch_classifier(create_model("crate_mae_debug").config, 3, NAMES), {"step": 0},
                           tmp_path / "ft")
    with pytest.raises(ExportError, match="already a fine-tuned classifier"):
        classifier_from_export(ft, 3)
    with pytest.raises(ModelConfigError, match="classifier_from_config"):
        load_model(ft)
    with pytest.raises(FileNotFoundError, match="not an export dir"):
        load_classifier(tmp_path / "missing")
    with pytest.raises(ModelConfigError, match="class names"):
        from_encoder(create_model("crate_mae_debug"), 3, ["a", "a", "b"])
