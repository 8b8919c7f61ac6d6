"""`finetune`: the whole pretrained encoder plus a new linear head, trained on the labeled split.

The fine-tuning protocol of SimCLR (Chen, Kornblith, Norouzi, Hinton, 2020, arXiv:2002.05709,
appendix B.5) at CPU size: AdamW, a small lr for the encoder and a larger one for the head, cosine
decay, a few epochs (`eval.finetune`). Scored once on the test split.

The encoder as a trainable function of images is the method's `features` hook, whose no-grad
form is `embed`, so fine-tuning sees exactly the input path the frozen stages see (lightness only
for colorization, patches for CPC, the teacher for DINO).
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.augment import from_hwc
from pipelines.checkpoint import load_model
from pipelines.stages.arrays import num_classes
from pipelines.stages.config import FinetuneConfig
from pipelines.stages.registry import StageContext, register_stage


def _optimizer(model: nn.Module, head: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([{"params": list(model.parameters()), "lr": cfg.lr},
                              {"params": head.parameters(), "lr": cfg.head_lr}],
                             weight_decay=cfg.weight_decay)


def _new_head(model: nn.Module, features: Callable, sample: torch.Tensor, num_classes: int,
              seed: int) -> nn.Linear:
    """A seeded linear head on the encoder's output, after checking gradients reach the encoder."""
    model.requires_grad_(True).eval()
    out = features(sample)  # (n, D)
    if not out.requires_grad:
        raise TypeError(f"{type(model).__name__}.features gives no gradient; it must be the "
                        f"differentiable form of embed for the method to be fine-tuned")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(out.shape[1], num_classes)


def finetune(model: nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int,
             cfg: FinetuneConfig, seed: int) -> tuple[nn.Module, list[float]]:
    """Train `model`'s encoder and a new head on images (N, S, S, 3) uint8; return (head, losses).

    Runs max(epochs, enough epochs for `min_steps`) passes; `model` is changed in place.
    """
    g = torch.Generator().manual_seed(seed)
    features = model.features
    x, y = from_hwc(images), torch.from_numpy(labels)
    head = _new_head(model, features, x[:2], num_classes, seed)
    model.train()
    batch = min(cfg.batch_size, len(x))
    per_epoch = max(1, len(x) // batch)
    epochs = max(cfg.epochs, -(-cfg.min_steps // per_epoch))
    opt = _optimizer(model, head, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * per_epoch)
    losses = []
    for _ in range(epochs):
        order, total = torch.randperm(len(x), generator=g), 0.0
        for i in range(per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(head(features(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        losses.append(total / per_epoch)
    model.eval()
    return head.eval(), losses


@torch.no_grad()
def accuracy(model: nn.Module, head: nn.Module, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 256) -> float:
    features = model.features
    x = from_hwc(images)
    preds = [head(features(x[i:i + batch_size])).argmax(1) for i in range(0, len(x), batch_size)]
    return float((torch.cat(preds).numpy() == labels).mean())


def finetune_and_score(checkpoint: str, train: tuple[np.ndarray, np.ndarray],
                       test: tuple[np.ndarray, np.ndarray], cfg: FinetuneConfig,
                       seed: int) -> tuple[dict, nn.Module, nn.Module]:
    """Fine-tune a fresh copy of the checkpoint's model; ({"top1", "final_loss"}, model, head)."""
    (xtr, ytr), (xte, yte) = train, test
    classes = num_classes(ytr, yte)
    model, _ = load_model(checkpoint)
    head, losses = finetune(model, xtr, ytr, classes, cfg, seed)
    return {"top1": accuracy(model, head, xte, yte), "final_loss": losses[-1]}, model, head


@register_stage("finetune", config=("finetune",))
def run(ctx: StageContext) -> dict:
    xtr, ytr, _ = ctx.images("train")
    xte, yte, _ = ctx.images("test")
    metrics, model, head = finetune_and_score(ctx.checkpoint, (xtr, ytr), (xte, yte),
                                              ctx.cfg.finetune, ctx.seed)
    torch.save({"model": model.state_dict(), "head": head.state_dict()},
               os.path.join(ctx.stage_dir("finetune"), "finetuned.pt"))
    return metrics
