"""CRATE-MAE: white-box masked autoencoder (MSSA + ISTA encoder layers, inverted decoder layers)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import FINAL_LN_EPS, MaskedAutoencoder
from .layers import CrateDecoderLayer, CrateEncoderLayer

CRATE_DEFAULTS: dict[str, Any] = dict(
    img_size=224,
    patch_size=16,
    in_chans=3,
    embed_dim=768,
    depth=12,
    num_heads=12,
    decoder_embed_dim=768,
    decoder_depth=12,
    decoder_num_heads=12,
    mask_ratio=0.75,
    lambd=0.5,
    eta=0.1,
    norm_pix_loss=False,
    encoder_tokens="all",
)


class CrateMAE(MaskedAutoencoder):
    """CRATE-MAE in the reference layout by default (mask tokens enter the encoder).

    With encoder_tokens="visible" the encoder runs on cls + visible patches and the decoder gets the mask
    tokens; a decoder_embed linear exists only then and only when decoder_embed_dim != embed_dim, so with
    equal widths both layouts have the same parameters and load the same checkpoints.
    """

    arch = "crate_mae"
    defaults = CRATE_DEFAULTS

    def __init__(self, name: str = "crate_mae", **kwargs: Any) -> None:
        c = self.settings(name, kwargs)
        super().__init__(c)
        d, dd = c["embed_dim"], c["decoder_embed_dim"]
        eta, lambd = float(c["eta"]), float(c["lambd"])
        self.blocks = nn.ModuleList(
            CrateEncoderLayer(d, c["num_heads"], eta, lambd) for _ in range(c["depth"])
        )
        self.norm = nn.LayerNorm(d, eps=FINAL_LN_EPS)
        self.decoder_embed = nn.Linear(d, dd) if dd != d else None
        self.decoder_blocks = nn.ModuleList(
            CrateDecoderLayer(dd, c["decoder_num_heads"]) for _ in range(c["decoder_depth"])
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=FINAL_LN_EPS)
        self.decoder_pred = nn.Linear(dd, c["patch_size"] ** 2 * c["in_chans"])
        self._init_weights()
