"""What CRATE-MAE and ViT-MAE share: patch/position embedding, masking, the two token layouts, the
loss, patchify, and `encode` for downstream features.

Token layouts (`encoder_tokens`):
- "all" (the CRATE reference code's layout, the default for CRATE-MAE): mask tokens replace the removed
  patches BEFORE the encoder, positions are added to all 1+L tokens, and the decoder runs directly on the
  encoder output (no decoder_embed, no second mask-token insertion, no decoder positions).
- "visible" (MAE's drop-token encoder): the encoder sees cls + the kept patches only; the decoder input is
  decoder_embed(latent) (when present) with mask tokens put back and decoder positions added.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .layers import PatchEmbed, init_mae_weights, random_masking, sincos_pos_embed_2d

FINAL_LN_EPS = 1e-6  # model-level norms (norm, decoder_norm)
LAYOUTS = ("all", "visible")


class ModelConfigError(ValueError):
    """A model was asked for with inconsistent or unknown settings."""


class ModelInputError(ValueError):
    """Images or mask noise of the wrong shape were passed to a model."""


@dataclass(frozen=True)
class MAESettings:
    """What every masked autoencoder here takes; an architecture subclasses it with its own fields and defaults."""
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 12
    decoder_num_heads: int = 12
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    encoder_tokens: str = "all"


def _fits(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else kind)


class MaskedAutoencoder(nn.Module):
    """Base class; subclasses build blocks, norm, decoder_embed (or None), decoder_blocks,
    decoder_norm, decoder_pred, then call `_init_weights()`. `self.config` (the settings plus name and arch, a
    plain dict) is what exports store and `registry.model_from_config` rebuilds from."""

    arch = ""
    Settings: type[MAESettings] = MAESettings

    @classmethod
    def settings(cls, name: str, overrides: dict[str, Any]) -> MAESettings:
        """The defaults with `overrides` applied; an unknown setting or a value of the wrong type is an error that
        names it."""
        kinds = typing.get_type_hints(cls.Settings)
        unknown = sorted(set(overrides) - set(kinds))
        if unknown:
            raise ModelConfigError(f"{name}: unknown {cls.__name__} settings {unknown}; known: {sorted(kinds)}")
        for key, value in overrides.items():
            if not _fits(value, kinds[key]):
                raise ModelConfigError(f"{name}: {key}={value!r} must be {kinds[key].__name__}")
        return cls.Settings(**overrides)

    def __init__(self, name: str, s: MAESettings) -> None:
        super().__init__()
        self.config = {**asdict(s), "name": name, "arch": self.arch}
        if s.encoder_tokens not in LAYOUTS:
            raise ModelConfigError(f"{name}: encoder_tokens={s.encoder_tokens!r}, expected one of {LAYOUTS}")
        if s.encoder_tokens == "all" and s.decoder_embed_dim != s.embed_dim:
            raise ModelConfigError(
                f"{name}: encoder_tokens='all' runs the decoder on the encoder output, so decoder_embed_dim "
                f"({s.decoder_embed_dim}) must equal embed_dim ({s.embed_dim})"
            )
        if not 0.0 < float(s.mask_ratio) < 1.0:
            raise ModelConfigError(f"{name}: mask_ratio={s.mask_ratio} must be in (0, 1)")
        if s.img_size % s.patch_size:
            raise ModelConfigError(f"{name}: img_size {s.img_size} is not a multiple of patch_size {s.patch_size}")
        d, dd = s.embed_dim, s.decoder_embed_dim
        self.patch_embed = PatchEmbed(s.img_size, s.patch_size, s.in_chans, d)
        self.img_size = s.img_size
        self.patch_size = s.patch_size
        self.in_chans = s.in_chans
        self.num_patches = self.patch_embed.num_patches
        self.mask_ratio = float(s.mask_ratio)
        self.norm_pix_loss = bool(s.norm_pix_loss)
        self.encoder_tokens = s.encoder_tokens
        self.len_keep = int(self.num_patches * (1 - self.mask_ratio))
        if self.len_keep < 1:
            raise ModelConfigError(f"{name}: mask_ratio={s.mask_ratio} keeps no patch of {self.num_patches}")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # In the "all" layout the mask token enters the encoder (dim d == dd); otherwise the decoder.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        # Fixed sin-cos tables, frozen parameters (as in MAE) so they are counted and checkpointed.
        n = self.num_patches + 1
        self.pos_embed = nn.Parameter(torch.zeros(1, n, d), requires_grad=False)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n, dd), requires_grad=False)

    def _build(self, encoder_layer: Callable[[], nn.Module], decoder_layer: Callable[[], nn.Module],
               decoder_embed: bool) -> None:
        """The architecture's layers in the one order every model creates (and initialises) them: encoder blocks,
        norm, decoder_embed (only when asked), decoder blocks, decoder norm, pixel head; then the weights."""
        d, dd = self.config["embed_dim"], self.config["decoder_embed_dim"]
        self.blocks = nn.ModuleList(encoder_layer() for _ in range(self.config["depth"]))
        self.norm = nn.LayerNorm(d, eps=FINAL_LN_EPS)
        self.decoder_embed = nn.Linear(d, dd) if decoder_embed else None
        self.decoder_blocks = nn.ModuleList(decoder_layer() for _ in range(self.config["decoder_depth"]))
        self.decoder_norm = nn.LayerNorm(dd, eps=FINAL_LN_EPS)
        self.decoder_pred = nn.Linear(dd, self.patch_size ** 2 * self.in_chans)
        self._init_weights()

    # ----------------------------------------------------------------- init
    def _init_weights(self) -> None:
        grid = self.patch_embed.grid
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid).unsqueeze(0))
            self.decoder_pos_embed.copy_(sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], grid).unsqueeze(0))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        init_mae_weights(self)

    # ----------------------------------------------------------------- pixels
    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), pixel order (row in patch, column in patch, channel)."""
        b, c, h, w = images.shape
        p = self.patch_size
        x = images.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W), the inverse of patchify for square images."""
        b, length, _ = x.shape
        p, g, c = self.patch_size, self.patch_embed.grid, self.in_chans
        if length != g * g:
            raise ModelInputError(f"unpatchify: got {length} patches, expected {g * g}")
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def _check_images(self, images: torch.Tensor) -> None:
        want = (self.in_chans, self.img_size, self.img_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ModelInputError(f"{self.config['name']}: images have shape {tuple(images.shape)}, expected (B, *{want})")

    def _model_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images in the patch embedding's dtype: a model cast to bf16 (DeepSpeed's bf16 mode) takes fp32 pixels,
        while `forward_loss` reconstructs the pixels as given (issue 12: the target and its norm_pix statistics
        stay fp32 unless the caller casts the images itself). A no-op in fp32 and under autocast."""
        return images.to(self.patch_embed.proj.weight.dtype)

    # ----------------------------------------------------------------- token assembly
    def _with_cls(self, patches: torch.Tensor, cls_pos: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + cls_pos).expand(patches.shape[0], -1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1)

    def _tokens_all(self, images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """All 1+L tokens with positions; removed patches (mask=1) replaced by the mask token."""
        x = self.patch_embed(self._model_input(images))
        if mask is not None:
            # Same values as the reference's concat + gather unshuffle, without the copies.
            x = torch.where(mask.unsqueeze(-1).bool(), self.mask_token, x)
        # no cast: under autocast the token stream stays fp32 (bf16 conv output promotes), as in timm/MAE
        x = x + self.pos_embed[:, 1:]
        return self._with_cls(x, self.pos_embed[:, :1])

    def _tokens_visible(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self._model_input(images)) + self.pos_embed[:, 1:]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self._with_cls(x, self.pos_embed[:, :1])

    def _decoder_input_visible(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent) if self.decoder_embed is not None else latent
        b, n_vis, dd = x.shape
        fill = self.mask_token.to(x.dtype).expand(b, self.num_patches + 1 - n_vis, dd)
        patches = torch.cat([x[:, 1:], fill], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))
        x = torch.cat([x[:, :1], patches], dim=1)
        return x + self.decoder_pos_embed

    # ----------------------------------------------------------------- model passes
    def forward_encoder(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x[:, 1:])  # cls dropped before the prediction head

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch MSE over pixel values, averaged over masked patches only (at least fp32). The target is
        `images` at the precision the caller passed: fp32 pixels give an fp32 target even for a bf16 model."""
        dtype = torch.promote_types(pred.dtype, torch.float32)  # fp32 under autocast, fp64 stays fp64
        target = self.patchify(images).to(dtype)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = (pred.to(dtype) - target).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """images (B, C, H, W) normalized; noise (B, L) in [0, 1) -> (loss, pred (B, L, p*p*C), mask (B, L)).
        The encoder takes the images in its own dtype; the loss's target keeps theirs (see _model_input)."""
        self._check_images(images)
        b = images.shape[0]
        if noise is None:
            noise = torch.rand(b, self.num_patches, device=images.device)
        elif tuple(noise.shape) != (b, self.num_patches):
            raise ModelInputError(
                f"{self.config['name']}: noise has shape {tuple(noise.shape)}, expected ({b}, {self.num_patches})"
            )
        m = random_masking(noise.to(images.device), self.mask_ratio)
        if self.encoder_tokens == "all":
            latent = self.forward_encoder(self._tokens_all(images, m.mask))
            pred = self.forward_decoder(latent)
        else:
            latent = self.forward_encoder(self._tokens_visible(images, m.ids_keep))
            pred = self.forward_decoder(self._decoder_input_visible(latent, m.ids_restore))
        return self.forward_loss(images, pred, m.mask), pred, m.mask

    # ----------------------------------------------------------------- features
    def encode(
        self,
        images: torch.Tensor,
        layers: bool | Sequence[int] | None = None,
        return_attention: bool = False,
    ) -> dict[str, Any]:
        """Encoder features without masking (all 1+L patch tokens).

        Returns "cls" (B, d) and "mean" (B, d) (mean of patch tokens after the final norm). With `layers`
        (True = every layer, or a sequence of layer indices): "layers" (each selected layer's output in layer order,
        (B, 1+L, d); for CRATE the ISTA output) and "mssa_in" (its LN1 input to attention). With
        `return_attention`: "attention" (B, heads, 1+L, 1+L) for the selected layers (all when `layers`
        is None/True).
        """
        self._check_images(images)
        picked = self._pick_layers(layers)
        want_layers = layers is not None and layers is not False
        outs, ins, maps = [], [], []
        x = self._tokens_all(images, None)
        for i, blk in enumerate(self.blocks):
            if i in picked and (want_layers or return_attention):
                x, a, attn = blk.forward_trace(x, return_attention)
                if want_layers:
                    outs.append(x)
                    ins.append(a)
                if return_attention:
                    maps.append(attn)
            else:
                x = blk(x)
        x = self.norm(x)
        result: dict[str, Any] = {"cls": x[:, 0], "mean": x[:, 1:].mean(dim=1)}
        if want_layers:
            result["layers"] = outs
            result["mssa_in"] = ins
        if return_attention:
            result["attention"] = maps
        return result

    def _pick_layers(self, layers: bool | Sequence[int] | None) -> set[int]:
        depth = len(self.blocks)
        if layers is None or isinstance(layers, bool):
            return set(range(depth))
        picked = set()
        for i in layers:
            if not -depth <= int(i) < depth:
                raise ModelInputError(f"encode: layer index {i} is out of range for an encoder of depth {depth}")
            picked.add(int(i) % depth)
        return picked
