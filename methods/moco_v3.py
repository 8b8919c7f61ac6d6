"""MoCo v3 — Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers",
ICCV 2021, arXiv:2104.02057.

A ViT backbone with a 3-layer projection head and a 2-layer prediction head (BN in the hidden
layers, a last BN without affine on the projection), a momentum encoder (backbone + projection)
whose momentum rises from 0.99 to 1 on a cosine schedule, and the symmetric contrastive loss
ctr(q1, k2) + ctr(q2, k1) against the keys of the (global) batch — no queue. The patch
projection is a frozen random layer, the paper's stability trick (section 4.2). Augmentation is
BYOL's asymmetric pair: blur 1.0 on the first view, blur 0.1 and solarisation 0.2 on the second.

Features for evaluation are the backbone's CLS token, on which the loss is trained.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.backbones import BackboneConfig, build_backbone, normalize
from methods.base import SSLMethod
from methods.config import param
from methods.heads import mlp
from methods.losses import contrastive_batch_loss
from methods.momentum import cosine_momentum, ema_update_, momentum_copy
from methods.registry import register
from methods.views import AugmentConfig, PairViews, asymmetric, byol_aug, check_probabilities
from methods.vit import ViT


@dataclass
class MoCoV3Config:
    # Chen, Xie, He 2021, section 4 and appendix: T = 0.2 for ViT (1.0 for ResNet), m = 0.99
    # raised to 1 by a half-cycle cosine, MLPs of width 4096 with a 256-d output.
    temperature: float = param(0.2, gt=0, tunable=True, help="contrastive temperature tau")
    base_momentum: float = param(0.99, ge=0, le=1, tunable=True, help="m at step 0; cosine to 1")
    proj_layers: int = param(3, ge=1, help="projection MLP depth (ViT 3, ResNet 2)")
    proj_hidden_dim: int = param(4096, ge=1)
    proj_dim: int = param(256, ge=1)
    pred_hidden_dim: int = param(4096, ge=1)
    freeze_patch_embed: bool = param(True, help="random, frozen ViT patch projection (sec. 4.2)")
    blur_p: tuple[float, float] = param((1.0, 0.1), help="blur probability of view 1, view 2")
    solarize_p: tuple[float, float] = param((0.0, 0.2), help="solarisation of view 1, view 2")
    aug: AugmentConfig = param(default_factory=byol_aug)

    def validate(self, prefix: str) -> None:
        check_probabilities(self, prefix)


def views(cfg: MoCoV3Config, image_size: int) -> PairViews:
    return PairViews(asymmetric(cfg.aug, cfg.blur_p, cfg.solarize_p), image_size)


class MoCoV3(SSLMethod):
    def __init__(self, cfg: MoCoV3Config, backbone: BackboneConfig, image_size: int):
        super().__init__()
        self.temperature, self.base_momentum = cfg.temperature, cfg.base_momentum
        self.backbone, dim = build_backbone(backbone, image_size)
        if cfg.freeze_patch_embed and isinstance(self.backbone, ViT):
            self.backbone.patch_embed.requires_grad_(False)
        self.projector = mlp(dim, cfg.proj_hidden_dim, cfg.proj_dim, num_layers=cfg.proj_layers,
                             last_batch_norm=True)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, num_layers=2,
                             last_bias=False)
        self.backbone_k = momentum_copy(self.backbone)
        self.projector_k = momentum_copy(self.projector)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x1, x2 = normalize(batch["view1"]), normalize(batch["view2"])
        q1 = self.predictor(self.projector(self.backbone(x1)))  # (B, C)
        q2 = self.predictor(self.projector(self.backbone(x2)))  # (B, C)
        with torch.no_grad():
            k1 = self.projector_k(self.backbone_k(x1))  # (B, C)
            k2 = self.projector_k(self.backbone_k(x2))  # (B, C)
        loss = (contrastive_batch_loss(q1, k2, self.temperature)
                + contrastive_batch_loss(q2, k1, self.temperature))
        with torch.no_grad():
            pos_sim = (F.cosine_similarity(q1, k2).mean() + F.cosine_similarity(q2, k1).mean()) / 2
        return loss, {"pos_sim": pos_sim}

    def on_step(self, step: int, total_steps: int) -> None:
        m = cosine_momentum(step, total_steps, self.base_momentum)
        ema_update_(self.backbone_k, self.backbone, m)
        ema_update_(self.projector_k, self.projector, m)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone_k, self.backbone), (self.projector_k, self.projector)]

    def log_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = min(16, batch["view1"].shape[0])
        return {"views/view1": batch["view1"][:n], "views/view2": batch["view2"][:n]}


register("moco_v3", config=MoCoV3Config, model=MoCoV3, views=views,
         paper="Chen, Xie, He 2021, arXiv:2104.02057",
         tiny={"method": {"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16},
               "backbone": {"name": "vit_tiny", "depth": 1, "patch_size": 4}, "image_size": 16})
