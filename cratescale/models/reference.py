"""Checkpoint key mapping between the authors' CRATE-MAE code (and MAE/timm for ViT-MAE) and ours.

Our ViT-MAE uses timm/MAE names already, so its mapping is the identity. Reference CRATE blocks wrap each
sub-layer as `layers.0.<j>.{norm,fn}`; the tables below rename them. The reference `decoder_embed` is built
but never called, so it is ignored on load unless our model has one.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import nn

from .base import MaskedAutoencoder

# (our key pattern, reference key template); \1 is the block index.
_CRATE_RULES: list[tuple[str, str]] = [
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"blocks.\1.layers.0.0.norm.\2"),
    (r"blocks\.(\d+)\.mssa\.u\.weight", r"blocks.\1.layers.0.0.fn.qkv.weight"),
    (r"blocks\.(\d+)\.mssa\.proj\.(weight|bias)", r"blocks.\1.layers.0.0.fn.to_out.0.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.layers.0.1.norm.\2"),
    (r"blocks\.(\d+)\.ista\.weight", r"blocks.\1.layers.0.1.fn.weight"),
    (r"decoder_blocks\.(\d+)\.norm1\.(weight|bias)", r"decoder_blocks.\1.layers.0.0.norm.\2"),
    (r"decoder_blocks\.(\d+)\.linear\.weight", r"decoder_blocks.\1.layers.0.0.fn.weight"),
    (r"decoder_blocks\.(\d+)\.norm2\.(weight|bias)", r"decoder_blocks.\1.layers.0.1.norm.\2"),
    (r"decoder_blocks\.(\d+)\.mssa\.u\.weight", r"decoder_blocks.\1.layers.0.1.fn.qkv.weight"),
    (r"decoder_blocks\.(\d+)\.mssa\.proj\.(weight|bias)", r"decoder_blocks.\1.layers.0.1.fn.to_out.0.\2"),
]
_LIST_LIMIT = 6


class ReferenceLoadError(ValueError):
    """A reference state dict does not fit the model (missing, unexpected or misshapen tensors)."""


def _is_crate(model: nn.Module) -> bool:
    return isinstance(model, MaskedAutoencoder) and model.arch == "crate_mae"


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, template in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    return key


def _to_ref_key(model: nn.Module, ours: str) -> str:
    return _rename(ours, _CRATE_RULES) if _is_crate(model) else ours


def _unwrap(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, Mapping):
        raise ReferenceLoadError(f"reference checkpoint is a {type(state_dict).__name__}, expected a dict of tensors")
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    out = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if not isinstance(value, torch.Tensor):
            raise ReferenceLoadError(f"reference checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


def _listing(label: str, items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT]) + (f", ... (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")
    return f"{label} ({len(items)}): {shown}"


def load_reference_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Load the authors' checkpoint (plain, {"model": ...}-wrapped, or with "module." prefixes) into `model`.

    Raises ReferenceLoadError naming missing, unexpected and misshapen keys (reference names), loading
    nothing in that case. Returns {"loaded": count, "ignored": [reference keys skipped]}.
    """
    ref = _unwrap(state_dict)
    ours = model.state_dict()
    to_ref = {k: _to_ref_key(model, k) for k in ours}
    from_ref = {v: k for k, v in to_ref.items()}
    ignored = [k for k in ref if k.startswith("decoder_embed.") and k not in from_ref]
    missing = [to_ref[k] for k in ours if to_ref[k] not in ref]
    unexpected = [k for k in ref if k not in from_ref and k not in ignored]
    misshapen = [
        f"{k} {tuple(ref[k].shape)} vs model {tuple(ours[from_ref[k]].shape)}"
        for k in ref
        if k in from_ref and tuple(ref[k].shape) != tuple(ours[from_ref[k]].shape)
    ]
    problems = [
        _listing(label, items)
        for label, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
        if items
    ]
    if problems:
        name = getattr(model, "config", {}).get("name", type(model).__name__)
        raise ReferenceLoadError(f"reference checkpoint does not fit {name}: " + "; ".join(problems))
    model.load_state_dict({from_ref[k]: v for k, v in ref.items() if k in from_ref}, strict=True)
    return {"loaded": len(from_ref), "ignored": ignored}


def to_reference_state_dict(model: nn.Module, include_unused: bool = True) -> dict[str, torch.Tensor]:
    """Our weights under the authors' key names. With include_unused, a zero `decoder_embed` is added when
    our model has none, so the authors' code can load the result strictly."""
    out = {_to_ref_key(model, k): v.detach().clone() for k, v in model.state_dict().items()}
    if include_unused and isinstance(model, MaskedAutoencoder) and model.decoder_embed is None:
        d, dd = model.config["embed_dim"], model.config["decoder_embed_dim"]
        out["decoder_embed.weight"] = torch.zeros(dd, d)
        out["decoder_embed.bias"] = torch.zeros(dd)
    return out
