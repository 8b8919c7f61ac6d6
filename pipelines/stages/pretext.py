"""`pretext`: the method's own pretext task, measured on the held-out split.

Rotation accuracy for RotNet (Gidaris et al., 2018, arXiv:1803.07728), position accuracy for
context prediction (Doersch et al., 2015, arXiv:1505.05192), permutation accuracy for jigsaw
puzzles (Noroozi & Favaro, 2016, arXiv:1603.09246), reconstruction error for context encoders
(Pathak et al., 2016, arXiv:1604.07379) and colour error for colorization and split-brain
autoencoders (Zhang et al., 2016/2017, arXiv:1603.08511, arXiv:1611.09842): whatever the method's
`pretext_metrics(batch)` reports. The method's own views are drawn on the probe_test images, in
key order, from one seeded generator, so a checkpoint always gets the same number; per-batch
metrics are averaged weighted by batch size. Methods without a pretext task (SimCLR ...) report
only a note.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

import methods
from methods.augment import from_hwc
from methods.config import build
from pipelines.checkpoint import load_model
from pipelines.stages.registry import StageContext, register_stage


@torch.no_grad()
def pretext_scores(model: nn.Module, views: Callable, images: Iterable[np.ndarray],
                   seed: int) -> tuple[dict[str, float], int]:
    """(batch-size-weighted mean of `model.pretext_metrics` over uint8 (n, S, S, 3) batches,
    images seen); every batch's views come from one generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    count = 0
    for batch in images:
        for key, value in model.pretext_metrics(views(from_hwc(batch), generator)).items():
            sums[key] = sums.get(key, 0.0) + float(value) * len(batch)
        count += len(batch)
    return {key: value / max(count, 1) for key, value in sums.items()}, count


def batches(images: np.ndarray, batch_size: int) -> Iterable[np.ndarray]:
    return (images[i:i + batch_size] for i in range(0, len(images), batch_size))


def method_views(meta: dict) -> Callable:
    """The views of the method a checkpoint holds, built from its stored config."""
    config = dict(meta["method"])
    spec = methods.get(config.pop("name"))
    return spec.views(build(spec.config, config, "method"), meta["image_size"])


def _batch_size(ctx: StageContext) -> dict:
    return {"batch_size": ctx.cfg.batch_size}  # the batches decide which views are drawn


@register_stage("pretext", needs_labels=False, extra=_batch_size)
def run(ctx: StageContext) -> dict:
    model, meta = load_model(ctx.checkpoint)
    name = meta["method"]["name"]
    if not model.has_pretext_task():
        return {"note": f"{name} has no pretext task to measure"}
    if ctx.splits.probe_test is None:
        return {"note": "no held-out split (give data.eval_source) to measure the pretext task on"}
    images = ctx.images("test")[0]  # (N, S, S, 3) uint8, sorted by key
    metrics, count = pretext_scores(model, method_views(meta), batches(images, ctx.cfg.batch_size),
                                    ctx.seed)
    return {**metrics, "n_images": count}
