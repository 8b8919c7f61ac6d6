"""Split-brain autoencoders — Zhang, Isola, Efros, "Split-Brain Autoencoders: Unsupervised
Learning by Cross-Channel Prediction", CVPR 2017, arXiv:1611.09842.

The network is split into two disjoint halves, each with half the channels of the full network:
F1 sees the lightness L and predicts the colour ab, F2 sees ab and predicts L. Each is a
cross-channel encoder trained as a per-pixel classifier over quantised values — the paper's best
variant (classification for both halves): ab over the grid-10 gamut bins of colorization
(Zhang et al., 2016, arXiv:1603.08511), L over 50 bins of width 2 — or with an L2 regression
(`loss: regression`). Targets here are each pixel's nearest bin, without class rebalancing. The
representation is the concatenation of both halves' pooled features on the full Lab image.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.backbones import BackboneConfig, build_backbone
from methods.base import SSLMethod
from methods.color import ab_bins, decode_ab
from methods.colorization import (AB_RANGE, L_MID, LabViews, check_crop_scale, colorized,
                                  lab_of, lightness_input)
from methods.config import param
from methods.dense import UpDecoder, feature_map, output_stride, set_in_channels, upsampling_steps
from methods.registry import register

L_MAX = 100.0


@dataclass
class SplitBrainConfig:
    loss: str = param("classification", choices=("classification", "regression"), tunable=True,
                      help="cross-entropy over quantised channels (paper's best) or L2")
    grid: float = param(10.0, gt=0, help="ab bin size (paper 10)")
    l_bins: int = param(50, ge=2, help="bins of L in [0, 100] (paper 50)")
    temperature: float = param(0.38, gt=0, help="annealed mean when decoding ab for metrics")
    output_stride: int = param(4, ge=1, help="predictions at 1/output_stride of the input")
    half_width: bool = param(True, help="each half gets half of backbone.width (resnet_small)")
    crop_scale: tuple[float, float] = param((1.0, 1.0), help="random resized crop area range")
    flip_p: float = param(0.5, ge=0, le=1, help="horizontal flip probability")

    def validate(self, prefix: str) -> None:
        check_crop_scale(self.crop_scale, prefix)


def ab_input(ab: torch.Tensor) -> torch.Tensor:
    return ab / AB_RANGE  # (B, 2, H, W), about [-1, 1]


def l_labels(lightness: torch.Tensor, bins: int) -> torch.Tensor:
    """L (B, 1, h, w) in [0, 100] -> bin index (B, h, w) long in [0, bins)."""
    return (lightness[:, 0] * (bins / L_MAX)).long().clamp_(0, bins - 1)


def nearest_bins(ab: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """ab (B, 2, h, w) -> index (B, h, w) of the nearest of `bins` (Q, 2)."""
    flat = ab.permute(0, 2, 3, 1).reshape(-1, 2)  # (B*h*w, 2)
    return torch.cdist(flat, bins.to(flat)).argmin(1).view(ab.shape[0], *ab.shape[2:])


class SplitEncoder(nn.Module):
    """The two halves; (L input (B, 1, S, S), ab input (B, 2, S, S)) -> (B, D1 + D2)."""

    def __init__(self, l_net: nn.Module, ab_net: nn.Module):
        super().__init__()
        self.l_net, self.ab_net = l_net, ab_net

    def forward(self, l_in: torch.Tensor, ab_in: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.l_net(l_in), self.ab_net(ab_in)], 1)


def _half(backbone: BackboneConfig, half_width: bool) -> BackboneConfig:
    if half_width and backbone.name == "resnet_small":
        return dataclasses.replace(backbone, width=max(4, backbone.width // 2))
    return backbone


class SplitBrain(SSLMethod):
    def __init__(self, cfg: SplitBrainConfig, backbone: BackboneConfig, image_size: int):
        super().__init__()
        self.loss_kind, self.l_bins, self.temperature = cfg.loss, cfg.l_bins, cfg.temperature
        half = _half(backbone, cfg.half_width)
        nets, decoders = [], []
        self.register_buffer("bins", ab_bins(cfg.grid), persistent=False)  # (Q, 2)
        classes = (len(self.bins), cfg.l_bins) if cfg.loss == "classification" else (2, 1)
        for in_channels, out_channels in zip((1, 2), classes):  # F1: L -> ab, F2: ab -> L
            net, _ = build_backbone(half, image_size)
            set_in_channels(net, in_channels)
            channels, stride = output_stride(net, in_channels, image_size)
            steps = upsampling_steps(stride, cfg.output_stride)
            nets.append(net)
            decoders.append(UpDecoder(channels, out_channels, steps))
        self.backbone = SplitEncoder(*nets)
        self.to_ab, self.to_l = decoders

    def predict(self, lightness: torch.Tensor,
                ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F1's ab output (B, Q or 2, h, w), F2's L output (B, l_bins or 1, h, w))."""
        ab_out = self.to_ab(feature_map(self.backbone.l_net, lightness_input(lightness)))
        l_out = self.to_l(feature_map(self.backbone.ab_net, ab_input(ab)))
        return ab_out, l_out

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        ab_out, l_out = self.predict(batch["L"], batch["ab"])
        ab = F.adaptive_avg_pool2d(batch["ab"], ab_out.shape[-2:])  # (B, 2, h, w) targets
        lightness = F.adaptive_avg_pool2d(batch["L"], l_out.shape[-2:])  # (B, 1, h, w)
        if self.loss_kind == "classification":
            loss_ab = F.cross_entropy(ab_out.float(), nearest_bins(ab, self.bins))
            loss_l = F.cross_entropy(l_out.float(), l_labels(lightness, self.l_bins))
        else:
            loss_ab = F.mse_loss(ab_out, ab_input(ab))
            loss_l = F.mse_loss(l_out, lightness_input(lightness))
        return loss_ab + loss_l, {"loss_l_to_ab": loss_ab.detach(), "loss_ab_to_l": loss_l.detach()}

    def decode(self, ab_out: torch.Tensor,
               l_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs -> (ab (B, 2, h, w), L (B, 1, h, w)) in Lab units: annealed mean of the ab
        distribution, expected L of the L distribution (bin centres), or the regressed values."""
        if self.loss_kind == "regression":
            return ab_out * AB_RANGE, l_out * L_MID + L_MID
        width = L_MAX / self.l_bins
        centres = (torch.arange(self.l_bins, device=l_out.device) + 0.5) * width  # (K,)
        lightness = torch.einsum("bkhw,k->bhw", l_out.softmax(1), centres).unsqueeze(1)
        return decode_ab(ab_out, self.bins, self.temperature), lightness

    @torch.no_grad()
    def pretext_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per-pixel ab distance of F1's colours (and of grey), absolute L error of F2."""
        size = batch["L"].shape[-2:]
        ab_pred, l_pred = (F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                           for x in self.decode(*self.predict(batch["L"], batch["ab"])))
        return {"ab_l2": float((ab_pred - batch["ab"]).norm(dim=1).mean()),
                "ab_l2_gray": float(batch["ab"].norm(dim=1).mean()),
                "l_abs": float((l_pred - batch["L"]).abs().mean())}

    @torch.no_grad()
    def log_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lightness, ab = batch["L"][:8], batch["ab"][:8]
        ab_pred, l_pred = self.decode(*self.predict(lightness, ab))
        l_full = F.interpolate(l_pred, size=lightness.shape[-2:], mode="bilinear",
                               align_corners=False)
        return {"split_brain/L_to_ab": colorized(lightness, ab_pred),
                "split_brain/ab_to_L": colorized(l_full, ab),
                "split_brain/truth": colorized(lightness, ab)}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        lab = lab_of(images)  # (B, 3, S, S)
        return self.backbone(lightness_input(lab[:, :1]), ab_input(lab[:, 1:]))  # (B, D1 + D2)


def views(cfg: SplitBrainConfig, image_size: int) -> LabViews:
    return LabViews(cfg.crop_scale, cfg.flip_p, image_size)


register("split_brain", config=SplitBrainConfig, model=SplitBrain, views=views,
         paper="Zhang, Isola, Efros 2017, arXiv:1611.09842",
         tiny={"backbone": {"width": 8}, "image_size": 16})
