"""Building any registered method at its registered tiny size, for every methods test.

The tiny config lives in the method's registration (`MethodSpec.tiny`), not in the tests, so a
new method is tested by the contract suite as soon as it is registered.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import methods
from methods.backbones import BackboneConfig
from methods.config import build


def tiny_size(name: str) -> int:
    return methods.get(name).tiny["image_size"]


def tiny_config(name: str, **overrides):
    """The method's config at its tiny size, with `overrides` (method keys) on top."""
    spec = methods.get(name)
    return build(spec.config, {**spec.tiny.get("method", {}), **overrides}, "method")


def tiny_backbone(name: str) -> BackboneConfig:
    return build(BackboneConfig, methods.get(name).tiny.get("backbone", {}), "backbone")


def make(name: str, seed: int = 0, **overrides):
    """(model, views, cfg) of `name` at its tiny size; the weights drawn from `seed`."""
    spec, cfg = methods.get(name), tiny_config(name, **overrides)
    torch.manual_seed(seed)
    model = spec.model(cfg, tiny_backbone(name), tiny_size(name))
    return model, spec.views(cfg, tiny_size(name)), cfg


def views_of(views, images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    return views(images, torch.Generator().manual_seed(seed))


def resized(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, 3, size, size), bilinear, contiguous as the data pipeline
    delivers it. (Interpolating the permuted array gives a channels_last tensor, and torch 2.14.1's
    oneDNN convolution backward corrupts the heap on such input at resnet_small's tiny widths.)"""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).contiguous()
