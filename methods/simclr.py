"""SimCLR — Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020, arXiv:2002.05709.

Two augmented views of each image, a shared encoder f and a 2-layer projection head g, and the
NT-Xent loss where every other view in the (global) batch is a negative.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.backbones import BackboneConfig, build_backbone, normalize
from methods.base import SSLMethod
from methods.config import param
from methods.heads import mlp
from methods.losses import nt_xent
from methods.registry import register
from methods.views import AugmentConfig, TwoViews


@dataclass
class SimCLRConfig:
    # 0.5 is the paper's best for CIFAR-10 at moderate batch sizes (appendix B.9, table B.2).
    temperature: float = param(0.5, gt=0, tunable=True, help="NT-Xent temperature tau")
    proj_hidden_dim: int = param(512, ge=1, help="hidden width of g(.)")
    proj_dim: int = param(128, ge=1, tunable=True, help="output width of g(.) (paper 128)")
    aug: AugmentConfig = param(default_factory=AugmentConfig)


class SimCLR(SSLMethod):
    def __init__(self, cfg: SimCLRConfig, backbone: BackboneConfig, image_size: int):
        super().__init__()
        self.temperature = cfg.temperature
        self.backbone, dim = build_backbone(backbone, image_size)
        self.projector = mlp(dim, cfg.proj_hidden_dim, cfg.proj_dim, num_layers=2)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x = torch.cat([batch["view1"], batch["view2"]])   # (2B, 3, H, W)
        z = self.projector(self.backbone(normalize(x)))   # (2B, proj_dim)
        z1, z2 = z.chunk(2)                               # (B, proj_dim) each
        loss = nt_xent(z1, z2, self.temperature)
        with torch.no_grad():
            pos_sim = F.cosine_similarity(z1, z2).mean()
        return loss, {"pos_sim": pos_sim}

    def log_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = min(16, batch["view1"].shape[0])
        return {"views/view1": batch["view1"][:n], "views/view2": batch["view2"][:n]}


def views(cfg: SimCLRConfig, image_size: int) -> TwoViews:
    return TwoViews(cfg.aug, image_size)


register("simclr", config=SimCLRConfig, model=SimCLR, views=views,
         paper="Chen, Kornblith, Norouzi, Hinton 2020, arXiv:2002.05709",
         tiny={"method": {"proj_hidden_dim": 16, "proj_dim": 8},
               "backbone": {"name": "resnet_small", "width": 4}, "image_size": 16})
