"""The SimCLR family's view augmentation, shared by SimCLR, MoCo v2/v3 and DINO.

Chen et al., SimCLR, 2020, arXiv:2002.05709, appendix A: random resized crop, horizontal flip,
colour jitter (strength s; p = 0.8), random grayscale (p = 0.2), Gaussian blur (p = 0.5 on
ImageNet, none on CIFAR, appendix B.9). MoCo v2 (arXiv:2003.04297) adds the blur; BYOL/DINO add
solarisation. Every image of a batch draws its own parameters (methods/augment.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from methods import augment
from methods.config import ConfigError, param


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float] = param((0.08, 1.0), help="area fraction range of the crop")
    flip_p: float = param(0.5, ge=0, le=1, help="horizontal flip probability")
    jitter_strength: float = param(0.5, ge=0, help="colour jitter strength s (CIFAR 0.5, ImageNet 1.0)")
    jitter_p: float = param(0.8, ge=0, le=1)
    gray_p: float = param(0.2, ge=0, le=1)
    blur_p: float = param(0.0, ge=0, le=1, help="Gaussian blur probability (ImageNet 0.5)")
    solarize_p: float = param(0.0, ge=0, le=1)

    def validate(self, prefix: str) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"{prefix}.crop_scale: {list(self.crop_scale)} must satisfy "
                              f"0 < low <= high <= 1")


def new_generator() -> torch.Generator:
    """A generator seeded from the OS, so every task and every epoch draws fresh augmentations.

    torch's default generator starts from the same seed in every fresh process, which would give
    every Ray Data worker process (and every restarted one) the same "random" views.
    """
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def augment_view(images: torch.Tensor, size: int, cfg: AugmentConfig, generator: torch.Generator,
                 scale: tuple[float, float] | None = None) -> torch.Tensor:
    """float (B, 3, H, W) in [0, 1] -> one augmented view, uint8 (B, 3, size, size)."""
    s = cfg.jitter_strength
    x = augment.random_resized_crop(images, size, scale=scale or cfg.crop_scale,
                                    generator=generator)
    x = augment.random_hflip(x, cfg.flip_p, generator=generator)
    if s > 0 and cfg.jitter_p > 0:
        x = augment.color_jitter(x, 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, cfg.jitter_p,
                                 generator=generator)
    if cfg.gray_p > 0:
        x = augment.random_grayscale(x, cfg.gray_p, generator=generator)
    if cfg.blur_p > 0:
        x = augment.random_gaussian_blur(x, cfg.blur_p, generator=generator)
    if cfg.solarize_p > 0:
        x = augment.random_solarize(x, cfg.solarize_p, generator=generator)
    return augment.to_uint8(x)


class TwoViews:
    """images uint8 (B, 3, H, W) -> {"view1", "view2"}: uint8 (B, 3, size, size) each."""

    def __init__(self, aug: AugmentConfig, image_size: int):
        self.aug, self.size = aug, image_size

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x = augment.to_float(images)
        return {"view1": augment_view(x, self.size, self.aug, generator),
                "view2": augment_view(x, self.size, self.aug, generator)}
