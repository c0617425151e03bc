"""What an export hands to other tools: `model.safetensors` + `config.json`, and the authors' key layout.

Every export (export.py) also writes, beside weights.zarr and export.json:
  model.safetensors   the same fp32 tensors, our key names (bitwise the zarr arrays)
  config.json         format, arch, name, token_layout (the model's encoder_tokens), key_names, model_config,
                      provenance; `cratescale.models.from_pretrained(DIR)` reads these two with torch alone

`python -m cratescale.checkpoint.export to-reference EXPORT OUT` writes OUT/model.safetensors under the authors'
key names (models/reference.py) and OUT/config.json (key_names: reference). The authors' CRATE code runs the
reference token layout (mask tokens enter the encoder, encoder_tokens: all): weights trained with MAE's
drop-token layout (encoder_tokens: visible, jobs/cifar10.yaml) load into it without a shape error and compute
something else, so such an export is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import save_file

from cratescale.files import fsync_path
from cratescale.models import to_reference_state_dict
from cratescale.models.pretrained import CONFIG, CONFIG_FORMAT, CONFIG_VERSION, WEIGHTS

# The token layout each architecture's reference code runs: the authors' CRATE-MAE feeds mask tokens to the
# encoder; ViT-MAE's reference (FAIR's MAE, timm names) drops them.
REFERENCE_TOKENS = {"crate_mae": "all", "vit_mae": "visible"}


class ReferenceLayoutError(ValueError):
    """An export whose token layout the authors' code does not run."""


def pretrained_config(model_config: Mapping[str, Any], provenance: Mapping[str, Any],
                      key_names: str = "cratescale") -> dict[str, Any]:
    """config.json: what the weights are (architecture, sizes, token layout, key names) and where they came from."""
    return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "arch": model_config.get("arch"),
            "name": model_config.get("name"), "token_layout": model_config.get("encoder_tokens"),
            "key_names": key_names, "weights": WEIGHTS, "dtype": "float32", "model_config": dict(model_config),
            "provenance": dict(provenance)}


def write_portable(folder: Path, arrays: Mapping[str, np.ndarray], model_config: Mapping[str, Any],
                   provenance: Mapping[str, Any], key_names: str = "cratescale") -> None:
    """model.safetensors + config.json into `folder` (a tmp folder the caller renames), both fsynced."""
    # safetensors' "format: pt" tells Hugging Face tools these are torch tensors.
    save_file({k: np.require(v, requirements="C") for k, v in arrays.items()}, str(folder / WEIGHTS),  # keeps 0-d
              metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(pretrained_config(model_config, provenance, key_names), indent=1))
    for name in (WEIGHTS, CONFIG):
        fsync_path(folder / name)


def to_reference(export_dir: Path | str, out_dir: Path | str) -> Path:
    """Write the export's weights under the authors' key names to `out_dir` (built in out_dir.tmp, renamed).
    Raises ReferenceLayoutError for a token layout the authors' code does not run, FileExistsError for an
    existing `out_dir`."""
    from cratescale.checkpoint.export import export_fingerprint, load_model

    export, out = Path(export_dir), Path(out_dir)
    if out.exists():
        raise FileExistsError(f"to-reference: {out} already exists; name a new folder")
    model, info = load_model(export)
    config = model.config  # complete (arch included) also for an export that recorded a name only
    arch, tokens = config.get("arch"), config.get("encoder_tokens")
    want = REFERENCE_TOKENS.get(arch)
    if want is None:
        raise ReferenceLayoutError(f"to-reference: {export} holds a {arch!r} model; the reference layouts are "
                                   f"{', '.join(REFERENCE_TOKENS)}")
    if tokens != want:
        raise ReferenceLayoutError(
            f"to-reference: {export} was trained with encoder_tokens: {tokens}; the authors' {arch} code runs "
            f"encoder_tokens: {want}, where these weights compute something else: not written")
    arrays = {k: v.float().contiguous().numpy() for k, v in to_reference_state_dict(model).items()}
    provenance = {k: v for k, v in info.items() if k not in ("model_config", "export")}
    provenance.update(from_export=str(export.resolve()), export_fingerprint=export_fingerprint(export))
    tmp = out.with_name(f"{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_portable(tmp, arrays, config, provenance, key_names="reference")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(out.parent)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m cratescale.checkpoint.export to-reference EXPORT OUT`."""
    from cratescale.checkpoint.export import ExportError

    p = argparse.ArgumentParser(prog="python -m cratescale.checkpoint.export")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("to-reference", help="the export's weights under the authors' key names (safetensors)")
    r.add_argument("export", help="an export folder (export.json, weights.zarr)")
    r.add_argument("out", help="a new folder for model.safetensors + config.json")
    args = p.parse_args(argv)
    try:
        out = to_reference(args.export, args.out)
    except (ReferenceLayoutError, ExportError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0
