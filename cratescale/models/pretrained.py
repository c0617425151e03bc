"""`from_pretrained(DIR)`: a model from an export folder's `config.json` + `model.safetensors`.

Either folder loads: an export (our key names) or the output of `python -m cratescale.checkpoint.export
to-reference` (the authors' key names; config.json says which). The safetensors file is read here with torch and
the standard library only: models/ imports nothing else (tests/unit/test_imports.py), and loading then needs no
DeepSpeed, Ray, DALI, zarr, nor the safetensors package. The format is small and fixed: an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import torch

from .base import MaskedAutoencoder
from .reference import load_reference_state_dict
from .registry import model_from_config

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CONFIG_FORMAT = "cratescale-pretrained"
CONFIG_VERSION = 1
KEY_NAMES = ("cratescale", "reference")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_MAX_HEADER = 100 * 2**20  # the format's own limit; a larger length field is a damaged or foreign file


class PretrainedError(ValueError):
    """A pretrained folder is missing a file, or its config.json / model.safetensors is malformed."""


def read_safetensors(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, the header's __metadata__) of a safetensors file; raises PretrainedError naming the file (and the
    tensor) when it is not a well-formed one."""
    path = Path(path)
    if sys.byteorder != "little":  # the bytes are little-endian; torch.frombuffer reads native order
        raise PretrainedError(f"{path}: reading safetensors here needs a little-endian machine")
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise PretrainedError(f"{path} not found (not a pretrained folder?)") from exc
    if len(data) < 8:
        raise PretrainedError(f"{path}: {len(data)} bytes, too short for a safetensors file")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(_MAX_HEADER, len(data) - 8):
        raise PretrainedError(f"{path}: header length {size} does not fit the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + size])
    except ValueError as exc:
        raise PretrainedError(f"{path}: the header is not JSON ({exc})") from exc
    body = memoryview(bytearray(data[8 + size:]))  # writable: tensors share it without a copy per tensor
    meta = header.pop("__metadata__", {}) or {}
    return {name: _tensor(path, name, entry, body) for name, entry in header.items()}, meta


def _tensor(path: Path, name: str, entry: Any, body: memoryview) -> torch.Tensor:
    try:
        dtype, shape, (begin, end) = _DTYPES[entry["dtype"]], [int(s) for s in entry["shape"]], entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as exc:
        raise PretrainedError(f"{path}: tensor {name!r} has a malformed entry {entry!r}") from exc
    numel = 1
    for s in shape:
        numel *= s
    want = numel * torch.empty((), dtype=dtype).element_size()
    if not 0 <= begin <= end <= len(body) or end - begin != want:
        raise PretrainedError(f"{path}: tensor {name!r} ({entry['dtype']}{shape}) spans bytes [{begin}, {end}) of "
                              f"{len(body)}, needs {want}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(body, dtype=dtype, count=numel, offset=begin).reshape(shape)


def read_format_json(path: Path, fmt: str, version: int, error: type[Exception], prefix: str = "",
                     missing: str = "") -> dict[str, Any]:
    """A JSON file that names its format and version (export.json, config.json); FileNotFoundError when absent,
    `error` when it is not JSON or another format, each one line naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{prefix}{path} not found ({missing})") from exc
    except ValueError as exc:
        raise error(f"{prefix}{path} is not valid JSON: {exc}") from exc
    if data.get("format") != fmt or data.get("version") != version:
        raise error(f"{prefix}{path} has format {data.get('format')!r} v{data.get('version')}, "
                    f"expected {fmt!r} v{version}")
    return data


def read_config(folder: Path | str) -> dict[str, Any]:
    """A pretrained folder's config.json, checked for format and key names."""
    path = Path(folder) / CONFIG
    config = read_format_json(path, CONFIG_FORMAT, CONFIG_VERSION, PretrainedError,
                              missing="not an export or to-reference folder?")
    if config.get("key_names") not in KEY_NAMES:
        raise PretrainedError(f"{path}: key_names {config.get('key_names')!r}, expected one of {KEY_NAMES}")
    return config


def from_pretrained(folder: Path | str, device: str | torch.device = "cpu") -> MaskedAutoencoder:
    """The model of an export (or to-reference) folder in eval mode: the architecture from config.json, the fp32
    weights from model.safetensors. A weight that does not fit the architecture is an error naming it."""
    folder = Path(folder)
    config = read_config(folder)
    state, _ = read_safetensors(folder / config.get("weights", WEIGHTS))
    model = model_from_config(config["model_config"])
    if config["key_names"] == "reference":
        load_reference_state_dict(model, state)
    else:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise PretrainedError(f"{folder / WEIGHTS} does not fit {config['model_config'].get('name')}: "
                                  + " ".join(str(exc).split())) from exc
    return model.eval().to(device)
