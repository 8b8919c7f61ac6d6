"""Relative patch location — Doersch, Gupta, Efros, "Unsupervised Visual Representation Learning
by Context Prediction", ICCV 2015, arXiv:1505.05192.

A 3x3 grid of patches is cut from an image with a gap between patches and a few pixels of jitter
each; the centre patch and one of its 8 neighbours go through the same (shared-weight) encoder,
their features are concatenated, and a small MLP classifies where the neighbour sits (8 ways).

Against trivial shortcuts the paper uses the gap and jitter (no continuing lines or textures across
borders) and, against chromatic aberration, "colour dropping": each patch keeps one random colour
channel and the other two are replaced by Gaussian noise of about 1/100 of the kept channel's
standard deviation (around its mean). Both are implemented here; colour projection (the paper's
alternative) is not. Colour dropping is pointless on grayscale data (digits) and there it only
makes training patches look unlike the full images `embed` sees, so the digits config turns it off.
Positions are numbered row-major around the centre: 0 top-left, 1 top, 2 top-right, 3 left,
4 right, 5 bottom-left, 6 bottom, 7 bottom-right.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods import augment
from methods.backbones import BackboneConfig, build_backbone, normalize
from methods.base import SSLMethod
from methods.config import ConfigError, param
from methods.heads import mlp
from methods.patches import (CENTRE, NEIGHBOURS, centred_grid, check_grid, check_grid_config,
                             crop_patches, sample_grid)
from methods.registry import register

POSITIONS = len(NEIGHBOURS)  # 8


@dataclass
class RelativeLocConfig:
    # Paper (section 3.1): 96 px patches, 48 px gap, up to 7 px jitter on images of 150K-450K
    # pixels, so neighbours stay at least 34 px apart. The defaults are that geometry shrunk to
    # fit 32 px images (3*8 + 2*3 + 2*1 = 32), neighbours at least 1 px apart.
    patch_size: int = param(8, ge=2, tunable=True, help="side of each patch (px)")
    gap: int = param(3, ge=1, tunable=True, help="pixels between neighbouring patches; more than "
                                                 "2 * jitter, so patches never touch")
    jitter: int = param(1, ge=0, help="each patch moves up to this many px along each axis")
    pairs_per_image: int = param(1, ge=1, le=8, help="(centre, neighbour) pairs per image; the "
                                 "paper samples 1, more reuse the centre patch's encoding")
    color_drop: bool = param(True, help="keep one random colour channel per patch (paper)")
    head_hidden_dim: int = param(512, ge=1, help="hidden width of the pair classifier "
                                 "(the paper's fc7 has 4096)")

    def validate(self, prefix: str) -> None:
        if self.gap <= 2 * self.jitter:
            raise ConfigError(f"{prefix}.gap: {self.gap} px with jitter {self.jitter} px lets "
                              f"neighbouring patches touch (the paper keeps them apart so edges "
                              f"and textures cannot be followed across); raise gap above "
                              f"{2 * self.jitter} or lower jitter")


def drop_colors(patches: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, K, 3, p, p): per patch keep one random channel; fill the other two with noise of
    std 1/100 of the kept channel's std around its mean (Doersch et al., section 3.1)."""
    batch, k, channels, p, _ = patches.shape
    keep = torch.randint(0, channels, (batch, k), generator=generator)  # (B, K)
    x = patches.float()
    kept = x.gather(2, keep.view(batch, k, 1, 1, 1).expand(batch, k, 1, p, p))  # (B, K, 1, p, p)
    mean = kept.mean(dim=(2, 3, 4), keepdim=True)  # (B, K, 1, 1, 1)
    std = kept.flatten(2).std(dim=2).view(batch, k, 1, 1, 1)
    noise = mean + std / 100 * torch.randn(x.shape, generator=generator)  # (B, K, 3, p, p)
    is_kept = F.one_hot(keep, channels).bool().view(batch, k, channels, 1, 1)
    return torch.where(is_kept, x, noise).round_().clamp_(0, 255).to(torch.uint8)


