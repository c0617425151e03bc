"""Exports for other tools: model.safetensors + config.json beside the zarr weights (bitwise the same tensors),
`from_pretrained` with torch alone, and `to-reference` (the authors' key names, refused for the drop-token layout)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch

from cratescale.checkpoint.export import export_weights, load_model
from cratescale.models import PretrainedError, create_model, from_pretrained
from cratescale.models.pretrained import read_safetensors
from tests.unit.test_models_reference import RefCrateMAE

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "cratescale.checkpoint.export", "to-reference"]


def _export(tmp_path: Path, name: str = "crate_mae_debug", seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    model = create_model(name, **overrides)
    with torch.no_grad():  # non-trivial norms and biases, so every tensor's mapping shows in the outputs
        for p in model.parameters():  # the sin-cos tables stay: the reference adds decoder_pos_embed to its input
            p.add_(0.05 * torch.randn_like(p) * p.requires_grad)
    return export_weights(model.state_dict(), model.config, {"step": 7, "run_name": "t"}, tmp_path / f"exp_{seed}")


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 16, generator=g)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_safetensors_equal_the_zarr_export_bitwise(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(6, 5, generator=g), "half": torch.randn(3, generator=g).to(torch.bfloat16),
             "scalar": torch.tensor(0.25), "count": torch.tensor([7, 9], dtype=torch.int64), "empty": torch.zeros(0, 4)}
    out = export_weights(state, {"name": "mlp"}, {"step": 1}, tmp_path / "e")
    group = zarr.open_group(str(out / "weights.zarr"), mode="r")
    by_library, (ours, meta) = load_numpy(str(out / "model.safetensors")), read_safetensors(out / "model.safetensors")
    assert sorted(by_library) == sorted(ours) == sorted(state) and meta == {"format": "pt"}
    for name in state:
        want = np.asarray(group[name][...])
        assert by_library[name].dtype == want.dtype and by_library[name].shape == want.shape, name
        assert by_library[name].tobytes() == want.tobytes(), name
        assert ours[name].numpy().dtype == want.dtype and ours[name].numpy().tobytes() == want.tobytes(), name
        assert tuple(ours[name].shape) == want.shape, name
    assert ours["half"].dtype == torch.float32 and ours["scalar"].shape == ()
    config = json.loads((out / "config.json").read_text())
    assert config["key_names"] == "cratescale" and config["provenance"]["step"] == 1 and config["dtype"] == "float32"


@pytest.mark.parametrize("name, layout", [("crate_mae_debug", "all"), ("crate_mae_debug", "visible"),
                                          ("vit_mae_debug", "visible")])
def test_from_pretrained_gives_the_exported_models_outputs(tmp_path, name, layout):
    out = _export(tmp_path, name, encoder_tokens=layout)
    config = json.loads((out / "config.json").read_text())
    assert (config["arch"], config["name"], config["token_layout"]) == (name.rsplit("_", 1)[0], name, layout)
    model, (x, noise) = from_pretrained(out), _inputs()
    reference, _ = load_model(out)
    assert not model.training and model.encoder_tokens == layout
    with torch.no_grad():
        assert torch.equal(model(x, noise)[1], reference(x, noise)[1])
        assert torch.equal(model.encode(x)["mean"], reference.encode(x)["mean"])


def test_from_pretrained_imports_torch_only(tmp_path):
    out = _export(tmp_path)
    code = ("import sys; from cratescale.models import from_pretrained; m = from_pretrained(sys.argv[1]); "
            "heavy = sorted({n.split('.')[0] for n in sys.modules} & {'deepspeed', 'ray', 'nvidia', 'zarr', "
            "'safetensors', 'pyarrow', 'pandas'}); print(m.config['name'], heavy)")
    done = _run([sys.executable, "-c", code, str(out)])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "crate_mae_debug []"


def test_to_reference_loads_into_the_reference_model(tmp_path):
    out = _export(tmp_path)
    done = _run([*CLI, str(out), str(tmp_path / "ref")])
    assert done.returncode == 0, done.stderr
    ref_dir = tmp_path / "ref"
    config = json.loads((ref_dir / "config.json").read_text())
    assert (config["key_names"], config["token_layout"]) == ("reference", "all")
    assert config["provenance"]["from_export"] == str(out.resolve()) and config["provenance"]["step"] == 7
    ref = RefCrateMAE().eval()
    ref.load_state_dict(load_torch(str(ref_dir / "model.safetensors")), strict=True)  # the authors' names, all of them
    ours, (x, noise) = load_model(out)[0], _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ref(x, noise), ours(x, noise)[1], rtol=1e-5, atol=1e-5)
        assert torch.equal(from_pretrained(ref_dir)(x, noise)[1], ours(x, noise)[1])  # the folder loads back too


def test_to_reference_refuses_the_drop_token_layout(tmp_path):
    out = _export(tmp_path, encoder_tokens="visible")
    done = _run([*CLI, str(out), str(tmp_path / "ref")])
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "encoder_tokens: visible" in lines[0] and "encoder_tokens: all" in lines[0], done.stderr
    assert str(out) in lines[0]
    assert not (tmp_path / "ref").exists() and not (tmp_path / "ref.tmp").exists()


def test_to_reference_bad_input_is_one_line(tmp_path):
    out = _export(tmp_path)
    (tmp_path / "taken").mkdir()
    for args, what in (([str(tmp_path / "nothing"), str(tmp_path / "r")], "export.json not found"),
                       ([str(out), str(tmp_path / "taken")], "already exists")):
        done = _run([*CLI, *args])
        assert done.returncode == 2 and what in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert _run(CLI[:-1]).returncode == 2  # no subcommand: usage


def test_damaged_or_foreign_folders_are_named(tmp_path):
    out = _export(tmp_path)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(PretrainedError, match=r"model.safetensors: tensor '.*' .* spans bytes"):
        from_pretrained(out)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        from_pretrained(tmp_path)
    other = _export(tmp_path, seed=1)
    config = json.loads((other / "config.json").read_text())
    config["model_config"]["embed_dim"] = 32
    config["model_config"]["decoder_embed_dim"] = 32
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match="does not fit crate_mae_debug: .*size mismatch"):
        from_pretrained(other)
