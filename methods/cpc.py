"""CPC on images — van den Oord, Li, Vinyals, "Representation Learning with Contrastive Predictive
Coding", 2018, arXiv:1807.03748 (section 3.3); Hénaff et al., "Data-Efficient Image Recognition
with Contrastive Predictive Coding" (CPC v2), ICML 2020, arXiv:1905.09272.

The image is cut into a grid x grid of patches overlapping by half (paper: 7 x 7 patches of 64 px
with 32 px overlap from a 256 px crop). The backbone encodes every patch to z[i, j]; a
PixelCNN-style context network, masked so that row i sees only rows <= i, gives c[i, j]; for each
step k = 1..K (paper: up to 5 rows) a linear map W_k predicts z[i + k, j] = W_k c[i, j]. InfoNCE
scores each prediction against every patch vector of the batch, so the other positions of the same
image and all patches of the other images are its negatives (negatives stay on the worker).

Features for evaluation are the patch vectors z mean-pooled over the grid, CPC v2's linear
protocol: the backbone is trained on patches, so it is evaluated on patches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods import augment
from methods.backbones import BackboneConfig, build_backbone, normalize
from methods.base import SSLMethod
from methods.config import ConfigError, param
from methods.registry import register
from methods.views import AugmentConfig, augment_view


@dataclass
class CPCConfig:
    grid: int = param(7, ge=2, help="patches per side, each overlapping its neighbour by half")
    steps: int = param(5, ge=1, tunable=True, help="K, rows ahead predicted (paper: up to 5)")
    context_layers: int = param(3, ge=1, help="row-causal residual conv layers of the context")
    # CPC v2 (section 4.1) trains on random crops, flips and colour dropping.
    aug: AugmentConfig = param(default_factory=lambda: AugmentConfig(
        crop_scale=(0.5, 1.0), jitter_strength=0.5, jitter_p=0.8, gray_p=0.2))

    def validate(self, prefix: str) -> None:
        if self.steps >= self.grid:
            raise ConfigError(f"{prefix}.steps: {self.steps} must be below grid ({self.grid})")


def grid_patches(images: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, S, S) -> (B * grid * grid, C, 2S/(grid+1), 2S/(grid+1)), row-major per image."""
    size = images.shape[-1]
    if size % (grid + 1):
        raise ConfigError(f"method.grid: the image size {size} must be divisible by grid + 1 "
                          f"= {grid + 1} for half-overlapping patches")
    stride = size // (grid + 1)
    x = images.unfold(2, 2 * stride, stride).unfold(3, 2 * stride, stride)  # (B, C, G, G, p, p)
    return x.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1], 2 * stride, 2 * stride)


def cpc_loss(z: torch.Tensor, predictions: list[torch.Tensor]) -> torch.Tensor:
    """InfoNCE of CPC over a grid of patch vectors.

    z: (B, G, G, D) patch vectors; predictions[k - 1]: (B, G - k, G, D), the prediction of
    z[:, k:] made from rows 0..G-k-1. Every prediction's logits are its dot products with all
    B * G * G patch vectors (the log-bilinear score of the paper), its target the patch it
    predicts. Mean over predictions of each step, then over steps.
    """
    batch, grid, _, dim = z.shape
    candidates = z.reshape(-1, dim)  # (B * G * G, D)
    index = torch.arange(candidates.shape[0], device=z.device).view(batch, grid, grid)
    losses = []
    for k, pred in enumerate(predictions, start=1):
        logits = pred.reshape(-1, dim) @ candidates.T  # (B * (G-k) * G, B * G * G)
        losses.append(F.cross_entropy(logits, index[:, k:].reshape(-1)))
    return torch.stack(losses).mean()


class RowCausalContext(nn.Module):
    """PixelCNN-style context over the patch grid: c[:, :, i, j] depends on z rows <= i only.

    Each layer is a residual 3x3 convolution padded with two rows on top and none below, so its
    output row i reads input rows i-2..i.
    """

    def __init__(self, dim: int, num_layers: int, kernel: int = 3):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, kernel) for _ in range(num_layers))
        self.pad = (kernel // 2, kernel // 2, kernel - 1, 0)  # left, right, top, bottom

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = z  # (B, D, G, G)
        for conv in self.convs:
            c = c + F.relu(conv(F.pad(c, self.pad)))
        return c  # (B, D, G, G)


class OneView:
    """images uint8 (B, 3, H, W) -> {"view": uint8 (B, 3, size, size)}, one augmented view."""

    def __init__(self, aug: AugmentConfig, image_size: int):
        self.aug, self.size = aug, image_size

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"view": augment_view(augment.to_float(images), self.size, self.aug, generator)}


class CPC(SSLMethod):
    def __init__(self, cfg: CPCConfig, backbone: BackboneConfig, image_size: int):
        super().__init__()
        self.grid = cfg.grid
        grid_patches(torch.zeros(1, 3, image_size, image_size), cfg.grid)  # checks the geometry
        self.backbone, dim = build_backbone(backbone, image_size)
        self.context = RowCausalContext(dim, cfg.context_layers)
        self.predictors = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(cfg.steps))

    def patch_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> z (B, G, G, D)."""
        z = self.backbone(grid_patches(x, self.grid))  # (B * G * G, D)
        return z.view(x.shape[0], self.grid, self.grid, -1)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        z = self.patch_vectors(normalize(batch["view"]))  # (B, G, G, D)
        c = self.context(z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, G, G, D)
        predictions = [w(c[:, :self.grid - k]) for k, w in enumerate(self.predictors, start=1)]
        return cpc_loss(z, predictions), {}

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.patch_vectors(normalize(images)).mean(dim=(1, 2))  # (B, D)

    def log_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"views/view": batch["view"][:16]}


register("cpc", config=CPCConfig, model=CPC,
         views=lambda cfg, image_size: OneView(cfg.aug, image_size),
         paper="van den Oord, Li, Vinyals 2018, arXiv:1807.03748; Hénaff et al. 2019, "
               "arXiv:1905.09272")
