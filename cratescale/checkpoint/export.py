"""Consolidated fp32 weights as a zarr v3 group + export.json; loading executes no pickle.

Layout:  out_dir/weights.zarr/<state-dict key>   one array per tensor (floating tensors as float32)
         out_dir/model.safetensors, config.json  the same tensors for other tools (portable.py)
         out_dir/export.json                     format, model_config, provenance, tensors [name, shape,
                                                 dtype, crc32 of the C-order little-endian bytes]; the
                                                 provenance says what the run trained in (precision: bf16 |
                                                 fp32) and that the weights are its fp32 master weights
The export is built in `out_dir.tmp` and renamed, so a visible `out_dir` is always complete; an export
replaced by a newer one (a run trained longer) trades places with it atomically (files.swap_in_dir), and the
new export.json keeps the old one's provenance first in `provenance.history`.

`python -m cratescale.checkpoint.export to-reference EXPORT OUT`: the authors' key layout (portable.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import zarr

from cratescale.checkpoint.commit import Commit, CheckpointError
from cratescale.checkpoint.layout import ds_layout
from cratescale.checkpoint.portable import write_portable
from cratescale.checkpoint.universal import DS_TAG
from cratescale.files import swap_in_dir
from cratescale.models import model_from_config
from cratescale.models.pretrained import read_format_json

FORMAT = "cratescale-weights"
VERSION = 1
WEIGHTS = "weights.zarr"
INDEX = "export.json"


class ExportError(CheckpointError, ValueError):
    """An export is missing, malformed, or does not match its export.json (shape, dtype, checksum)."""


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(np.require(array, requirements="C").reshape(-1).view(np.uint8))


def _to_numpy(name: str, tensor: torch.Tensor) -> np.ndarray:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"export: state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
    t = tensor.detach().to("cpu")
    if t.is_floating_point():
        t = t.float()  # fp32 export (bf16/fp16 widen exactly)
    return t.contiguous().numpy()


def _check_name(name: str) -> None:
    # zarr uses '/' as the hierarchy separator; names starting with '__' are reserved.
    if not name or "/" in name or name.startswith("__") or name in (".", ".."):
        raise ValueError(f"export: state-dict key {name!r} cannot be a zarr array name")


def export_weights(state_dict: Mapping[str, torch.Tensor], model_config: dict[str, Any],
                   provenance: dict[str, Any], out_dir: Path | str, overwrite: bool = False) -> Path:
    """Write `state_dict` (fp32) + metadata to `out_dir`; returns out_dir. Provenance should carry step,
    run_name and config_hash; `time` (unix seconds) is added when absent."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"export: {out} already exists (pass overwrite=True to replace it)")
    provenance = {**provenance, "time": provenance.get("time", time.time())}
    if out.exists():
        provenance["history"] = _history(out)
    header = {"format": FORMAT, "version": VERSION, "model_config": model_config, "provenance": provenance}
    json.dumps(header)  # fail before writing anything when the metadata is not JSON-able
    tmp = out.with_name(f"{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        group = zarr.open_group(store=str(tmp / WEIGHTS), mode="w", zarr_format=3)
        tensors, arrays = [], {}
        for name, tensor in state_dict.items():
            _check_name(name)
            data = arrays[name] = _to_numpy(name, tensor)
            arr = group.create_array(name=name, shape=data.shape, dtype=data.dtype,
                                     chunks=data.shape if data.ndim else (), compressors=None)
            arr[...] = data
            tensors.append({"name": name, "shape": list(data.shape), "dtype": str(data.dtype), "crc32": _crc(data)})
        header["tensors"] = tensors
        write_portable(tmp, arrays, model_config, provenance)
        with open(tmp / INDEX, "w") as f:
            json.dump(header, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        swap_in_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _history(out: Path) -> list[dict[str, Any]]:
    """The provenance of the export being replaced (newest first), with the ones it replaced itself."""
    try:
        old = dict(read_export_header(out)["provenance"])
    except (OSError, ExportError, KeyError):
        return []  # not a readable export: nothing to keep of it
    return [{k: v for k, v in old.items() if k != "history"}, *old.get("history", [])]


def read_export_header(out_dir: Path | str) -> dict[str, Any]:
    """export.json (format, model_config, provenance, tensors) without loading any weights; raises
    FileNotFoundError or ExportError (one line naming the file) when it is not an export of this format."""
    return read_format_json(Path(out_dir) / INDEX, FORMAT, VERSION, ExportError, prefix="export: ",
                            missing="not an export dir?")


def load_export(out_dir: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(state_dict, model_config, provenance) from an export; JSON + zarr only (no pickle), every tensor
    checked against export.json (shape, dtype, crc32). Raises ExportError naming the bad tensor."""
    out = Path(out_dir)
    header = read_export_header(out)
    group = zarr.open_group(store=str(out / WEIGHTS), mode="r", zarr_format=3)
    state: dict[str, torch.Tensor] = {}
    for entry in header["tensors"]:
        name = entry["name"]
        try:
            data = np.asarray(group[name][...])
        except KeyError as exc:
            raise ExportError(f"export: tensor {name!r} listed in {out / INDEX} is missing from {WEIGHTS}") from exc
        if list(data.shape) != entry["shape"] or str(data.dtype) != entry["dtype"]:
            raise ExportError(f"export: tensor {name!r} in {out / WEIGHTS} is {data.dtype}{list(data.shape)}, "
                              f"export.json says {entry['dtype']}{entry['shape']}")
        crc = _crc(data)
        if crc != entry["crc32"]:
            raise ExportError(f"export: tensor {name!r} in {out / WEIGHTS} fails its checksum "
                              f"(crc32 {crc:08x} != {entry['crc32']:08x}): the data was modified or damaged")
        state[name] = torch.from_numpy(np.require(data, requirements=["C", "W"]))  # keeps 0-d shape
    return state, header["model_config"], header["provenance"]


def load_model(out_dir: Path | str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, provenance + model_config) from an export: the weights through load_export (no
    pickle), the architecture from the export's model_config."""
    state, config, provenance = load_export(out_dir)
    model = model_from_config(config)
    model.load_state_dict(state)
    return model.eval().to(device), {"export": str(Path(out_dir).resolve()), **provenance, "model_config": config}


def holds_commit(out_dir: Path | str, commit: Commit) -> bool:
    """The export holds this commit's weights already (its step, checkpoint and identity)."""
    try:
        made = read_export_header(out_dir)["provenance"]
    except (OSError, ExportError):
        return False
    return (made.get("step"), made.get("checkpoint"), made.get("config_hash")) == \
        (commit.step, str(commit.path), commit.meta.get("config_hash"))


def export_fingerprint(out_dir: Path | str) -> str:
    """sha256 of export.json, which lists every tensor's crc32: what a store records of the export it came from."""
    return hashlib.sha256((Path(out_dir) / INDEX).read_bytes()).hexdigest()


def _module_states(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The module entry of the (single, ZeRO 0-2) model states file."""
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    # Our own checkpoint, written by this run's DeepSpeed engine (DeepSpeed's format needs full unpickling).
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"]  # trusted: own DS checkpoint


def _stage0_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    module = _module_states(tag_dir)
    low = sorted(k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32)
    if low:
        # ZeRO-0 under bf16 keeps the fp32 master copy in its optimizer state as unnamed flat groups: the
        # module here is the bf16-rounded copy, which must not pass for fp32 weights.
        raise ExportError(f"consolidate: {tag_dir} holds {module[low[0]].dtype} weights ({low[0]}, ...) and no "
                          f"ZeRO optimizer partitions with the fp32 master weights; export a bf16 run trained "
                          f"with ZeRO 1-3 (parallel.zero_stage), or an fp32 run")
    return dict(module)


@dataclass(frozen=True)
class Consolidated:
    state_dict: dict[str, torch.Tensor]  # fp32 master weights (plus buffers), full tensors
    precision: str                       # what the run trained in: "bf16" | "fp32"
    zero_stages: str                     # "0", "1-2" or "3" (1 and 2 share one layout)


def consolidate(commit: Commit) -> Consolidated:
    """The full fp32 master weights of a committed DeepSpeed checkpoint: ZeRO 1-3 (fp32 or bf16) through
    DeepSpeed's own zero_to_fp32 over the optimizer partitions, ZeRO-0 fp32 from the model states. The layout
    is read from the file names (checkpoint/layout.py); one it does not know is an error listing the files."""
    tag_dir = commit.path / DS_TAG
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"consolidate: checkpoint step {commit.step} has no {tag_dir}")
    layout = ds_layout(tag_dir)
    if not layout.partitioned:
        return Consolidated(_stage0_state_dict(tag_dir), "fp32", layout.stages)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(commit.path), tag=DS_TAG)
    if not layout.zero3:
        _add_frozen(state, tag_dir)
    return Consolidated({k: v.contiguous() for k, v in state.items()}, str(layout.precision), layout.stages)


def _add_frozen(state: dict[str, torch.Tensor], tag_dir: Path) -> None:
    """ZeRO-1 saves no frozen parameters with its partitions (DeepSpeed 0.19 does for ZeRO 2-3 only), so
    zero_to_fp32 leaves out e.g. the fixed sin-cos position tables. They are never trained: the model states'
    copy is their value (widened; in a bf16 run the bf16 value the run computed with, as ZeRO 2-3 give it)."""
    module = _module_states(tag_dir)
    for name, tensor in module.items():
        if name not in state:
            state[name] = tensor.float() if tensor.is_floating_point() else tensor


def consolidate_fp32(commit: Commit) -> dict[str, torch.Tensor]:
    """`consolidate(commit).state_dict`."""
    return consolidate(commit).state_dict


def training_provenance(found: Consolidated) -> dict[str, str]:
    """What export.json says about the weights' origin."""
    return {"precision": found.precision, "zero_stages": found.zero_stages, "weights": "fp32 master"}



if __name__ == "__main__":
    from cratescale.checkpoint.portable import main

    sys.exit(main())
