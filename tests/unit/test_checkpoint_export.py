"""Weights export: zarr v3 group + export.json round trip (bitwise), tamper detection, no pickle on load; the
DeepSpeed layout reader refuses what it does not know (real layouts: tests/dist/test_layouts.py)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cratescale.checkpoint import Commit
from cratescale.checkpoint.export import ExportError, consolidate, export_weights, load_export
from cratescale.checkpoint.layout import LayoutError, ds_layout


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "encoder.layers.0.attn.qkv.weight": torch.randn(48, 16, generator=g),
        "encoder.layers.0.attn.qkv.bias": torch.randn(48, generator=g),
        "decoder.pos_embed": torch.randn(1, 17, 16, generator=g).to(torch.bfloat16),  # widened to fp32
        "encoder.lambd": torch.tensor(0.1),                                            # 0-d
        "num_batches_tracked": torch.tensor(7, dtype=torch.int64),                     # integer buffer
    }


PROV = {"step": 300, "run_name": "demo", "config_hash": "deadbeef"}
CONFIG = {"name": "crate_mae_debug", "img_size": 32, "patch_size": 8}


def test_round_trip_bitwise(tmp_path: Path, monkeypatch) -> None:
    state = _state()
    out = export_weights(state, CONFIG, PROV, tmp_path / "exp")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "export.json", "model.safetensors", "weights.zarr"]
    assert not (tmp_path / "exp.tmp").exists()
    group = zarr.open_group(str(out / "weights.zarr"), mode="r")
    assert group.metadata.zarr_format == 3 and sorted(group.array_keys()) == sorted(state)

    def no_pickle(*a, **k):
        raise AssertionError("load_export unpickled something")
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    back, config, prov = load_export(out)
    assert config == CONFIG and {k: prov[k] for k in PROV} == PROV and prov["time"] > 0
    assert list(back) == list(state)
    for k, v in state.items():
        want = v.float() if v.is_floating_point() else v
        assert back[k].dtype == want.dtype and torch.equal(back[k], want), k
    index = json.loads((out / "export.json").read_text())
    assert index["tensors"][0] == {"name": "encoder.layers.0.attn.qkv.weight", "shape": [48, 16],
                                   "dtype": "float32", "crc32": index["tensors"][0]["crc32"]}


def test_tampered_array_is_refused(tmp_path: Path) -> None:
    out = export_weights(_state(), CONFIG, PROV, tmp_path / "exp")
    arr = zarr.open_array(str(out / "weights.zarr" / "encoder.layers.0.attn.qkv.bias"), mode="r+")
    data = arr[...]
    data[3] += 1e-3
    arr[...] = data
    with pytest.raises(ExportError, match=r"tensor 'encoder.layers.0.attn.qkv.bias' .* fails its checksum"):
        load_export(out)


def test_reshaped_or_missing_array_is_refused(tmp_path: Path) -> None:
    out = export_weights(_state(), CONFIG, PROV, tmp_path / "exp")
    group = zarr.open_group(str(out / "weights.zarr"), mode="r+")
    name = "encoder.layers.0.attn.qkv.weight"
    del group[name]
    group.create_array(name=name, shape=(16, 48), dtype="float32")
    with pytest.raises(ExportError, match=r"qkv.weight' .* is float32\[16, 48\], export.json says float32\[48, 16\]"):
        load_export(out)
    del group[name]
    with pytest.raises(ExportError, match="qkv.weight' listed in .* is missing"):
        load_export(out)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'a/b' cannot be a zarr array name"):
        export_weights({"a/b": torch.zeros(2)}, CONFIG, PROV, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()
    export_weights({"a": torch.zeros(2)}, CONFIG, PROV, tmp_path / "y")
    with pytest.raises(FileExistsError, match="already exists"):
        export_weights({"a": torch.ones(2)}, CONFIG, PROV, tmp_path / "y")
    export_weights({"a": torch.ones(2)}, CONFIG, PROV, tmp_path / "y", overwrite=True)
    assert torch.equal(load_export(tmp_path / "y")[0]["a"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="export.json not found"):
        load_export(tmp_path)
    with pytest.raises(TypeError):
        export_weights({"a": torch.zeros(2)}, {"obj": object()}, PROV, tmp_path / "z")
    assert np.array_equal(load_export(tmp_path / "y")[0]["a"].numpy(), np.ones(2, np.float32))


def _tag_dir(tmp_path: Path, names: list[str]) -> Path:
    tag = tmp_path / "step_000000004" / "ds"
    tag.mkdir(parents=True)
    for name in names:
        (tag / name).write_bytes(b"")
    return tag


BF16_Z3 = ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
           "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]


@pytest.mark.parametrize("names, why", [
    ([*BF16_Z3, "expert_0_mp_rank_00_model_states.pt"], r"unrecognised DeepSpeed file\(s\) \['expert_0_mp_rank"),
    (BF16_Z3[:1] + ["zero_pp_rank_1_mp_rank_00_optim_states.pt"] + BF16_Z3[2:], "a mix of bf16 and fp32"),
    (BF16_Z3[1:], r"partitions of ranks \[1\] do not form a whole run"),
    (BF16_Z3[:2], "no DeepSpeed model states"),
    (BF16_Z3[2:], "ZeRO-3 model states without optimizer partitions"),
    ([*BF16_Z3, "mp_rank_00_model_states.pt"], "both full"),
])
def test_unknown_checkpoint_layout_is_an_error_listing_the_files(tmp_path: Path, names: list[str], why: str) -> None:
    """An unrecognised layout is never read as some other one (the ZeRO-0 path read bf16 module weights)."""
    tag = _tag_dir(tmp_path, names)
    with pytest.raises(LayoutError, match=why) as info:
        ds_layout(tag)
    assert str(tag) in str(info.value) and all(n in str(info.value) for n in names)
    with pytest.raises(LayoutError, match=why):
        consolidate(Commit(4, tag.parent, {}))


def test_bf16_layout_is_recognised_by_its_prefix(tmp_path: Path) -> None:
    layout = ds_layout(_tag_dir(tmp_path, BF16_Z3))
    assert (layout.partitioned, layout.zero3, layout.precision, layout.ranks) == (True, True, "bf16", 2)
    assert layout.stages == "3"


def test_a_replaced_export_keeps_the_old_provenance_and_is_never_absent(tmp_path: Path, monkeypatch) -> None:
    """Issue 29.4: a re-export (a run trained longer) trades places with the old export in one atomic step,
    and keeps what the old one was made from, newest first (before: rmtree then rename, no history)."""
    from cratescale import files

    out = tmp_path / "export"
    for step in (10, 20):
        export_weights({"a": torch.full((2,), float(step))}, CONFIG, {**PROV, "step": step}, out, overwrite=True)
    seen = []
    real = files._exchange
    monkeypatch.setattr(files, "_exchange", lambda a, b: seen.append(load_export(b)[2]["step"]) or real(a, b))
    export_weights({"a": torch.full((2,), 30.0)}, CONFIG, {**PROV, "step": 30}, out, overwrite=True)
    state, _, provenance = load_export(out)
    assert seen == [20] and torch.equal(state["a"], torch.full((2,), 30.0))  # the old export stood until the swap
    assert [h["step"] for h in provenance["history"]] == [20, 10]
    assert all("history" not in h for h in provenance["history"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no tmp or old copy left
