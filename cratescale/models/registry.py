"""Named model sizes, `create_model`, and parameter counting (ours and the reference code's)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import MaskedAutoencoder, ModelConfigError
from .crate_mae import CrateMAE
from .vit_mae import ViTMAE


def _crate(d: int, heads: int, depth: int, dec_depth: int | None = None) -> dict[str, Any]:
    return dict(embed_dim=d, num_heads=heads, depth=depth, decoder_embed_dim=d, decoder_num_heads=heads,
                decoder_depth=depth if dec_depth is None else dec_depth)


_DEBUG = dict(img_size=32, patch_size=8)

# The one registry: architectures by their `arch` (what a model's config records) and named sizes on them.
ARCHS: dict[str, type[MaskedAutoencoder]] = {cls.arch: cls for cls in (CrateMAE, ViTMAE)}

# name -> (arch, settings). Sizes from the CRATE-MAE paper / reference code (patch 16, 224 px).
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "crate_mae_debug": ("crate_mae", {**_DEBUG, **_crate(64, 4, 2)}),
    "crate_mae_tiny": ("crate_mae", _crate(384, 6, 12)),
    "crate_mae_small": ("crate_mae", _crate(576, 12, 12)),
    "crate_mae_base": ("crate_mae", _crate(768, 12, 12)),
    "crate_mae_large": ("crate_mae", _crate(1024, 16, 24)),
    "vit_mae_debug": ("vit_mae", {**_DEBUG, "embed_dim": 64, "num_heads": 4, "depth": 2, "decoder_embed_dim": 64,
                                  "decoder_num_heads": 4, "decoder_depth": 2}),
    # The CRATE-MAE paper's comparison model: timm blocks (no qkv bias, LN eps 1e-5), 768-wide decoder.
    "vit_mae_base": ("vit_mae", dict(embed_dim=768, num_heads=12, depth=12, decoder_embed_dim=768,
                                     decoder_num_heads=16, decoder_depth=8, qkv_bias=False, block_norm_eps=1e-5)),
    # FAIR's standard MAE-Base: qkv bias, LN eps 1e-6, 512-wide decoder.
    "vit_mae_base_fair": ("vit_mae", dict(embed_dim=768, num_heads=12, depth=12, decoder_embed_dim=512,
                                          decoder_num_heads=16, decoder_depth=8, qkv_bias=True,
                                          block_norm_eps=1e-6)),
}


def list_models() -> list[str]:
    return list(MODELS)


def model_arch(name: str) -> type[MaskedAutoencoder]:
    """The architecture class a registered name builds."""
    if name not in MODELS:
        raise ModelConfigError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return ARCHS[MODELS[name][0]]


def create_model(name: str, **overrides: Any) -> MaskedAutoencoder:
    """Build a registered model; overrides replace its settings (unknown keys raise ModelConfigError)."""
    return model_arch(name)(name=name, **{**MODELS[name][1], **overrides})


def model_from_config(config: dict[str, Any]) -> MaskedAutoencoder:
    """Rebuild a model from its `model.config` (e.g. stored next to a checkpoint). A config without `arch` (exports
    written before it was recorded) is a registered name plus overrides."""
    rest = {k: v for k, v in config.items() if k not in ("name", "arch")}
    arch = config.get("arch")
    if arch is None and config.get("name") in MODELS:
        return create_model(config["name"], **rest)
    if arch == "classifier":  # models/classifier.py (which imports this module)
        raise ModelConfigError("model config is a fine-tuned classifier's (arch='classifier'), not a masked "
                               "autoencoder's: build it with classifier_from_config")
    if arch not in ARCHS:
        raise ModelConfigError(f"model config has arch={arch!r}, expected one of {', '.join(map(repr, ARCHS))}")
    return ARCHS[arch](name=config.get("name", arch), **rest)


def param_counts(model: nn.Module) -> dict[str, int]:
    """total / trainable parameters, and `reference`: the authors' code's count, which always builds a
    decoder_embed linear (d -> decoder d) even where it is never called."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    reference = total
    if isinstance(model, MaskedAutoencoder) and model.decoder_embed is None:
        d, dd = model.config["embed_dim"], model.config["decoder_embed_dim"]
        reference += d * dd + dd
    return {"total": total, "trainable": trainable, "reference": reference}


def reference_param_count(model: nn.Module) -> int:
    return param_counts(model)["reference"]
