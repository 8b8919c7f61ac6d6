"""Colorization — Zhang, Isola, Efros, "Colorful Image Colorization", ECCV 2016, arXiv:1603.08511.

Images go to CIELAB; a fully convolutional network sees only the lightness L and predicts the
colour ab of every pixel at a quarter of the input resolution. The paper's loss is a
classification over the quantised ab gamut (grid 10): targets are soft-encoded over the 5 nearest
bins, and each pixel's cross-entropy is weighted by the rebalancing weight of its nearest bin,
w ~ ((1 - lambda) p~ + lambda / Q)^-1 with the smoothed empirical colour prior p~ (lambda 0.5), so
rare saturated colours are not drowned by the greys. Predictions decode to ab with the annealed
mean (T 0.38). `loss: regression` is the paper's plain L2 baseline on ab.

The prior p~ is estimated from the training data as it streams by: every training batch adds its
smoothed ab histogram (averaged over workers, so every replica holds the same prior) to the
buffer `prior_sum`, so the estimate is checkpointed with the model. The representation is the
encoder's pooled features of the L channel (`embed` converts the RGB input itself).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods import augment
from methods.backbones import BackboneConfig, build_backbone
from methods.base import SSLMethod
from methods.color import (ab_bins, ab_prior, decode_ab, encode_ab, lab_to_rgb,
                           rebalance_weights, rgb_to_lab)
from methods.config import ConfigError, param
from methods.dense import UpDecoder, feature_map, output_stride, set_in_channels, upsampling_steps
from methods.distributed import all_reduce_mean_
from methods.registry import register

L_MID, AB_RANGE = 50.0, 110.0  # network inputs and regression targets are scaled to about [-1, 1]


@dataclass
class ColorizationConfig:
    loss: str = param("classification", choices=("classification", "regression"), tunable=True,
                      help="ab bins with rebalancing (paper) or L2 on ab (the paper's baseline)")
    grid: float = param(10.0, gt=0, help="ab bin size (paper 10)")
    sigma: float = param(5.0, gt=0, help="soft-encoding Gaussian width in ab units (paper 5)")
    neighbours: int = param(5, ge=1, help="bins each target is spread over (paper 5)")
    rebalance_lambda: float = param(0.5, ge=0, le=1, tunable=True,
                                    help="prior/uniform mix of the class weights (paper 0.5; "
                                         "1 = no rebalancing)")
    temperature: float = param(0.38, gt=0, help="annealed-mean temperature (paper 0.38)")
    output_stride: int = param(4, ge=1, help="predictions at 1/output_stride of the input "
                                            "(paper 4)")
    crop_scale: tuple[float, float] = param((1.0, 1.0), help="random resized crop area range")
    flip_p: float = param(0.5, ge=0, le=1, help="horizontal flip probability")

    def validate(self, prefix: str) -> None:
        check_crop_scale(self.crop_scale, prefix)


def check_crop_scale(crop_scale: tuple[float, float], prefix: str) -> None:
    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"{prefix}.crop_scale: {list(crop_scale)} must satisfy "
                          f"0 < low <= high <= 1")


class LabViews:
    """images uint8 (B, 3, S, S) -> {"L": (B, 1, S, S) in [0, 100], "ab": (B, 2, S, S)} float32:
    the CIELAB channels of a random resized crop (optionally flipped) of each image."""

    def __init__(self, crop_scale: tuple[float, float], flip_p: float, image_size: int):
        self.crop_scale, self.flip_p, self.size = tuple(crop_scale), flip_p, image_size

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x = augment.to_float(images)
        if self.crop_scale != (1.0, 1.0) or x.shape[-1] != self.size:
            x = augment.random_resized_crop(x, self.size, self.crop_scale, generator=generator)
            x = x.clamp_(0.0, 1.0)
        lab = rgb_to_lab(augment.random_hflip(x, self.flip_p, generator=generator))
        return {"L": lab[:, :1].contiguous(), "ab": lab[:, 1:].contiguous()}


def lightness_input(lightness: torch.Tensor) -> torch.Tensor:
    """L (B, 1, H, W) in [0, 100] -> network input in [-1, 1] (the paper centres L at 50)."""
    return (lightness - L_MID) / L_MID


def lab_of(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (B, 3, H, W) -> CIELAB (B, 3, H, W)."""
    return rgb_to_lab(augment.to_float(images))


def colorized(lightness: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] (B, 3, H, W) of L (B, 1, H, W) and ab (B, 2, h, w) upsampled to L's size."""
    ab = F.interpolate(ab, size=lightness.shape[-2:], mode="bilinear", align_corners=False)
    return lab_to_rgb(torch.cat([lightness, ab], 1))


