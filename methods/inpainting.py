"""Context encoders — Pathak, Krähenbühl, Donahue, Darrell, Efros, "Context Encoders: Feature
Learning by Inpainting", CVPR 2016, arXiv:1604.07379.

A region of the image is removed (the central block, or several random blocks covering up to a
quarter of it) and filled with the mean colour; an encoder-decoder reconstructs the missing
pixels. The reconstruction loss is a squared error over the removed region. As in the paper, the prediction can extend `overlap` pixels into the visible context
around the hole, where the loss weight is 10x, so the fill blends with its border. The encoder is
the backbone, its feature map decoded by upsampling convolutions (`methods.dense`).

The optional adversarial loss (paper: 0.999 reconstruction + 0.001 adversarial) has a
discriminator tell the original image from the image with the prediction pasted into the removed
region. The plain training loop does one `loss.backward()` and one optimiser step over all
parameters, so the two players' objectives are summed such that one backward pass gives each
player the gradient of its own objective only:

    loss = (1 - w) * L_rec + w * BCE(D_frozen(fake), 1)                # the encoder-decoder
           + BCE(D(real), 1) + BCE(D(fake.detach()), 0)                 # the discriminator

D_frozen is the discriminator called with detached copies of its parameters
(`torch.func.functional_call`): the generator term moves the encoder-decoder (the non-saturating
generator loss) but never the discriminator, and the discriminator terms see a detached fake, so
they move only the discriminator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from methods import augment
from methods.backbones import MEAN, BackboneConfig, build_backbone, normalize
from methods.base import SSLMethod
from methods.config import param
from methods.dense import UpDecoder, feature_map, output_stride, upsampling_steps
from methods.patches import random_translate
from methods.registry import register

FILL = tuple(round(255 * m) for m in MEAN)  # the mean colour: 0 after `normalize`


@dataclass
class InpaintingConfig:
    mask: str = param("central", choices=("central", "random_blocks"), tunable=True,
                      help="remove the central block, or num_blocks random blocks")
    # Paper: a 64 px central block of a 128 px image; random blocks remove up to 1/4 of it.
    block_fraction: float = param(0.5, gt=0, lt=1, tunable=True,
                                  help="central block side / image side; random blocks are "
                                       "half as wide")
    num_blocks: int = param(4, ge=1, help="blocks of the random_blocks mask (may overlap)")
    # Paper: the prediction overlaps the context by 4 px (of 128) with a 10x loss weight there.
    overlap: int = param(1, ge=0, help="pixels of context around the hole also predicted")
    overlap_weight: float = param(10.0, ge=0, help="loss weight of those context pixels")
    adv_weight: float = param(0.001, ge=0, lt=1, tunable=True,
                              help="w of the adversarial term (paper 0.001; 0 turns it off)")
    disc_width: int = param(32, ge=4, help="width of the discriminator's first layer")
    # Paper, section 5: "a higher learning rate for context encoder (10 times) to that of
    # adversarial discriminator".
    disc_lr_ratio: float = param(0.1, gt=0, help="discriminator lr / context encoder lr")
    crop_padding: int = param(0, ge=0, help="random translation by pad-and-crop (px)")


def block_masks(batch: int, size: int, kind: str, block_fraction: float, num_blocks: int,
                generator: torch.Generator) -> torch.Tensor:
    """The removed region (B, 1, S, S) uint8, 1 = removed."""
    mask = torch.zeros(batch, 1, size, size, dtype=torch.uint8)
    if kind == "central":
        side = max(1, round(block_fraction * size))
        start = (size - side) // 2
        mask[..., start:start + side, start:start + side] = 1
        return mask
    side = max(1, round(block_fraction * size / 2))
    corners = torch.randint(0, size - side + 1, (batch, num_blocks, 2), generator=generator)
    span = torch.arange(size)
    for k in range(num_blocks):
        rows = (span >= corners[:, k, 0, None]) & (span < corners[:, k, 0, None] + side)  # (B, S)
        cols = (span >= corners[:, k, 1, None]) & (span < corners[:, k, 1, None] + side)
        mask[:, 0] |= (rows[:, :, None] & cols[:, None, :]).to(torch.uint8)
    return mask


class MaskedViews:
    """images uint8 (B, 3, S, S) -> {"image": uint8 (B, 3, S, S) the target, "mask": uint8
    (B, 1, S, S) 1 where removed, "masked": uint8 (B, 3, S, S) the image with the removed region
    filled with the mean colour}."""

    def __init__(self, mask: str, block_fraction: float, num_blocks: int, crop_padding: int,
                 image_size: int):
        self.mask, self.block_fraction, self.num_blocks = mask, block_fraction, num_blocks
        self.padding, self.size = crop_padding, image_size

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        image = random_translate(augment.fit_size(images, self.size), self.padding,
                                 generator=generator)
        mask = block_masks(image.shape[0], self.size, self.mask, self.block_fraction,
                           self.num_blocks, generator)
        fill = torch.tensor(FILL, dtype=torch.uint8).view(1, 3, 1, 1)
        masked = torch.where(mask.bool(), fill, image)
        return {"image": image, "mask": mask, "masked": masked}


def discriminator(width: int) -> nn.Sequential:
    """Strided 4x4 convolutions with leaky ReLUs (the DCGAN pattern the paper follows), global
    average pool, one real/fake logit. No batch norm, so a functional call needs no buffers."""
    return nn.Sequential(
        nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(2 * width, 4 * width, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 1))


def loss_weights(mask: torch.Tensor, overlap: int, overlap_weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, S, S): 1 in the hole, overlap_weight within `overlap` px
    of it in the context, 0 elsewhere."""
    hole = mask.float()
    if overlap == 0:
        return hole
    around = F.max_pool2d(hole, 2 * overlap + 1, stride=1, padding=overlap)  # hole dilated
    return hole + overlap_weight * (around - hole)


