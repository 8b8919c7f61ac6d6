"""RotNet — Gidaris, Singh, Komodakis, "Unsupervised Representation Learning by Predicting Image
Rotations", ICLR 2018, arXiv:1803.07728.

Every image is shown rotated by 0, 90, 180 and 270 degrees, and a classifier on the encoder's
pooled features names the rotation. All four rotations of an image go into the same batch, which
the paper found better than one random rotation per image. The views put the four rotations of
each image in a random order, so the label is a property of the pixels and not of a slot.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods import augment
from methods.backbones import BackboneConfig, build_backbone, normalize
from methods.base import SSLMethod
from methods.config import param
from methods.patches import random_translate
from methods.registry import register

ROTATIONS = 4


@dataclass
class RotNetConfig:
    # The paper's CIFAR-10 training uses the standard augmentation: 4 px pad-and-crop, h-flips.
    crop_padding: int = param(4, ge=0, tunable=True, help="random translation by pad-and-crop (px)")
    flip_p: float = param(0.5, ge=0, le=1, help="horizontal flip probability (0 for digits)")


class RotationViews:
    """images uint8 (B, 3, S, S) -> {"rotations": uint8 (B, 4, 3, S, S), "rotation": (B, 4) long}:
    rotations[b, i] is the (augmented) image b turned by rotation[b, i] quarter turns (counter-
    clockwise, as torch.rot90), each of the four turns once per image, in a random order."""

    def __init__(self, padding: int, flip_p: float, image_size: int):
        self.padding, self.flip_p, self.size = padding, flip_p, image_size

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x = random_translate(augment.fit_size(images, self.size), self.padding, generator=generator)
        x = augment.random_hflip(x, self.flip_p, generator=generator)
        order = torch.rand(x.shape[0], ROTATIONS, generator=generator).argsort(1)  # (B, 4)
        rotated = torch.stack([augment.rotate90(x, order[:, i]) for i in range(ROTATIONS)], 1)
        return {"rotations": rotated, "rotation": order}


class RotNet(SSLMethod):
    def __init__(self, cfg: RotNetConfig, backbone: BackboneConfig, image_size: int):
        super().__init__()
        self.backbone, dim = build_backbone(backbone, image_size)
        self.classifier = nn.Linear(dim, ROTATIONS)  # on pooled features, as the paper's ResNets

    def logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (4B, 4), labels (4B,)) for every rotated view of the batch."""
        views = batch["rotations"].flatten(0, 1)  # (4B, 3, S, S)
        return self.classifier(self.backbone(normalize(views))), batch["rotation"].flatten()

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logits, labels = self.logits(batch)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        return loss, {"rotation_acc": accuracy}

    @torch.no_grad()
    def pretext_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        logits, labels = self.logits(batch)
        return {"rotation_acc": float((logits.argmax(1) == labels).float().mean())}

    def log_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = min(8, batch["rotations"].shape[0])
        return {"views/rotations": batch["rotations"][:n].flatten(0, 1)}


def views(cfg: RotNetConfig, image_size: int) -> RotationViews:
    return RotationViews(cfg.crop_padding, cfg.flip_p, image_size)


register("rotnet", config=RotNetConfig, model=RotNet, views=views,
         paper="Gidaris, Singh, Komodakis 2018, arXiv:1803.07728",
         tiny={"method": {"crop_padding": 1, "flip_p": 0.0}, "backbone": {"width": 4},
               "image_size": 16})
