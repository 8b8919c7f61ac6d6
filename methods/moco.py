"""MoCo v1 and v2 — momentum contrast with a queue of negatives.

v1: He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual Representation
Learning", CVPR 2020, arXiv:1911.05722. A query encoder f_q, a momentum key encoder f_k
(theta_k <- m theta_k + (1 - m) theta_q), a FIFO queue of K keys of earlier batches as negatives,
InfoNCE with temperature T, a linear output layer.
v2: Chen, Fan, Girshick, He, "Improved Baselines with Momentum Contrastive Learning", 2020,
arXiv:2003.04297: v1 plus a 2-layer MLP head, Gaussian blur in the augmentation, T = 0.2 and a
cosine learning-rate schedule (the training loop's schedule).

Multi-worker: the keys of every worker are enqueued (gathered), so all workers hold the same
queue. BatchNorm uses the paper's shuffling BN (section 3.3) for the key encoder: the global key
batch is permuted across workers before encoding and restored after, so a query and its positive
key never share batch statistics. Shuffling BN rather than SyncBN because it is the paper's
method and it runs with the collectives of methods/distributed.py on gloo, while
torch.nn.SyncBatchNorm refuses CPU tensors (torch 2.14). With one worker it is a no-op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.backbones import BackboneConfig, build_backbone, normalize
from methods.base import SSLMethod
from methods.config import param
from methods.distributed import all_gather_no_grad, broadcast_, rank, world_size
from methods.heads import mlp
from methods.losses import info_nce
from methods.momentum import KeyQueue, ema_update_, momentum_copy
from methods.registry import register
from methods.views import AugmentConfig, TwoViews


@dataclass
class MoCoV1Config:
    # He et al. 2019, section 4.1 and appendix A.1: K = 65536, m = 0.999, T = 0.07, 128-d keys.
    queue_size: int = param(65536, ge=1, tunable=True, help="K, keys in the queue (dictionary)")
    momentum: float = param(0.999, ge=0, le=1, tunable=True, help="m of the key encoder")
    temperature: float = param(0.07, gt=0, tunable=True, help="InfoNCE temperature T")
    proj_dim: int = param(128, ge=1, help="key/query width")
    mlp_head: bool = param(False, help="v2's 2-layer MLP head instead of v1's linear layer")
    proj_hidden_dim: int = param(2048, ge=1, help="hidden width of the MLP head")
    shuffle_bn: bool = param(True, help="shuffling BN for the key encoder across workers")
    # v1's augmentation: crop scale (0.2, 1), grayscale 0.2, jitter 0.4 always (here the hue
    # is 0.1, the SimCLR-family strength s = 0.5), flip.
    aug: AugmentConfig = param(default_factory=lambda: AugmentConfig(
        crop_scale=(0.2, 1.0), jitter_strength=0.5, jitter_p=1.0, gray_p=0.2))


@dataclass
class MoCoV2Config(MoCoV1Config):
    # Chen et al. 2020 (v2), section 3: T = 0.2, MLP head (2048 hidden), blur p = 0.5.
    temperature: float = param(0.2, gt=0, tunable=True, help="InfoNCE temperature T")
    mlp_head: bool = param(True, help="v2's 2-layer MLP head instead of v1's linear layer")
    aug: AugmentConfig = param(default_factory=lambda: AugmentConfig(
        crop_scale=(0.2, 1.0), jitter_strength=0.5, jitter_p=0.8, gray_p=0.2, blur_p=0.5))


@torch.no_grad()
def shuffled_bn_forward(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """encoder(x) with the global batch shuffled across workers (MoCo's shuffling BN).

    x: (B, ...) this worker's inputs. Worker r encodes rows order[rB:(r+1)B] of the gathered batch,
    where `order` is rank 0's random permutation; the encoded rows are gathered and put back in
    the original order, so row i of the result is the encoding of x[i]. (B, C) out.
    """
    if world_size() == 1:
        return encoder(x)
    batch, r = x.shape[0], rank()
    x_all = all_gather_no_grad(x)  # (W * B, ...)
    order = broadcast_(torch.randperm(x_all.shape[0], device=x.device))  # (W * B,)
    encoded = all_gather_no_grad(encoder(x_all[order[r * batch:(r + 1) * batch]]))  # (W * B, C)
    restored = encoded[torch.argsort(order)]  # row j: encoding of global example j
    return restored[r * batch:(r + 1) * batch]  # (B, C)


class MoCo(SSLMethod):
    """f_q = head(backbone), f_k its momentum copy, and the queue of keys."""

    def __init__(self, cfg: MoCoV1Config, backbone: BackboneConfig, image_size: int):
        super().__init__()
        self.temperature, self.momentum = cfg.temperature, cfg.momentum
        self.shuffle_bn = cfg.shuffle_bn
        self.backbone, dim = build_backbone(backbone, image_size)
        self.head = mlp(dim, cfg.proj_hidden_dim, cfg.proj_dim,
                        num_layers=2 if cfg.mlp_head else 1, batch_norm=False)
        self.backbone_k = momentum_copy(self.backbone)
        self.head_k = momentum_copy(self.head)
        self.queue = KeyQueue(cfg.queue_size, cfg.proj_dim)

    def _encode_keys(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_k(self.backbone_k(x))  # (B, C)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        q = self.head(self.backbone(normalize(batch["view1"])))  # (B, C)
        with torch.no_grad():
            x_k = normalize(batch["view2"])
            k = (shuffled_bn_forward(self._encode_keys, x_k) if self.shuffle_bn
                 else self._encode_keys(x_k))  # (B, C)
            k = F.normalize(k, dim=1)
        loss = info_nce(q, k, self.queue.keys.clone(), self.temperature)
        self.pending["keys"] = k  # enqueued by on_step, once the step is taken
        with torch.no_grad():
            pos_sim = F.cosine_similarity(q, k).mean()
        return loss, {"pos_sim": pos_sim}

    def on_step(self, step: int, total_steps: int) -> None:
        ema_update_(self.backbone_k, self.backbone, self.momentum)
        ema_update_(self.head_k, self.head, self.momentum)
        keys = self.pending.pop("keys", None)
        if keys is not None:
            self.queue.enqueue(all_gather_no_grad(keys))  # (W * B, C): every worker's keys

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone_k, self.backbone), (self.head_k, self.head)]

    def step_buffers(self) -> list[str]:
        return ["queue.keys", "queue.ptr"]

    def log_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = min(16, batch["view1"].shape[0])
        return {"views/query": batch["view1"][:n], "views/key": batch["view2"][:n]}


def views(cfg: MoCoV1Config, image_size: int) -> TwoViews:
    return TwoViews(cfg.aug, image_size)


TINY_BACKBONE = {"name": "resnet_small", "width": 4}
register("moco_v1", config=MoCoV1Config, model=MoCo, views=views,
         paper="He, Fan, Wu, Xie, Girshick 2019, arXiv:1911.05722",
         tiny={"method": {"queue_size": 16, "proj_dim": 8}, "backbone": TINY_BACKBONE,
               "image_size": 16})
register("moco_v2", config=MoCoV2Config, model=MoCo, views=views,
         paper="Chen, Fan, Girshick, He 2020, arXiv:2003.04297",
         tiny={"method": {"queue_size": 16, "proj_hidden_dim": 16, "proj_dim": 8},
               "backbone": TINY_BACKBONE, "image_size": 16})
