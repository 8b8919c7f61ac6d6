"""The per-step pieces of the momentum-encoder methods: EMA update, schedules, key queue.

The momentum (EMA) encoder is MoCo's (He et al., 2019, arXiv:1911.05722, eq. 2): theta_k <-
m theta_k + (1 - m) theta_q after every optimiser step. The cosine schedule raising m to 1 is
BYOL's (Grill et al., 2020, arXiv:2006.07733), used by MoCo v3 (Chen, Xie, He, 2021,
arXiv:2104.02057) and DINO (Caron et al., 2021, arXiv:2104.14294), which also warms its teacher
temperature up linearly. The FIFO queue of keys is MoCo's dictionary. Schedules are pure functions
of the step, so a resumed run continues them exactly.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_copy(online: nn.Module) -> nn.Module:
    """A frozen copy of `online` (requires_grad=False everywhere): the momentum encoder's start."""
    target = copy.deepcopy(online)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """theta_target <- m * theta_target + (1 - m) * theta_online, parameter by parameter.

    Buffers (BatchNorm running statistics) are not averaged: each encoder keeps its own, as in
    MoCo's and DINO's reference code.
    """
    targets, onlines = list(target.parameters()), list(online.parameters())
    if len(targets) != len(onlines):
        raise ValueError(f"EMA needs matching modules, got {len(targets)} and {len(onlines)} "
                         f"parameters")
    for t, o in zip(targets, onlines):
        t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's schedule: m = 1 - (1 - base) * (cos(pi * step / total) + 1) / 2, from base to 1."""
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def warmup_value(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear from `start` at step 0 to `end` at `warmup_steps`, then constant (DINO's teacher
    temperature)."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


class KeyQueue(nn.Module):
    """MoCo's dictionary: a FIFO of K keys (K, D) and the write pointer, both buffers, so a
    checkpoint holds them. Initialised with random unit vectors, as the reference code."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", nn.functional.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys (N, D) at the pointer, wrapping around; the oldest keys are overwritten.

        N need not divide K. The result is that of writing the keys one at a time, so when N > K
        only the newest K survive, at the slots they would have reached.
        """
        size, count = self.keys.shape[0], keys.shape[0]
        kept = keys.detach()[-size:]  # (min(N, K), D)
        first = self.ptr + (count - kept.shape[0])  # slot of the first kept key
        slots = (first + torch.arange(kept.shape[0], device=self.ptr.device)) % size
        self.keys[slots] = kept.to(self.keys.dtype)
        self.ptr.copy_((self.ptr + count) % size)
