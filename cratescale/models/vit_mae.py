"""ViT-MAE baseline with timm/MAE block and parameter names."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import FINAL_LN_EPS, MaskedAutoencoder
from .layers import ViTBlock

VIT_DEFAULTS: dict[str, Any] = dict(
    img_size=224,
    patch_size=16,
    in_chans=3,
    embed_dim=768,
    depth=12,
    num_heads=12,
    decoder_embed_dim=512,
    decoder_depth=8,
    decoder_num_heads=16,
    mlp_ratio=4.0,
    qkv_bias=True,
    block_norm_eps=1e-6,
    mask_ratio=0.75,
    norm_pix_loss=False,
    encoder_tokens="visible",
)


class ViTMAE(MaskedAutoencoder):
    """MAE with a ViT encoder. Default layout "visible" (MAE's drop-token encoder, with decoder_embed).

    encoder_tokens="all" is the CRATE repository's layout for its ViT comparison: mask tokens enter the
    encoder and the decoder runs on the encoder output; decoder_embed is then never called in that code,
    so it is not built here (and decoder_embed_dim must equal embed_dim).
    """

    arch = "vit_mae"
    defaults = VIT_DEFAULTS

    def __init__(self, name: str = "vit_mae", **kwargs: Any) -> None:
        c = self.settings(name, kwargs)
        super().__init__(c)
        d, dd = c["embed_dim"], c["decoder_embed_dim"]
        ratio, bias, eps = float(c["mlp_ratio"]), bool(c["qkv_bias"]), float(c["block_norm_eps"])
        self.blocks = nn.ModuleList(ViTBlock(d, c["num_heads"], ratio, bias, eps) for _ in range(c["depth"]))
        self.norm = nn.LayerNorm(d, eps=FINAL_LN_EPS)
        self.decoder_embed = nn.Linear(d, dd) if c["encoder_tokens"] == "visible" else None
        self.decoder_blocks = nn.ModuleList(
            ViTBlock(dd, c["decoder_num_heads"], ratio, bias, eps) for _ in range(c["decoder_depth"])
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=FINAL_LN_EPS)
        self.decoder_pred = nn.Linear(dd, c["patch_size"] ** 2 * c["in_chans"])
        self._init_weights()
