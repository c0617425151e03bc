"""A registry encoder (CRATE-MAE or ViT-MAE) with MAE's fine-tuning head, for fine-tuning and prediction.

The head is FAIR MAE's `models_vit` with `global_pool=True`: the mean of the patch tokens after the last block ->
LayerNorm (`fc_norm`, eps 1e-6) -> Linear(num_classes), head weight trunc_normal(std 2e-5), bias 0. As there,
the pretrained model's final `norm` is not used (the pooled feature gets its own fresh `fc_norm`), and the
decoder, the mask token and the decoder positions are dropped: what is left is the encoder, under the names timm's
ViT uses (`patch_embed`, `cls_token`, `pos_embed`, `blocks.<i>`), which the layer-wise learning-rate decay reads.

`self.config` ({"arch": "classifier", "encoder": <the MAE's config>, "num_classes", "class_names", "drop_path"})
is what a fine-tuned export stores and `classifier_from_config` rebuilds from.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .base import FINAL_LN_EPS, MaskedAutoencoder, ModelConfigError, ModelInputError
from .registry import model_from_config

ARCH = "classifier"
# MAE main_finetune: trunc_normal_(model.head.weight, std=2e-5); its bounds are absolute (+-2), so in effect a normal.
HEAD_INIT_STD = 2e-5


def drop_path_rates(depth: int, rate: float) -> list[float]:
    """Stochastic depth per block, rising linearly from 0 to `rate` (MAE/timm: torch.linspace(0, rate, depth))."""
    if not 0.0 <= rate < 1.0:
        raise ModelConfigError(f"drop_path={rate} must be in [0, 1)")
    return [float(r) for r in torch.linspace(0.0, rate, depth)]


def set_drop_path(blocks: Sequence[nn.Module], rate: float) -> None:
    """Give each block its stochastic-depth probability (a plain attribute: no parameter or state-dict key)."""
    for block, p in zip(blocks, drop_path_rates(len(blocks), rate)):
        block.drop_prob = p


class Classifier(nn.Module):
    """images (B, C, H, W), normalized -> logits (B, num_classes)."""

    def __init__(self, encoder: MaskedAutoencoder, num_classes: int, class_names: Sequence[str] | None = None,
                 drop_path: float = 0.0, head_seed: int = 0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ModelConfigError(f"classifier: num_classes={num_classes} must be at least 1")
        names = [str(c) for c in (class_names if class_names is not None else range(num_classes))]
        if len(names) != num_classes or len(set(names)) != num_classes:
            raise ModelConfigError(f"classifier: {len(names)} class names ({len(set(names))} distinct) for "
                                   f"num_classes={num_classes}")
        cfg = encoder.config
        self.config: dict[str, Any] = {"arch": ARCH, "encoder": dict(cfg), "num_classes": int(num_classes),
                                       "class_names": names, "drop_path": float(drop_path)}
        self.img_size, self.in_chans, self.num_patches = encoder.img_size, encoder.in_chans, encoder.num_patches
        # The encoder's own modules, taken over (not copied): the weights stay the pretrained ones.
        self.patch_embed, self.cls_token, self.pos_embed = encoder.patch_embed, encoder.cls_token, encoder.pos_embed
        self.blocks = encoder.blocks
        set_drop_path(self.blocks, float(drop_path))
        self.fc_norm = nn.LayerNorm(cfg["embed_dim"], eps=FINAL_LN_EPS)
        # skip_init: no draw from the global RNG (the caller's stream stays as it was); the head's own generator
        # gives both fine-tuning arms the same head whatever their encoders consumed.
        self.head = nn.utils.skip_init(nn.Linear, cfg["embed_dim"], num_classes)
        generator = torch.Generator().manual_seed(int(head_seed))
        with torch.no_grad():
            nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD, generator=generator)
            nn.init.zeros_(self.head.bias)
        self.train()  # the encoder may come in eval mode (an export's load_model): one mode for every module

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All 1+L tokens with positions, as MaskedAutoencoder._tokens_all(images, None) assembles them."""
        want = (self.in_chans, self.img_size, self.img_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ModelInputError(f"classifier: images have shape {tuple(images.shape)}, expected (B, *{want})")
        x = self.patch_embed(images.to(self.patch_embed.proj.weight.dtype)) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled, normed feature the head reads: fc_norm(mean of the last block's patch tokens), (B, d)."""
        x = self.tokens(images)
        for block in self.blocks:
            x = block(x)
        return self.fc_norm(x[:, 1:].mean(dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def from_encoder(encoder: MaskedAutoencoder, num_classes: int, class_names: Sequence[str] | None = None,
                 drop_path: float = 0.0, head_seed: int = 0) -> Classifier:
    """The pretrained arm: `encoder`'s weights (its decoder, final norm and mask token are left behind)."""
    if not isinstance(encoder, MaskedAutoencoder):
        raise ModelConfigError(f"classifier: the encoder must be a registry model, got {type(encoder).__name__}")
    return Classifier(encoder, num_classes, class_names, drop_path, head_seed)


def scratch_classifier(encoder_config: dict[str, Any], num_classes: int, class_names: Sequence[str] | None = None,
                       drop_path: float = 0.0, seed: int = 0) -> Classifier:
    """The scratch arm: the same architecture at its initialization. The encoder is built after
    torch.manual_seed(seed), as training's build_model and the init baseline build it, so with the job's seed it
    starts where pretraining started; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        encoder = model_from_config(encoder_config)
    return Classifier(encoder, num_classes, class_names, drop_path, head_seed=seed)


def classifier_from_config(config: dict[str, Any]) -> Classifier:
    """The architecture a classifier's `config` describes (weights at init: load a state dict into it)."""
    if config.get("arch") != ARCH:
        raise ModelConfigError(f"model config has arch={config.get('arch')!r}, not a classifier ({ARCH!r})")
    missing = sorted({"encoder", "num_classes", "class_names"} - set(config))
    if missing:
        raise ModelConfigError(f"classifier config lacks {missing}")
    return scratch_classifier(config["encoder"], int(config["num_classes"]), config["class_names"],
                              float(config.get("drop_path", 0.0)))
