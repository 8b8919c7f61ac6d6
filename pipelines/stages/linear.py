"""`linear`: a linear classifier on frozen, standardised features (the linear-probe protocol).

The learning rate is chosen from a small grid on a stratified validation split carved from the
training features — never on the test split — then the classifier is retrained on all training
features with that rate and scored once on test (Kolesnikov, Zhai, Beyer 2019, arXiv:1901.09005).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.stages.config import LinearConfig
from pipelines.stages.registry import StageContext, register_stage

PROBE = "probe.pt"


def stratified_holdout(labels: np.ndarray, fraction: float,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), stratified by label and reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = int(round(len(idx) * fraction)) if len(idx) > 1 else 0
        val.extend(rng.permutation(idx)[:n].tolist())
    val = np.sort(np.array(val, dtype=np.int64))
    return np.setdiff1d(np.arange(len(labels)), val), val


def fit_linear(x: np.ndarray, y: np.ndarray, num_classes: int, lr: float, cfg: LinearConfig,
               seed: int) -> nn.Module:
    """Standardise with the training statistics, then fit a linear layer with AdamW + cosine."""
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, -(-len(x) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    xs = (xt - mean) / std  # (N, D)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = F.cross_entropy(head(xs[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return nn.Sequential(_Standardize(mean, std), head).eval()


class _Standardize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def linear_probe(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                 cfg: LinearConfig, seed: int = 0) -> tuple[dict, nn.Module]:
    (xtr, ytr), (xte, yte) = train, test
    num_classes = int(max(ytr.max(), yte.max())) + 1
    fit_idx, val_idx = stratified_holdout(ytr, cfg.val_fraction, seed)
    val_scores = {lr: accuracy(fit_linear(xtr[fit_idx], ytr[fit_idx], num_classes, lr, cfg, seed),
                               xtr[val_idx], ytr[val_idx]) for lr in cfg.lrs}
    best_lr = max(cfg.lrs, key=lambda lr: (val_scores[lr], -cfg.lrs.index(lr)))
    model = fit_linear(xtr, ytr, num_classes, best_lr, cfg, seed)
    return {"top1": accuracy(model, xte, yte), "val_top1": val_scores[best_lr],
            "best_lr": best_lr}, model


def probe_from_state(state: dict) -> nn.Module:
    """The standardise-then-linear probe rebuilt from its saved state_dict."""
    num_classes, dim = state["1.weight"].shape
    model = nn.Sequential(_Standardize(torch.zeros(dim), torch.ones(dim)),
                          nn.Linear(dim, num_classes))
    model.load_state_dict(state)
    return model.eval()


def load(ctx: StageContext) -> nn.Module:
    return probe_from_state(torch.load(os.path.join(ctx.stage_dir("linear"), PROBE),
                                       weights_only=True))


@register_stage("linear", requires=("embed",), config=("linear",), load=load)
def run(ctx: StageContext) -> dict:
    features = ctx.output("embed")
    metrics, model = linear_probe(features["train"], features["test"], ctx.cfg.linear, ctx.seed)
    torch.save(model.state_dict(), os.path.join(ctx.stage_dir("linear"), PROBE))
    ctx.outputs["linear"] = model
    return metrics
