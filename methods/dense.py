"""Per-pixel prediction on top of the backbones: their spatial feature map, a different number of
input channels, and a small upsampling decoder.

The pixel-predicting pretext tasks need the encoder's feature map before pooling: context
encoders decode the missing region from it (Pathak et al., 2016, arXiv:1604.07379), colorization
predicts an ab distribution per pixel from the L channel alone (Zhang, Isola, Efros, 2016,
arXiv:1603.08511) and split-brain autoencoders add an ab -> L network (Zhang, Isola, Efros, 2017,
arXiv:1611.09842). Their features for evaluation stay the backbone's pooled output.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from methods.backbones import SmallResNet


def feature_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's last feature map (B, C, h, w); its global average is `backbone(x)`."""
    if isinstance(backbone, SmallResNet):
        return backbone.blocks(backbone.stem(x))
    if isinstance(backbone, tv_resnet.ResNet):
        x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
        return backbone.layer4(backbone.layer3(backbone.layer2(backbone.layer1(x))))
    raise TypeError(f"no feature map for a {type(backbone).__name__} backbone")


def set_in_channels(backbone: nn.Module, channels: int) -> None:
    """Replace the backbone's first convolution by a fresh one reading `channels` channels."""
    if isinstance(backbone, SmallResNet):
        owner, name = backbone.stem, "0"
    elif isinstance(backbone, tv_resnet.ResNet):
        owner, name = backbone, "conv1"
    else:
        raise TypeError(f"cannot change the input channels of a {type(backbone).__name__}")
    old = getattr(owner, name)
    setattr(owner, name, nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride,
                                   old.padding, bias=False))


def output_stride(backbone: nn.Module, in_channels: int, image_size: int) -> tuple[int, int]:
    """(channels C, stride) of the feature map for `image_size` inputs, from one dry run."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        fmap = feature_map(backbone, torch.zeros(1, in_channels, image_size, image_size))
    backbone.train(was_training)
    return fmap.shape[1], image_size // fmap.shape[-1]


def upsampling_steps(stride: int, target_stride: int) -> int:
    """How many 2x upsamplings take a feature map of `stride` to `target_stride` (a power of 2)."""
    steps = math.log2(stride / target_stride) if target_stride <= stride else -1.0
    if steps < 0 or not steps.is_integer():
        raise ValueError(f"the backbone's feature map has stride {stride}; output stride "
                         f"{target_stride} must divide it by a power of 2")
    return int(steps)


class UpDecoder(nn.Sequential):
    """(B, C, h, w) -> (B, out, h * 2^steps, w * 2^steps): per step a 2x bilinear upsampling and
    a 3x3 conv-BN-ReLU halving the width (at least `min_width`), then a 1x1 conv to `out`."""

    def __init__(self, in_channels: int, out_channels: int, steps: int, min_width: int = 16):
        layers: list[nn.Module] = []
        width = in_channels
        for _ in range(steps):
            narrower = max(min_width, width // 2)
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(width, narrower, 3, padding=1, bias=False),
                       nn.BatchNorm2d(narrower), nn.ReLU(inplace=True)]
            width = narrower
        layers.append(nn.Conv2d(width, out_channels, 1))
        super().__init__(*layers)
