"""Backbones: image (B, 3, H, W) -> pooled features (B, D), and the input normalisation.

ResNets are torchvision's (He et al., 2016, arXiv:1512.03385) with no pretrained weights; the
small-image stem (3x3 conv, stride 1, no max-pool) is the CIFAR variant SimCLR uses for 32 px
images (Chen et al., 2020, arXiv:2002.05709, appendix B.9). `resnet_small` is a narrow, shallow
ResNet built from torchvision's BasicBlock so the demos train in minutes on two CPU cores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from methods.config import ConfigError, param

# ImageNet statistics; every image enters a network through `normalize`.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

BACKBONES: dict[str, Callable[["BackboneConfig", int], tuple[nn.Module, int]]] = {}


def register_backbone(name: str):
    def deco(fn):
        BACKBONES[name] = fn
        return fn
    return deco


def registered_backbones() -> list[str]:
    """Every backbone name, the ViTs included (their module registers them when imported)."""
    import methods
    methods.load_all()
    return sorted(BACKBONES)


@dataclass
class BackboneConfig:
    name: str = param("resnet_small", choices=registered_backbones,
                      help="feature extractor; resnet_small is sized for CPU demos")
    small_stem: bool = param(True, help="3x3 stride-1 stem without max-pool, for images <= 64 px")
    width: int = param(32, ge=4, help="base channel width of resnet_small")
    patch_size: int = param(4, ge=1, help="ViT patch size in pixels")
    depth: int = param(0, ge=0, help="ViT transformer blocks; 0 keeps the size's depth (DeiT: 12)")
    # Deeper/wider ViT settings live in the ViT builders; these two shape the token grid.

    def validate(self, prefix: str) -> None:
        if self.name not in registered_backbones():
            raise ConfigError(f"{prefix}.name: unknown backbone {self.name!r}; "
                              f"registered backbones: {', '.join(registered_backbones())}")
        if self.depth and not self.name.startswith("vit_"):
            raise ConfigError(f"{prefix}.depth: {self.depth} sets a ViT's block count, but "
                              f"{prefix}.name is {self.name!r}; remove depth or pick a vit_* "
                              f"backbone")


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] (or float in [0, 1]) -> float, ImageNet-normalised."""
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def build_backbone(cfg: BackboneConfig, image_size: int) -> tuple[nn.Module, int]:
    """The backbone named in `cfg` for square images of `image_size`, and its feature size D."""
    if cfg.name not in BACKBONES:
        cfg.validate("backbone")
    return BACKBONES[cfg.name](cfg, image_size)


def _small_stem(net: tv_resnet.ResNet) -> None:
    net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()


def _torchvision_resnet(fn: Callable, cfg: BackboneConfig) -> tuple[nn.Module, int]:
    net = fn(weights=None)
    if cfg.small_stem:
        _small_stem(net)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


@register_backbone("resnet18")
def resnet18(cfg: BackboneConfig, image_size: int) -> tuple[nn.Module, int]:
    return _torchvision_resnet(tv_resnet.resnet18, cfg)


@register_backbone("resnet50")
def resnet50(cfg: BackboneConfig, image_size: int) -> tuple[nn.Module, int]:
    return _torchvision_resnet(tv_resnet.resnet50, cfg)


class SmallResNet(nn.Module):
    """Four stages of one BasicBlock each, widths w, 2w, 4w, 8w; global average pool."""

    def __init__(self, width: int, small_stem: bool):
        super().__init__()
        stem = [nn.Conv2d(3, width, 3, 1, 1, bias=False)] if small_stem else [
            nn.Conv2d(3, width, 7, 2, 3, bias=False)]
        stem += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        if not small_stem:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        blocks, c_in = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or c_in != c_out:
                down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                     nn.BatchNorm2d(c_out))
            blocks.append(tv_resnet.BasicBlock(c_in, c_out, stride, down))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x))).flatten(1)  # (B, 8w)


@register_backbone("resnet_small")
def resnet_small(cfg: BackboneConfig, image_size: int) -> tuple[nn.Module, int]:
    net = SmallResNet(cfg.width, cfg.small_stem)
    return net, net.dim


def batchnorm_to_layernorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d replaced by layer normalisation over (C, H, W) of each sample
    (GroupNorm with one group), with its own affine parameters: no statistics cross the batch."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features, eps=child.eps))
        else:
            batchnorm_to_layernorm(child)
    return module
