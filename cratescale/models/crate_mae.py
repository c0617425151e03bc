"""CRATE-MAE: white-box masked autoencoder (MSSA + ISTA encoder layers, inverted decoder layers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import MAESettings, MaskedAutoencoder
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
        self._build(lambda: CrateEncoderLayer(s.embed_dim, s.num_heads, float(s.eta), float(s.lambd)),
                    lambda: CrateDecoderLayer(s.decoder_embed_dim, s.decoder_num_heads),
                    decoder_embed=s.decoder_embed_dim != s.embed_dim)
