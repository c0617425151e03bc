"""ViT-MAE baseline with timm/MAE block and parameter names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import MAESettings, MaskedAutoencoder
from .layers import ViTBlock


@dataclass(frozen=True)
class ViTSettings(MAESettings):
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    encoder_tokens: str = "visible"
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    block_norm_eps: float = 1e-6


class ViTMAE(MaskedAutoencoder):
    """MAE with a ViT encoder. Default layout "visible" (MAE's drop-token encoder, with decoder_embed).

    encoder_tokens="all" is the CRATE repository's layout for its ViT comparison: mask tokens enter the
    encoder and the decoder runs on the encoder output; decoder_embed is then never called in that code,
    so it is not built here (and decoder_embed_dim must equal embed_dim).
    """

    arch = "vit_mae"
    Settings = ViTSettings

    def __init__(self, name: str = "vit_mae", **kwargs: Any) -> None:
        s: ViTSettings = self.settings(name, kwargs)
        super().__init__(name, s)
        ratio, bias, eps = float(s.mlp_ratio), s.qkv_bias, float(s.block_norm_eps)
        self._build(lambda: ViTBlock(s.embed_dim, s.num_heads, ratio, bias, eps),
                    lambda: ViTBlock(s.decoder_embed_dim, s.decoder_num_heads, ratio, bias, eps),
                    decoder_embed=s.encoder_tokens == "visible")
