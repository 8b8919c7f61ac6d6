"""MAE — He, Chen, Xie, Li, Dollar, Girshick, "Masked Autoencoders Are Scalable Vision
Learners", CVPR 2022, arXiv:2111.06377.

A random 75% of the patches is removed; the ViT encoder sees only the visible patches (with their
positions); a lightweight decoder (8 blocks of width 512 in the paper) gets the encoded visible
tokens plus a shared, learned mask token at every removed position, and predicts the pixels of
every patch. The loss is the mean squared error on the removed patches only, against pixels
normalised per patch (norm_pix). Augmentation is a random resized crop (scale 0.2-1) and a flip.

Features for evaluation are the encoder's patch tokens of the whole (unmasked) image, mean pooled:
the loss trains the patch tokens and never reads the CLS output, and the paper reports that MAE
works similarly well with average pooling as with its CLS token (appendix A.1); `pool: cls` gives
the CLS token instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from methods.backbones import MEAN, STD, BackboneConfig, build_backbone, normalize
from methods.base import SSLMethod
from methods.config import ConfigError, param
from methods.losses import mae_loss, patchify, unpatchify
from methods.masking import num_visible, place_tokens, random_masking, take_tokens
from methods.registry import register
from methods.views import AugmentConfig, OneView
from methods.vit import LAYER_NORM, ViT, blocks, sincos_2d


@dataclass
class MAEConfig:
    # He et al. 2021, section 4 and appendix A.1: ratio 0.75, decoder 8 x 512 (16 heads),
    # normalised-pixel target.
    mask_ratio: float = param(0.75, gt=0, lt=1, tunable=True, help="fraction of patches removed")
    decoder_dim: int = param(512, ge=4, help="decoder width (a multiple of 4 and of the heads)")
    decoder_depth: int = param(8, ge=1)
    decoder_heads: int = param(16, ge=1)
    norm_pix: bool = param(True, help="target: pixels normalised per patch")
    pool: str = param("mean", choices=("mean", "cls"), help="feature for evaluation")
    aug: AugmentConfig = param(default_factory=lambda: AugmentConfig(
        crop_scale=(0.2, 1.0), flip_p=0.5, jitter_strength=0.0, gray_p=0.0))


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, H, W) -> [0, 1] for display."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0.0, 1.0)


class MAE(SSLMethod):
    def __init__(self, cfg: MAEConfig, backbone: BackboneConfig, image_size: int):
        super().__init__()
        self.backbone, dim = build_backbone(backbone, image_size)
        if not isinstance(self.backbone, ViT):
            raise ConfigError(f"backbone.name: mae needs a ViT backbone (vit_tiny, vit_small, "
                              f"vit_base), got {backbone.name!r}")
        self.mask_ratio, self.norm_pix, self.pool = cfg.mask_ratio, cfg.norm_pix, cfg.pool
        self.patch, num_patches = backbone.patch_size, self.backbone.num_patches
        if not 0 < num_visible(num_patches, cfg.mask_ratio) < num_patches:
            raise ConfigError(f"method.mask_ratio: {cfg.mask_ratio} leaves no visible or no "
                              f"removed patch of the {num_patches}")
        self.decoder_embed = nn.Linear(dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_pos", sincos_2d(self.backbone.grid, cfg.decoder_dim)[None],
                             persistent=False)  # (1, L, D_dec), fixed
        self.decoder = blocks(cfg.decoder_depth, cfg.decoder_dim, cfg.decoder_heads)
        self.decoder_norm = LAYER_NORM(cfg.decoder_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, self.patch * self.patch * 3)

    def _decode(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """latent (B, 1+N, D) of the visible patches ids_keep (B, N) -> pixels (B, L, p*p*3)."""
        y = self.decoder_embed(latent)  # (B, 1+N, D_dec)
        batch, num_patches = y.shape[0], self.decoder_pos.shape[1]
        fill = self.mask_token.expand(batch, num_patches, -1)  # (B, L, D_dec)
        patches = place_tokens(fill, y[:, 1:], ids_keep) + self.decoder_pos  # (B, L, D_dec)
        y = self.decoder_norm(self.decoder(torch.cat([y[:, :1], patches], dim=1)))
        return self.decoder_pred(y[:, 1:])  # (B, L, p*p*3)

    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (B, 3, H, W) -> (predicted patches (B, L, p*p*3), mask (B, L))."""
        ids_keep, mask = random_masking(x.shape[0], self.backbone.num_patches, self.mask_ratio,
                                        x.device, generator)
        visible = take_tokens(self.backbone.patch_tokens(x), ids_keep)  # (B, N, D)
        return self._decode(self.backbone.encode(visible), ids_keep), mask

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x = normalize(batch["view"])  # (B, 3, H, W)
        pred, mask = self.reconstruct(x)
        loss = mae_loss(pred, patchify(x, self.patch), mask, self.norm_pix)
        return loss, {"mask_fraction": mask.float().mean()}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.encode(self.backbone.patch_tokens(normalize(images)))  # (B, 1+L, D)
        return tokens[:, 1:].mean(dim=1) if self.pool == "mean" else tokens[:, 0]  # (B, D)

    @torch.no_grad()
    def log_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Originals, masked inputs (removed patches grey) and reconstructions, in [0, 1]."""
        x = normalize(batch["view"][:8])
        pred, mask = self.reconstruct(x, torch.Generator().manual_seed(0))
        target = patchify(x, self.patch)  # (N, L, P)
        if self.norm_pix:  # back from per-patch normalised pixels
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, True)
        removed = mask[..., None]  # (N, L, 1)
        recon = unpatchify(torch.where(removed, pred, target), self.patch, 3)
        shown = patchify(_to_unit(x), self.patch).masked_fill(removed, 0.5)
        return {"mae/original": _to_unit(x), "mae/masked": unpatchify(shown, self.patch, 3),
                "mae/reconstruction": _to_unit(recon)}


def views(cfg: MAEConfig, image_size: int) -> OneView:
    return OneView(cfg.aug, image_size)


register("mae", config=MAEConfig, model=MAE, views=views,
         paper="He, Chen, Xie, Li, Dollar, Girshick 2021, arXiv:2111.06377",
         tiny={"method": {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2},
               "backbone": {"name": "vit_tiny", "depth": 1, "patch_size": 4}, "image_size": 16})
