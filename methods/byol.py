"""BYOL — Grill, Strub, Altché, Tallec, Richemond, Buchatskaya, Doersch, Pires, Guo, Azar, Piot,
Kavukcuoglu, Munos, Valko, "Bootstrap Your Own Latent: A New Approach to Self-Supervised
Learning", NeurIPS 2020, arXiv:2006.07733.

No negatives: an online network (encoder f, projector g, predictor q) predicts the projection of
another view made by a target network (f and g only), the exponential moving average of the online
one (tau from 0.996 raised to 1 by a cosine). The loss is the normalised MSE
2 - 2 cos(q(g(f(v))), g'(f'(v'))), symmetrised over the two views; only the online network gets
gradients. The two views are augmented asymmetrically (appendix B: blur 1.0 / 0.1, solarisation
0 / 0.2). Features for evaluation are the online encoder's (section 4), as the paper evaluates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from methods.backbones import BackboneConfig, build_backbone, normalize
from methods.base import SSLMethod
from methods.config import param
from methods.heads import mlp
from methods.losses import byol_loss
from methods.momentum import cosine_momentum, ema_update_, momentum_copy
from methods.registry import register
from methods.views import AugmentConfig, PairViews, asymmetric, byol_aug, check_probabilities


@dataclass
class BYOLConfig:
    # Grill et al. 2020, section 3.3 and appendix B/C: MLPs 4096 wide to 256, tau_base 0.996.
    proj_hidden_dim: int = param(4096, ge=1, help="hidden width of the projector and predictor")
    proj_dim: int = param(256, ge=1, tunable=True, help="output width of projector and predictor")
    base_momentum: float = param(0.996, ge=0, le=1, tunable=True,
                                 help="tau of the target network at step 0; cosine to 1")
    blur_p: tuple[float, float] = param((1.0, 0.1), help="blur probability of view 1, view 2")
    solarize_p: tuple[float, float] = param((0.0, 0.2), help="solarisation of view 1, view 2")
    aug: AugmentConfig = param(default_factory=byol_aug)

    def validate(self, prefix: str) -> None:
        check_probabilities(self, prefix)


class BYOL(SSLMethod):
    def __init__(self, cfg: BYOLConfig, backbone: BackboneConfig, image_size: int):
        super().__init__()
        self.base_momentum = cfg.base_momentum
        self.backbone, dim = build_backbone(backbone, image_size)  # f_theta
        self.projector = mlp(dim, cfg.proj_hidden_dim, cfg.proj_dim)  # g_theta
        self.predictor = mlp(cfg.proj_dim, cfg.proj_hidden_dim, cfg.proj_dim)  # q_theta
        self.target_backbone = momentum_copy(self.backbone)  # f_xi
        self.target_projector = momentum_copy(self.projector)  # g_xi

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x = normalize(torch.cat([batch["view1"], batch["view2"]]))  # (2B, 3, H, W)
        p1, p2 = self.predictor(self.projector(self.backbone(x))).chunk(2)  # (B, C) each
        with torch.no_grad():
            z1, z2 = self.target_projector(self.target_backbone(x)).chunk(2)  # (B, C) each
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)  # each view predicts the other's target
        return loss, {"target_std": torch.cat([z1, z2]).std(dim=0).mean()}

    def on_step(self, step: int, total_steps: int) -> None:
        tau = cosine_momentum(step, total_steps, self.base_momentum)
        ema_update_(self.target_backbone, self.backbone, tau)
        ema_update_(self.target_projector, self.projector, tau)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.target_backbone, self.backbone), (self.target_projector, self.projector)]

    def log_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = min(16, batch["view1"].shape[0])
        return {"views/view1": batch["view1"][:n], "views/view2": batch["view2"][:n]}


def views(cfg: BYOLConfig, image_size: int) -> PairViews:
    return PairViews(asymmetric(cfg.aug, cfg.blur_p, cfg.solarize_p), image_size)


register("byol", config=BYOLConfig, model=BYOL, views=views,
         paper="Grill et al. 2020, arXiv:2006.07733",
         tiny={"method": {"proj_hidden_dim": 16, "proj_dim": 8},
               "backbone": {"name": "resnet_small", "width": 4}, "image_size": 16})
