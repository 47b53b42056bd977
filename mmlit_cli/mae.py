"""mmLiT pre-training: a masked auto-encoder around the mLiT encoder.

    random_masking -> forward_encoder (visible patches + cls) -> forward_decoder
    (mask tokens restored, own position embedding) -> forward_loss
    loss = MSE(masked patches) + visible_loss_weight * MSE(visible patches)

The encoder is the `MLiT` class itself (built with `num_classes=0`), so its state dict,
with the `encoder.` prefix removed, loads into a classifier unchanged.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .config import MAEConfig, ModelConfig
from .errors import ConfigError
from .model import Block, MLiT, SwiGLU


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, patch*patch*C], patches in row-major order, pixels (p, q, c)."""
    B, C, H, W = images.shape
    h, w = H // patch, W // patch
    x = images.reshape(B, C, h, patch, w, patch)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, patch * patch * C)


def unpatchify(patches: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """Inverse of `patchify` for a square image."""
    B, N, _ = patches.shape
    h = w = int(N**0.5)
    x = patches.reshape(B, h, w, patch, patch, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, h * patch, w * patch)


def visible_count(num_patches: int, mask_ratio: float) -> int:
    """How many of `num_patches` stay visible at `mask_ratio`: at least one is seen and at
    least one hidden (a ratio that hides none would train on the visible-patch loss alone).
    Raises ValueError otherwise."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    if num_patches < 2:
        raise ValueError("the image is one patch (model.image_size = model.patch_size): masking needs at least "
                         "two, one hidden and one seen")
    n_keep = max(1, int(round(num_patches * (1 - mask_ratio))))
    if n_keep >= num_patches:
        raise ValueError(f"mask_ratio {mask_ratio} hides none of the {num_patches} patches: it must be above "
                         f"{0.5 / num_patches:.3g}")
    return n_keep


def check_masking(model_cfg: ModelConfig, mae_cfg: MAEConfig) -> None:
    """A `ConfigError` when the preset's mask_ratio hides none of its patches (see `visible_count`)."""
    try:
        visible_count(model_cfg.num_patches, mae_cfg.mask_ratio)
    except ValueError as e:
        raise ConfigError(f"mae: {e}") from None


class MaskedAutoencoder(nn.Module):
    def __init__(self, model_cfg: ModelConfig, mae_cfg: MAEConfig):
        super().__init__()
        mae_cfg.validate()
        check_masking(model_cfg, mae_cfg)
        self.model_cfg, self.mae_cfg = model_cfg, mae_cfg
        self.encoder = MLiT(dataclasses.replace(model_cfg, num_classes=0))
        Dd, P, C = mae_cfg.decoder_dim, model_cfg.patch_size, model_cfg.in_chans
        self.decoder_embed = nn.Linear(model_cfg.embed_dim, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, model_cfg.num_patches + 1, Dd))
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, mae_cfg.decoder_heads, mae_cfg.decoder_kv_heads, SwiGLU(Dd, mae_cfg.decoder_mlp_hidden),
                  norm_eps=model_cfg.norm_eps)
            for _ in range(mae_cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(Dd, eps=model_cfg.norm_eps)
        self.decoder_pred = nn.Linear(Dd, P * P * C)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("encoder."):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def random_masking(self, tokens: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random `1 - mask_ratio` of each image's tokens.

        Returns the kept tokens [B, n_keep, D], the mask [B, N] (1 = hidden) in the original
        order, and `ids_restore` [B, N] that undoes the shuffle.
        """
        B, N, D = tokens.shape
        n_keep = visible_count(N, mask_ratio)
        noise = torch.rand(B, N, device=tokens.device)
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :n_keep]
        kept = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = torch.ones(B, N, device=tokens.device)
        mask[:, :n_keep] = 0
        return kept, mask.gather(1, ids_restore), ids_restore

    def forward_encoder(self, images: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.encoder.embed(images)
        kept, mask, ids_restore = self.random_masking(tokens, mask_ratio)
        return self.encoder.forward_tokens(kept), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        B, N = ids_restore.shape
        cls, visible = x[:, :1], x[:, 1:]
        masked = self.mask_token.expand(B, N - visible.shape[1], -1)
        patches = torch.cat([visible, masked], dim=1)
        patches = patches.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([cls, patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def target(self, images: torch.Tensor) -> torch.Tensor:
        target = patchify(images, self.model_cfg.patch_size)
        if self.mae_cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE on masked patches + `visible_loss_weight` x MSE on visible patches."""
        per_patch = (pred.float() - self.target(images).float()).pow(2).mean(dim=-1)
        visible = 1.0 - mask
        loss_masked = (per_patch * mask).sum() / mask.sum().clamp_min(1)
        loss_visible = (per_patch * visible).sum() / visible.sum().clamp_min(1)
        return loss_masked + self.mae_cfg.visible_loss_weight * loss_visible

    def forward(self, images: torch.Tensor, mask_ratio: float | None = None):
        ratio = self.mae_cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(images, ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(images, pred, mask), pred, mask

    def reconstruct(self, images: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Predicted patches back in image space (undoing per-patch normalisation with the
        statistics of the true patches, as the MAE paper's visualisations do)."""
        if self.mae_cfg.norm_pix_loss:
            target = patchify(images, self.model_cfg.patch_size)
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
            pred = pred * std + mean
        return unpatchify(pred, self.model_cfg.patch_size, self.model_cfg.in_chans)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token", "decoder_pos_embed"}

    def aux_loss(self) -> torch.Tensor | None:
        return self.encoder.aux_loss()
