"""`lowshot`: the linear probe and fine-tuning with 1% and 10% of the training labels.

The semi-supervised protocol of SimCLR (Chen, Kornblith, Norouzi, Hinton, 2020, arXiv:2002.05709,
section 6) and SimCLRv2 (arXiv:2006.10029): a class-balanced, seeded subset of the labeled training
split, the same subset for every method, and the full test split. With a handful of labels there
is no validation split to tune on, so the linear probe uses a fixed lr (`eval.lowshot.linear_lr`).
"""
from __future__ import annotations

import json
import os

import numpy as np

from pipelines.stages.finetune import finetune_and_score
from pipelines.stages.linear import accuracy, fit_linear
from pipelines.stages.arrays import num_classes
from pipelines.stages.registry import StageContext, register_stage


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of round(fraction * n_c) (at least 1) examples of each class c, seeded."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = min(len(idx), max(1, int(round(fraction * len(idx)))))
        chosen.append(rng.permutation(idx)[:n])
    return np.sort(np.concatenate(chosen))


def tag(fraction: float) -> str:
    """0.01 -> "1pct", 0.1 -> "10pct", 0.005 -> "0.5pct"."""
    return f"{fraction * 100:g}pct"


def _linear(ctx: StageContext, subset: np.ndarray) -> float:
    features = ctx.output("embed")
    (xtr, ytr), (xte, yte) = features["train"], features["test"]
    classes = num_classes(ytr, yte)
    probe = fit_linear(xtr[subset], ytr[subset], classes, ctx.cfg.lowshot.linear_lr,
                       ctx.cfg.lowshot.linear_weight_decay, ctx.cfg.linear, ctx.seed)
    return accuracy(probe, xte, yte)


def _finetune(ctx: StageContext, subset: np.ndarray) -> float:
    xtr, ytr, _ = ctx.images("train")
    xte, yte, _ = ctx.images("test")
    metrics, _, _ = finetune_and_score(ctx.checkpoint, (xtr[subset], ytr[subset]), (xte, yte),
                                       ctx.cfg.finetune, ctx.seed)
    return metrics["top1"]


@register_stage("lowshot", requires=("embed",), config=("lowshot", "linear", "finetune"))
def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg.lowshot
    _, labels, keys = ctx.images("train")
    metrics, subsets = {}, {}
    for fraction in cfg.fractions:
        subset = stratified_subset(labels, fraction, ctx.seed)
        subsets[tag(fraction)] = keys[subset].tolist()
        metrics[f"n_{tag(fraction)}"] = len(subset)
        for protocol in cfg.protocols:
            score = _linear(ctx, subset) if protocol == "linear" else _finetune(ctx, subset)
            metrics[f"{protocol}_{tag(fraction)}"] = score
    with open(os.path.join(ctx.stage_dir("lowshot"), "subsets.json"), "w") as f:
        json.dump(subsets, f, indent=1)
    return metrics
