"""The method contract (see ../shared/ARCHITECTURE.md, "The method contract").

A method is a plain `nn.Module` subclassing `SSLMethod`. It must define
  forward(batch: dict[str, Tensor]) -> (loss, metrics)   # metrics: dict[str, float | Tensor]
and may override the hooks below, each with a default here. Generic code (orchestrator/,
pipelines/) calls only these hooks, never a method by name:
  on_step(step, total_steps)     every state change after the optimiser step (EMA, queue, centre,
                                 schedules); `forward` changes nothing but BatchNorm statistics,
                                 and leaves what on_step needs in `self.pending`
  features(images) -> (B, D)     the representation, with gradients (fine-tuning)
  embed(images) -> (B, D)        its frozen form for evaluation (no gradients)
  pretext_metrics(batch) -> dict its own pretext task on held-out views ({} when it has none)
  momentum_pairs() -> [(target, online)]   modules on_step moves towards their online twins
  step_buffers() -> [name]       buffers on_step updates (a queue, a centre, a prior)
  collapse(metrics) -> str|None  a reason the run collapsed, read from its epoch metrics
  lr_scales() -> {prefix: scale} learning-rate multipliers of parameter groups (by name prefix)
  log_images(batch) -> dict[str, Tensor (N, 3, H, W) in [0, 1] or uint8]   TensorBoard pictures
All state lives in parameters and buffers, so `state_dict()` is the checkpoint.
"""
from __future__ import annotations

import torch
from torch import nn

from methods.backbones import normalize


class SSLMethod(nn.Module):
    """Holds `self.backbone`; subclasses add heads and the loss."""

    backbone: nn.Module

    def __init__(self):
        super().__init__()
        # What forward leaves for on_step (keys to enqueue, a batch centre): transient, never
        # part of the checkpoint, since a checkpoint is taken after on_step has used it.
        self.pending: dict[str, torch.Tensor] = {}

    def on_step(self, step: int, total_steps: int) -> None:
        """Per-step updates after the optimiser step; nothing by default."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, D), with gradients: the backbone's pooled features."""
        return self.backbone(normalize(images))

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)  # (B, D)

    def pretext_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """The method's own pretext task on a batch of its views; {} when it has none."""
        return {}

    @classmethod
    def has_pretext_task(cls) -> bool:
        return cls.pretext_metrics is not SSLMethod.pretext_metrics

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(target, online) module pairs that on_step averages (momentum encoders)."""
        return []

    def step_buffers(self) -> list[str]:
        """Names (as in `state_dict`) of the buffers on_step updates."""
        return []

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter-name prefix, e.g. {"discriminator.": 0.1};
        parameters no prefix matches train at the base rate."""
        return {}

    @staticmethod
    def collapse(metrics: dict[str, float]) -> str | None:
        """Why the run has collapsed, judged from its epoch metrics (means of `forward`'s), or
        None. Sweeps stop a trial when this says so."""
        return None

    def log_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}


def unwrap(model: nn.Module) -> nn.Module:
    """The method itself, under torch.compile's and DistributedDataParallel's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)
