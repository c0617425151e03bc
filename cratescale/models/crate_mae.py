"""CRATE-MAE: white-box masked autoencoder (MSSA + ISTA encoder layers, inverted decoder layers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .base import FINAL_LN_EPS, MAESettings, MaskedAutoencoder
from .layers import CrateDecoderLayer, CrateEncoderLayer

@dataclass(frozen=True)
class CrateSettings(MAESettings):
    lambd: float = 0.5  # ISTA sparsity weight
    eta: float = 0.1    # ISTA step size


class CrateMAE(MaskedAutoencoder):
    """CRATE-MAE in the reference layout by default (mask tokens enter the encoder).

    With encoder_tokens="visible" the encoder runs on cls + visible patches and the decoder gets the mask
    tokens; a decoder_embed linear exists only then and only when decoder_embed_dim != embed_dim, so with
    equal widths both layouts have the same parameters and load the same checkpoints.
    """

    arch = "crate_mae"
    Settings = CrateSettings

    def __init__(self, name: str = "crate_mae", **kwargs: Any) -> None:
        s: CrateSettings = self.settings(name, kwargs)
        super().__init__(name, s)
        d, dd = s.embed_dim, s.decoder_embed_dim
        self.blocks = nn.ModuleList(
            CrateEncoderLayer(d, s.num_heads, float(s.eta), float(s.lambd)) for _ in range(s.depth)
        )
        self.norm = nn.LayerNorm(d, eps=FINAL_LN_EPS)
        self.decoder_embed = nn.Linear(d, dd) if dd != d else None
        self.decoder_blocks = nn.ModuleList(CrateDecoderLayer(dd, s.decoder_num_heads) for _ in range(s.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=FINAL_LN_EPS)
        self.decoder_pred = nn.Linear(dd, s.patch_size ** 2 * s.in_chans)
        self._init_weights()