class Colorization(SSLMethod):
    def __init__(self, cfg: ColorizationConfig, backbone: BackboneConfig, image_size: int):
        super().__init__()
        self.loss_kind, self.rebalance_lambda = cfg.loss, cfg.rebalance_lambda
        self.sigma, self.neighbours, self.temperature = cfg.sigma, cfg.neighbours, cfg.temperature
        self.backbone, _ = build_backbone(backbone, image_size)
        set_in_channels(self.backbone, 1)
        channels, stride = output_stride(self.backbone, 1, image_size)
        self.register_buffer("bins", ab_bins(cfg.grid), persistent=False)  # (Q, 2)
        outputs = len(self.bins) if cfg.loss == "classification" else 2
        self.decoder = UpDecoder(channels, outputs, upsampling_steps(stride, cfg.output_stride))
        self.register_buffer("prior_sum", torch.zeros(len(self.bins)))  # (Q,) sum of batch priors

    def predict(self, lightness: torch.Tensor) -> torch.Tensor:
        """L (B, 1, S, S) -> ab logits (B, Q, h, w) or ab / AB_RANGE (B, 2, h, w)."""
        return self.decoder(feature_map(self.backbone, lightness_input(lightness)))

    def predict_ab(self, lightness: torch.Tensor) -> torch.Tensor:
        """L (B, 1, S, S) -> predicted ab (B, 2, h, w) in ab units (annealed mean or regression)."""
        out = self.predict(lightness)
        if self.loss_kind == "classification":
            return decode_ab(out, self.bins, self.temperature)
        return out * AB_RANGE

    def class_weights(self) -> torch.Tensor:
        """Rebalancing weights (Q,) from the prior seen so far (uniform before any data)."""
        if float(self.prior_sum.sum()) <= 0:
            return torch.ones_like(self.prior_sum)
        return rebalance_weights(self.prior_sum, self.rebalance_lambda)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        out = self.predict(batch["L"])  # (B, Q or 2, h, w)
        ab = F.adaptive_avg_pool2d(batch["ab"], out.shape[-2:])  # (B, 2, h, w) targets
        if self.loss_kind == "regression":
            return F.mse_loss(out, ab / AB_RANGE), {}
        if self.training:  # the batch's colours join the prior in on_step
            with torch.no_grad():
                self.pending["prior"] = ab_prior(ab.float(), self.bins, self.sigma)  # (Q,)
        targets = encode_ab(ab.float(), self.bins, self.sigma, self.neighbours)
        weights = self.class_weights()[targets.argmax(1)]  # (B, h, w), of each nearest bin
        cross_entropy = -(targets * F.log_softmax(out.float(), 1)).sum(1)  # (B, h, w)
        return (weights * cross_entropy).mean(), {"ce": cross_entropy.detach().mean()}

    @torch.no_grad()
    def on_step(self, step: int, total_steps: int) -> None:
        prior = self.pending.pop("prior", None)
        if self.loss_kind == "classification":  # every worker, every step: a collective
            self.prior_sum += all_reduce_mean_(torch.zeros_like(self.prior_sum) if prior is None
                                               else prior)

    def step_buffers(self) -> list[str]:
        return ["prior_sum"] if self.loss_kind == "classification" else []

    @torch.no_grad()
    def pretext_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean per-pixel ab distance of the prediction, and of grey (ab = 0) for reference."""
        ab_pred = F.interpolate(self.predict_ab(batch["L"]), size=batch["ab"].shape[-2:],
                                mode="bilinear", align_corners=False)
        return {"ab_l2": float((ab_pred - batch["ab"]).norm(dim=1).mean()),
                "ab_l2_gray": float(batch["ab"].norm(dim=1).mean())}

    @torch.no_grad()
    def log_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lightness, ab = batch["L"][:8], batch["ab"][:8]
        return {"colorization/input_L": colorized(lightness, torch.zeros_like(ab)),
                "colorization/predicted": colorized(lightness, self.predict_ab(lightness)),
                "colorization/truth": colorized(lightness, ab)}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(lightness_input(lab_of(images)[:, :1]))  # (B, D)


def views(cfg: ColorizationConfig, image_size: int) -> LabViews:
    return LabViews(cfg.crop_scale, cfg.flip_p, image_size)


register("colorization", config=ColorizationConfig, model=Colorization, views=views,
         paper="Zhang, Isola, Efros 2016, arXiv:1603.08511",
         tiny={"backbone": {"width": 4}, "image_size": 16})
