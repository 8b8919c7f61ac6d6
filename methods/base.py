"""Defaults of the method contract (see ../shared/ARCHITECTURE.md, "The method contract").

A method is a plain `nn.Module` with:
  forward(batch: dict[str, Tensor]) -> (loss, metrics)   # metrics: dict[str, float | Tensor]
  on_step(step, total_steps)                             # after the optimiser step
  embed(images uint8 (B, 3, H, W)) -> (B, D)             # frozen features for evaluation
and optionally
  log_images(batch) -> dict[str, Tensor (N, 3, H, W) in [0, 1]]   # TensorBoard pictures
  pretext_metrics(batch) -> dict[str, float]             # its own task on held-out views
All state lives in parameters and buffers, so `state_dict()` is the checkpoint.
"""
from __future__ import annotations

import torch
from torch import nn

from methods.backbones import normalize


class SSLMethod(nn.Module):
    """Holds `self.backbone`; subclasses add heads and the loss."""

    backbone: nn.Module

    def on_step(self, step: int, total_steps: int) -> None:
        """Per-step updates after the optimiser step; nothing by default."""

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(normalize(images))  # (B, D)

    def log_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}
