"""Analytic FLOPs from the architecture: 2 x multiply-adds of every matmul, attention scores and
attention-weighted values included; norms, softmax and activations left out (as MFU accounting does).
Training = 3 x forward (backward costs twice the forward)."""

from __future__ import annotations

from torch import nn

from .base import MaskedAutoencoder
from .classifier import Classifier


def _crate_encoder_layer_macs(n: int, d: int) -> int:
    # U, output projection, two ISTA matmuls: 4 n d^2; scores + values: 2 n^2 d
    return 4 * n * d * d + 2 * n * n * d


def _crate_decoder_layer_macs(n: int, d: int) -> int:
    # W_dec, U, output projection: 3 n d^2; scores + values: 2 n^2 d
    return 3 * n * d * d + 2 * n * n * d


def _vit_block_macs(n: int, d: int, mlp_ratio: float) -> int:
    # qkv 3 n d^2, projection n d^2, MLP 2 * ratio * n d^2; scores + values 2 n^2 d
    return int((4 + 2 * mlp_ratio) * n * d * d) + 2 * n * n * d


def classifier_macs_per_image(model: Classifier) -> int:
    """A fine-tuning classifier: the patch embedding and every encoder block over all 1 + L tokens (nothing is
    masked), then the head on the pooled token."""
    c = model.config["encoder"]
    length, pixels, d = model.num_patches, c["patch_size"] ** 2 * c["in_chans"], c["embed_dim"]
    n = 1 + length
    if c["arch"] == "crate_mae":
        blocks = c["depth"] * _crate_encoder_layer_macs(n, d)
    else:
        blocks = c["depth"] * _vit_block_macs(n, d, float(c["mlp_ratio"]))
    return length * pixels * d + blocks + d * model.config["num_classes"]


def forward_macs_per_image(model: nn.Module) -> int:
    """Multiply-adds of one forward pass for one image in the model's token layout."""
    if isinstance(model, Classifier):
        return classifier_macs_per_image(model)
    if not isinstance(model, MaskedAutoencoder):
        raise TypeError(f"forward_macs_per_image: expected a cratescale MAE model, got {type(model).__name__}")
    c = model.config
    length, pixels = model.num_patches, c["patch_size"] ** 2 * c["in_chans"]
    d, dd = c["embed_dim"], c["decoder_embed_dim"]
    n_enc = 1 + (length if model.encoder_tokens == "all" else model.len_keep)
    n_dec = 1 + length
    macs = length * pixels * d  # patch embedding
    if model.arch == "crate_mae":
        macs += c["depth"] * _crate_encoder_layer_macs(n_enc, d)
        macs += c["decoder_depth"] * _crate_decoder_layer_macs(n_dec, dd)
    else:
        macs += c["depth"] * _vit_block_macs(n_enc, d, float(c["mlp_ratio"]))
        macs += c["decoder_depth"] * _vit_block_macs(n_dec, dd, float(c["mlp_ratio"]))
    if model.decoder_embed is not None:
        macs += n_enc * d * dd
    macs += length * dd * pixels  # prediction head (cls dropped first)
    return macs


def forward_flops_per_image(model: nn.Module) -> float:
    return 2.0 * forward_macs_per_image(model)


def train_flops_per_image(model: nn.Module) -> float:
    """Forward + backward FLOPs per image (3 x forward)."""
    return 3.0 * forward_flops_per_image(model)