class ContextViews:
    """images uint8 (B, 3, S, S) -> {"centre": uint8 (B, 3, p, p), "neighbours": uint8 (B, K, 3,
    p, p), "position": (B, K) long}: neighbour k of image b sits at position[b, k] (0..7, see the
    module docstring) around the centre patch, K = pairs_per_image distinct positions."""

    def __init__(self, patch_size: int, gap: int, jitter: int, pairs_per_image: int,
                 color_drop: bool, image_size: int):
        check_grid(image_size, patch_size, gap, jitter)
        self.patch_size, self.gap, self.jitter = patch_size, gap, jitter
        self.pairs, self.color_drop, self.size = pairs_per_image, color_drop, image_size

    def layout(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(corners (B, 9, 2) of the grid, cells row-major; positions (B, K) of the neighbours)."""
        corners = sample_grid(batch, self.size, self.patch_size, self.gap, self.jitter,
                              generator=generator)
        order = torch.rand(batch, POSITIONS, generator=generator).argsort(1)  # (B, 8)
        return corners, order[:, :self.pairs]

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        images = augment.fit_size(images, self.size)
        corners, position = self.layout(images.shape[0], generator)  # (B, 9, 2), (B, K)
        cells = torch.tensor(NEIGHBOURS)[position]  # (B, K) grid cell of each neighbour
        chosen = torch.cat([corners[:, CENTRE:CENTRE + 1],
                            corners.gather(1, cells[..., None].expand(-1, -1, 2))], 1)
        patches = crop_patches(images, chosen, self.patch_size)  # (B, 1+K, 3, p, p)
        if self.color_drop:
            patches = drop_colors(patches, generator)
        return {"centre": patches[:, 0], "neighbours": patches[:, 1:], "position": position}


class RelativeLoc(SSLMethod):
    def __init__(self, cfg: RelativeLocConfig, backbone: BackboneConfig, image_size: int):
        super().__init__()
        check_grid_config(image_size, cfg.patch_size, cfg.gap, cfg.jitter, "method.patch_size")
        self.patch_size, self.gap = cfg.patch_size, cfg.gap
        self.backbone, dim = build_backbone(backbone, image_size)
        self.head = mlp(2 * dim, cfg.head_hidden_dim, POSITIONS, num_layers=2)

    def logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B*K, 8), labels (B*K,)) for every (centre, neighbour) pair."""
        centre, neighbours = batch["centre"], batch["neighbours"]  # (B, 3, p, p), (B, K, 3, p, p)
        b, k = neighbours.shape[:2]
        features = self.backbone(normalize(torch.cat([centre, neighbours.flatten(0, 1)])))
        pairs = torch.cat([features[:b].repeat_interleave(k, 0), features[b:]], 1)  # (B*K, 2D)
        return self.head(pairs), batch["position"].flatten()

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logits, labels = self.logits(batch)
        loss = F.cross_entropy(logits, labels)
        return loss, {"position_acc": (logits.detach().argmax(1) == labels).float().mean()}

    @torch.no_grad()
    def pretext_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        logits, labels = self.logits(batch)
        return {"position_acc": float((logits.argmax(1) == labels).float().mean())}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's features of the image's centred 3x3 grid of patches, averaged (B, D).
        It only ever saw patches (and its BatchNorm statistics are patch statistics), so it is
        read on patches, as jigsaw's context-free network is."""
        corners = centred_grid(images.shape[0], images.shape[-1], self.patch_size, self.gap)
        patches = crop_patches(images, corners, self.patch_size)  # (B, 9, 3, p, p)
        features = self.backbone(normalize(patches.flatten(0, 1)))  # (9B, D)
        return features.view(images.shape[0], len(NEIGHBOURS) + 1, -1).mean(1)

    def log_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = min(16, batch["centre"].shape[0])
        return {"views/centre": batch["centre"][:n], "views/neighbour": batch["neighbours"][:n, 0]}


def views(cfg: RelativeLocConfig, image_size: int) -> ContextViews:
    check_grid_config(image_size, cfg.patch_size, cfg.gap, cfg.jitter, "method.patch_size")
    return ContextViews(cfg.patch_size, cfg.gap, cfg.jitter, cfg.pairs_per_image, cfg.color_drop,
                        image_size)


register("relative_loc", config=RelativeLocConfig, model=RelativeLoc, views=views,
         paper="Doersch, Gupta, Efros 2015, arXiv:1505.05192",
         tiny={"method": {"pairs_per_image": 2, "head_hidden_dim": 32}, "backbone": {"width": 4},
               "image_size": 32})
