"""CPC on images — van den Oord, Li, Vinyals, "Representation Learning with Contrastive Predictive
Coding", 2018, arXiv:1807.03748 (section 3.3); Hénaff et al., "Data-Efficient Image Recognition
with Contrastive Predictive Coding" (CPC v2), ICML 2020, arXiv:1905.09272.

The image is cut into a grid x grid of patches overlapping by half (paper: 7 x 7 patches of 64 px
with 32 px overlap from a 256 px crop). The backbone encodes every patch to z[i, j]; a
PixelCNN-style context network, masked so that row i sees only rows <= i, gives c[i, j]; for each
step k = 1..K (paper: up to 5 rows) a linear map W_k predicts z[i + k, j] = W_k c[i, j]. InfoNCE
scores each prediction against every patch vector of the batch, so the other positions of the same
image and all patches of the other images are its negatives (negatives stay on the worker).

Two CPC v2 details (Hénaff et al., section 3 and its reference code): the patch encoder uses
layer normalisation instead of BatchNorm, whose batch statistics let patches see each other and
so bypass the context's receptive field; and the nearest row is not predicted (the reference's
`steps_to_ignore`): with half-overlapping patches the target one row below shares half its
pixels with the context patch, so predictions start at k = 2.

Features for evaluation are the patch vectors z mean-pooled over the grid, CPC v2's linear
protocol: the backbone is trained on patches, so it is evaluated on patches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.backbones import BackboneConfig, batchnorm_to_layernorm, build_backbone, normalize
from methods.base import SSLMethod
from methods.config import ConfigError, param
from methods.registry import register
from methods.views import AugmentConfig, OneView


@dataclass
class CPCConfig:
    grid: int = param(7, ge=2, help="patches per side, each overlapping its neighbour by half")
    steps: int = param(5, ge=1, tunable=True, help="K, rows ahead predicted (paper: up to 5)")
    first_step: int = param(2, ge=1, help="nearest row predicted; CPC v2 skips k = 1, which "
                                          "overlaps its context patch")
    norm: str = param("layer", choices=("layer", "batch"),
                      help="patch encoder normalisation (CPC v2: layer; batch lets patches "
                           "see each other through batch statistics)")
    context_layers: int = param(3, ge=1, help="row-causal residual conv layers of the context")
    # CPC v2 (section 4.1) trains on random crops, flips and colour dropping.
    aug: AugmentConfig = param(default_factory=lambda: AugmentConfig(
        crop_scale=(0.5, 1.0), jitter_strength=0.5, jitter_p=0.8, gray_p=0.2))

    def validate(self, prefix: str) -> None:
        last = self.first_step + self.steps - 1
        if last >= self.grid:
            raise ConfigError(f"{prefix}.steps: predicting rows {self.first_step}..{last} ahead "
                              f"needs a grid of more than {last} rows, got grid {self.grid}; "
                              f"lower steps or first_step, or raise grid")


def grid_patches(images: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, S, S) -> (B * grid * grid, C, 2S/(grid+1), 2S/(grid+1)), row-major per image."""
    size = images.shape[-1]
    if size % (grid + 1):
        raise ValueError(f"half-overlapping patches of a {grid} x {grid} grid need an image size "
                         f"divisible by {grid + 1}, got {size}")
    stride = size // (grid + 1)
    x = images.unfold(2, 2 * stride, stride).unfold(3, 2 * stride, stride)  # (B, C, G, G, p, p)
    return x.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1], 2 * stride, 2 * stride)


def cpc_loss(z: torch.Tensor, predictions: list[torch.Tensor], first_step: int = 1
             ) -> torch.Tensor:
    """InfoNCE of CPC over a grid of patch vectors.

    z: (B, G, G, D) patch vectors; predictions[i], k = first_step + i: (B, G - k, G, D), the
    prediction of z[:, k:] made from rows 0..G-k-1. Every prediction's logits are its dot
    products with all B * G * G patch vectors (the log-bilinear score of the paper), its target
    the patch it predicts. Mean over predictions of each step, then over steps.
    """
    batch, grid, _, dim = z.shape
    candidates = z.reshape(-1, dim)  # (B * G * G, D)
    index = torch.arange(candidates.shape[0], device=z.device).view(batch, grid, grid)
    losses = []
    for k, pred in enumerate(predictions, start=first_step):
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


class CPC(SSLMethod):
    def __init__(self, cfg: CPCConfig, backbone: BackboneConfig, image_size: int):
        super().__init__()
        self.grid, self.first_step = cfg.grid, cfg.first_step
        check_geometry(image_size, cfg.grid)
        self.backbone, dim = build_backbone(backbone, image_size)
        if cfg.norm == "layer":
            self.backbone = batchnorm_to_layernorm(self.backbone)
        self.context = RowCausalContext(dim, cfg.context_layers)
        self.predictors = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(cfg.steps))

    def patch_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> z (B, G, G, D)."""
        z = self.backbone(grid_patches(x, self.grid))  # (B * G * G, D)
        return z.view(x.shape[0], self.grid, self.grid, -1)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        z = self.patch_vectors(normalize(batch["view"]))  # (B, G, G, D)
        c = self.context(z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, G, G, D)
        predictions = [w(c[:, :self.grid - k])
                       for k, w in enumerate(self.predictors, start=self.first_step)]
        return cpc_loss(z, predictions, self.first_step), {}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.patch_vectors(normalize(images)).mean(dim=(1, 2))  # (B, D)

    def log_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"views/view": batch["view"][:16]}


def check_geometry(image_size: int, grid: int) -> None:
    if image_size % (grid + 1):
        raise ConfigError(f"method.grid: {grid} x {grid} half-overlapping patches need "
                          f"data.image_size divisible by grid + 1 = {grid + 1}, got {image_size}")


def views(cfg: CPCConfig, image_size: int) -> OneView:
    check_geometry(image_size, cfg.grid)
    return OneView(cfg.aug, image_size)


register("cpc", config=CPCConfig, model=CPC, views=views,
         tiny={"method": {"grid": 3, "steps": 1, "context_layers": 1},
               "backbone": {"name": "resnet_small", "width": 4}, "image_size": 16},
         paper="van den Oord, Li, Vinyals 2018, arXiv:1807.03748; Hénaff et al. 2019, "
               "arXiv:1905.09272")
