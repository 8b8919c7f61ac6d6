"""`linear`: a linear classifier on frozen, standardised features (the linear-probe protocol).

The learning rate and weight decay are chosen from a small grid by stratified k-fold
cross-validation on the training features — never on the test split — then the classifier is
retrained on all training features with that pair and scored once on test (Kolesnikov, Zhai, Beyer
2019, arXiv:1901.09005). Ties in mean validation accuracy go to the lower validation loss.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.stages.config import LinearConfig
from pipelines.stages.arrays import num_classes
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


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """`folds` disjoint validation index sets that together hold every index once; each class is
    dealt round-robin across them (carrying on where the previous class stopped), reproducibly."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(folds)]
    dealt = 0
    for c in np.unique(labels):
        for i in rng.permutation(np.flatnonzero(labels == c)):
            parts[dealt % folds].append(int(i))
            dealt += 1
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def validation_splits(labels: np.ndarray, cfg: LinearConfig,
                      seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit indices, validation indices) pairs: k folds, or the one holdout when folds is 1."""
    if cfg.folds == 1:
        return [stratified_holdout(labels, cfg.val_fraction, seed)]
    everything = np.arange(len(labels))
    return [(np.setdiff1d(everything, val), val)
            for val in stratified_folds(labels, cfg.folds, seed) if len(val)]


def fit_linear(x: np.ndarray, y: np.ndarray, num_classes: int, lr: float, weight_decay: float,
               cfg: LinearConfig, seed: int) -> nn.Module:
    """Standardise with the training statistics, then fit a linear layer with AdamW + cosine."""
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
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


def _val_scores(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on a validation split."""
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        loss = F.cross_entropy(logits, torch.from_numpy(y))
    return float((logits.argmax(1).numpy() == y).mean()), float(loss)


def linear_probe(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                 cfg: LinearConfig, seed: int = 0) -> tuple[dict, nn.Module]:
    (xtr, ytr), (xte, yte) = train, test
    classes = num_classes(ytr, yte)
    splits = validation_splits(ytr, cfg, seed)
    grid = [(lr, wd) for lr in cfg.lrs for wd in cfg.weight_decays]
    scores = {}  # (lr, wd) -> (mean validation accuracy, mean validation loss)
    for lr, wd in grid:
        per_split = [_val_scores(fit_linear(xtr[fit], ytr[fit], classes, lr, wd, cfg, seed),
                                 xtr[val], ytr[val]) for fit, val in splits]
        scores[lr, wd] = tuple(float(np.mean(v)) for v in zip(*per_split))
    best = max(grid, key=lambda p: (scores[p][0], -scores[p][1]))
    model = fit_linear(xtr, ytr, classes, *best, cfg, seed)
    return {"top1": accuracy(model, xte, yte), "val_top1": scores[best][0],
            "val_loss": scores[best][1], "best_lr": best[0], "best_weight_decay": best[1],
            "folds": len(splits)}, model


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
