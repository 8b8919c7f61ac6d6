"""Projection and prediction heads shared by the contrastive and self-distillation methods."""
from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
        batch_norm: bool = True, last_batch_norm: bool = False,
        last_bias: bool | None = None) -> nn.Sequential:
    """Linear(-BN)-ReLU x (num_layers - 1), then Linear (optionally BN without affine).

    num_layers=2 with batch_norm is SimCLR's g(.) (Chen et al., 2020, arXiv:2002.05709); MoCo v3
    uses 3 layers with a last BN (Chen, Xie, He, 2021, arXiv:2104.02057), and no bias in any of
    its layers, its predictor's last included (`last_bias=False`; default: a bias unless a BN
    follows).
    """
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(d, hidden_dim, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        d = hidden_dim
    layers.append(nn.Linear(d, out_dim, bias=(not last_batch_norm) if last_bias is None
                            else last_bias))
    if last_batch_norm:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)