class ContextEncoder(SSLMethod):
    def __init__(self, cfg: InpaintingConfig, backbone: BackboneConfig, image_size: int):
        super().__init__()
        self.overlap, self.overlap_weight = cfg.overlap, cfg.overlap_weight
        self.adv_weight, self.disc_lr_ratio = cfg.adv_weight, cfg.disc_lr_ratio
        self.backbone, _ = build_backbone(backbone, image_size)
        channels, stride = output_stride(self.backbone, 3, image_size)
        self.decoder = UpDecoder(channels, 3, upsampling_steps(stride, 1))
        self.discriminator = discriminator(cfg.disc_width) if cfg.adv_weight > 0 else None

    def reconstruct(self, masked: torch.Tensor) -> torch.Tensor:
        """masked uint8 (B, 3, S, S) -> predicted image (B, 3, S, S) in [0, 1]."""
        return torch.sigmoid(self.decoder(feature_map(self.backbone, normalize(masked))))

    def _adversarial(self, image: torch.Tensor,
                     fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(generator term, discriminator term) on the predicted region, real against predicted;
        each term moves only its own player's parameters."""
        d = self.discriminator
        frozen = {name: p.detach() for name, p in d.named_parameters()}
        fake_logit_g = functional_call(d, frozen, (normalize(fake),))  # (B, 1), D fixed
        real_logit = d(normalize(image))  # (B, 1)
        fake_logit_d = d(normalize(fake.detach()))  # (B, 1), generator fixed
        ones, zeros = torch.ones_like(real_logit), torch.zeros_like(real_logit)
        g_loss = F.binary_cross_entropy_with_logits(fake_logit_g, ones)
        d_loss = (F.binary_cross_entropy_with_logits(real_logit, ones)
                  + F.binary_cross_entropy_with_logits(fake_logit_d, zeros))
        return g_loss, d_loss

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        image = batch["image"].float() / 255.0  # (B, 3, S, S)
        pred = self.reconstruct(batch["masked"])  # (B, 3, S, S)
        weights = loss_weights(batch["mask"], self.overlap, self.overlap_weight)
        squared = ((pred - image) ** 2).mean(dim=1, keepdim=True)  # (B, 1, S, S)
        rec = (weights * squared).sum() / weights.sum().clamp_min(1e-8)
        metrics = {"rec": rec.detach()}
        if self.discriminator is None:
            return rec, metrics
        # The discriminator sees only the predicted region, real or predicted, on the same grey
        # surround (the reference shows it the central patch alone): a prediction pasted into its
        # context would give itself away at the seam.
        region = (weights > 0).float()  # (B, 1, S, S)
        grey = torch.tensor(FILL, device=image.device).view(1, 3, 1, 1) / 255.0
        real = image * region + grey * (1 - region)
        fake = pred * region + grey * (1 - region)
        w = self.adv_weight
        g_loss, d_loss = self._adversarial(real, fake)
        loss = (1 - w) * rec + w * g_loss + d_loss
        return loss, {**metrics, "adv_g": g_loss.detach(), "adv_d": d_loss.detach()}

    def lr_scales(self) -> dict[str, float]:
        return {"discriminator.": self.disc_lr_ratio}

    @torch.no_grad()
    def pretext_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Squared and absolute error per removed pixel and channel, pixels in [0, 1]."""
        image = batch["image"].float() / 255.0
        error = self.reconstruct(batch["masked"]) - image  # (B, 3, S, S)
        hole = batch["mask"].float().expand_as(error)
        count = hole.sum().clamp_min(1.0)
        return {"masked_mse": float((error ** 2 * hole).sum() / count),
                "masked_l1": float((error.abs() * hole).sum() / count)}

    @torch.no_grad()
    def log_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = min(8, batch["image"].shape[0])
        image = batch["image"][:n].float() / 255.0
        hole = batch["mask"][:n].float()
        pred = self.reconstruct(batch["masked"][:n])
        return {"inpainting/masked": batch["masked"][:n], "inpainting/original": image,
                "inpainting/filled": image * (1 - hole) + pred * hole}


def views(cfg: InpaintingConfig, image_size: int) -> MaskedViews:
    return MaskedViews(cfg.mask, cfg.block_fraction, cfg.num_blocks, cfg.crop_padding, image_size)


register("inpainting", config=InpaintingConfig, model=ContextEncoder, views=views,
         tiny={"method": {"disc_width": 8}, "backbone": {"width": 4}, "image_size": 16},
         paper="Pathak, Krähenbühl, Donahue, Darrell, Efros 2016, arXiv:1604.07379")
