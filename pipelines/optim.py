"""Optimisers and the learning-rate schedule used by every method.

LARS — You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks", 2017,
arXiv:1708.03888; as in SimCLR and MoCo v3, biases and normalisation parameters are excluded from
the trust-ratio adaptation and from weight decay. The schedule is linear warm-up then cosine decay
(SimCLR, Goyal et al. 2017), a pure function of the step so resuming needs only the step.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from methods.base import unwrap


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-layer step is scaled by eta * ||w|| / ||g + wd * w||."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["lars"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.norm(p), torch.linalg.norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                    g = g.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights get weight decay (and LARS adaptation); biases and norm parameters (ndim <= 1)
    don't. Each group also carries the method's learning-rate multiplier (`lr_scales`) as
    "lr_scale", which `set_lr` applies."""
    method = unwrap(model)
    scales = method.lr_scales() if hasattr(method, "lr_scales") else {}
    groups: dict[tuple[bool, float], list] = {}
    for name, p in method.named_parameters():
        if p.requires_grad:
            scale = next((s for prefix, s in scales.items() if name.startswith(prefix)), 1.0)
            groups.setdefault((p.ndim <= 1, scale), []).append(p)
    return [{"params": params, "weight_decay": 0.0 if flat else weight_decay, "lr_scale": scale,
             **({"lars": False} if flat else {})}
            for (flat, scale), params in sorted(groups.items(), key=lambda kv: kv[0])]


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                   momentum: float) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    for g in groups:
        g.pop("lars", None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise ValueError(f"train.optimizer: unknown optimizer {name!r}; choose sgd, lars or adamw")


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float,
          final_ratio: float = 0.0) -> float:
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to `final_ratio * base_lr`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return base_lr * (final_ratio + (1 - final_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
