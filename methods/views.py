"""The SimCLR family's view augmentation and the view builders the methods share.

Chen et al., SimCLR, 2020, arXiv:2002.05709, appendix A: random resized crop, horizontal flip,
colour jitter (strength s; p = 0.8), random grayscale (p = 0.2), Gaussian blur (p = 0.5 on
ImageNet, none on CIFAR, appendix B.9). MoCo v2 (arXiv:2003.04297) adds the blur; BYOL (Grill et
al., 2020, arXiv:2006.07733, appendix B) adds solarisation, asymmetric blur and solarisation
between its two views, and a weaker saturation jitter (0.2), which MoCo v3 and DINO keep. Every
image of a batch draws its own parameters (methods/augment.py).

A method's views are built as `views(cfg, image_size)`; the builders here (`OneView`,
`TwoViews`, `PairViews`) take the augmentation settings they use, never a whole method config.
"""
from __future__ import annotations

import dataclasses
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
    saturation: float | None = param(None, ge=0, help="saturation jitter (None: 0.8 s as SimCLR; "
                                                      "BYOL, MoCo v3 and DINO use 0.2)")
    jitter_p: float = param(0.8, ge=0, le=1)
    gray_p: float = param(0.2, ge=0, le=1)
    blur_p: float = param(0.0, ge=0, le=1, help="Gaussian blur probability (ImageNet 0.5)")
    solarize_p: float = param(0.0, ge=0, le=1)

    def validate(self, prefix: str) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"{prefix}.crop_scale: {list(self.crop_scale)} must satisfy "
                              f"0 < low <= high <= 1")


def byol_aug() -> AugmentConfig:
    """BYOL's view augmentation (Grill et al., 2020, appendix B), kept by MoCo v3: crop 0.08-1,
    flip, jitter (0.4, 0.4, 0.2, 0.1) with p = 0.8, grayscale 0.2; the per-view blur and
    solarisation come on top (`asymmetric`)."""
    return AugmentConfig(crop_scale=(0.08, 1.0), jitter_strength=0.5, saturation=0.2,
                         jitter_p=0.8, gray_p=0.2)


def check_probabilities(cfg, prefix: str, names: tuple[str, ...] = ("blur_p", "solarize_p")
                        ) -> None:
    """ConfigError naming the key when a per-view probability lies outside [0, 1]."""
    for name in names:
        values = list(getattr(cfg, name))
        if not all(0.0 <= p <= 1.0 for p in values):
            raise ConfigError(f"{prefix}.{name}: {values} must lie in [0, 1]")


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
        saturation = 0.8 * s if cfg.saturation is None else cfg.saturation
        x = augment.color_jitter(x, 0.8 * s, 0.8 * s, saturation, 0.2 * s, cfg.jitter_p,
                                 generator=generator)
    if cfg.gray_p > 0:
        x = augment.random_grayscale(x, cfg.gray_p, generator=generator)
    if cfg.blur_p > 0:
        x = augment.random_gaussian_blur(x, cfg.blur_p, generator=generator)
    if cfg.solarize_p > 0:
        x = augment.random_solarize(x, cfg.solarize_p, generator=generator)
    return augment.to_uint8(x)


class OneView:
    """images uint8 (B, 3, H, W) -> {"view": uint8 (B, 3, size, size)}, one augmented view."""

    def __init__(self, aug: AugmentConfig, image_size: int):
        self.aug, self.size = aug, image_size

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"view": augment_view(augment.to_float(images), self.size, self.aug, generator)}


class PairViews:
    """images uint8 (B, 3, H, W) -> {"view1", "view2"}: uint8 (B, 3, size, size), view i drawn
    with augs[i] (BYOL's asymmetric pair: different blur and solarisation per view)."""

    def __init__(self, augs: tuple[AugmentConfig, AugmentConfig], image_size: int):
        self.augs, self.size = tuple(augs), image_size

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x = augment.to_float(images)
        return {f"view{i + 1}": augment_view(x, self.size, aug, generator)
                for i, aug in enumerate(self.augs)}


class TwoViews(PairViews):
    """images uint8 (B, 3, H, W) -> {"view1", "view2"}: two views of the same augmentation."""

    def __init__(self, aug: AugmentConfig, image_size: int):
        super().__init__((aug, aug), image_size)


def asymmetric(aug: AugmentConfig, blur_p: tuple[float, ...], solarize_p: tuple[float, ...]
               ) -> tuple[AugmentConfig, ...]:
    """One AugmentConfig per view: `aug` with view i's blur and solarisation probabilities."""
    return tuple(dataclasses.replace(aug, blur_p=b, solarize_p=s)
                 for b, s in zip(blur_p, solarize_p))
