"""`robustness`: the linear probe's accuracy on corrupted test images, and its relative drop.

The corruptions (pipelines/stages/corruptions.py) follow Hendrycks & Dietterich, 2019,
arXiv:1903.12261. Corrupted copies of the test split are made in parallel Ray Data tasks and go
through the same frozen-encoder actor pool as `embed`; the probe is the `linear` stage's (trained
on clean features), so the drop measures the representation, not a probe fitted to the noise.
drop = (clean top-1 - corrupted top-1) / clean top-1, averaged over severities per corruption.
"""
from __future__ import annotations

import json
import os
import zlib

import numpy as np

from pipelines.stages.corruptions import corrupt
from pipelines.stages.embed import embed_dataset
from pipelines.stages.linear import accuracy
from pipelines.stages.registry import StageContext, register_stage


def corrupted_views(batch: dict, corruptions: list[str], severities: list[int], seed: int) -> dict:
    """Ray Data UDF: every row once per (corruption, severity), keyed "<name>/<severity>/<key>"."""
    images, labels, keys = np.asarray(batch["image"]), np.asarray(batch["label"]), batch["key"]
    seeds = np.array([zlib.crc32(f"{seed}/{k}".encode()) for k in keys], dtype=np.int64)
    out_images, out_labels, out_keys = [], [], []
    for name in corruptions:
        for s in severities:
            out_images.append(corrupt(images, name, s, seeds + s))
            out_labels.append(labels)
            out_keys.extend(f"{name}/{s}/{k}" for k in keys)
    return {"image": np.concatenate(out_images), "label": np.concatenate(out_labels),
            "key": np.array(out_keys)}


def robustness_metrics(curves: dict[str, list[float]], severities: list[int]) -> dict:
    """Flat metrics from curves {corruption: [clean, top1 at each severity]}."""
    clean = next(iter(curves.values()))[0]
    metrics = {"clean_top1": clean}
    drops, corrupted = [], []
    for name, accs in curves.items():
        for s, acc in zip(severities, accs[1:]):
            metrics[f"{name}_s{s}"] = acc
            corrupted.append(acc)
        metrics[f"{name}_drop"] = float(np.mean([(clean - a) / max(clean, 1e-12) for a in accs[1:]]))
        drops.append(metrics[f"{name}_drop"])
    metrics.update(corrupt_top1=float(np.mean(corrupted)), mean_drop=float(np.mean(drops)))
    return metrics


@register_stage("robustness", requires=("embed", "linear"), config=("robustness",))
def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg.robustness
    probe = ctx.output("linear")
    clean_x, clean_y = ctx.output("embed")["test"]
    ds = ctx.splits.probe_test.map_batches(
        corrupted_views, fn_kwargs={"corruptions": cfg.corruptions, "severities": cfg.severities,
                                    "seed": ctx.seed}, batch_size=64)
    x, y, keys = embed_dataset(ds, ctx.checkpoint, ctx.cfg.batch_size)
    clean = accuracy(probe, clean_x, clean_y)
    keys, curves = keys.astype(str), {}
    for name in cfg.corruptions:
        accs = []
        for s in cfg.severities:
            m = np.char.startswith(keys, f"{name}/{s}/")
            accs.append(accuracy(probe, x[m], y[m]))
        curves[name] = [clean] + accs
    with open(os.path.join(ctx.stage_dir("robustness"), "curves.json"), "w") as f:
        json.dump({"severities": [0] + list(cfg.severities), "top1": curves}, f, indent=2)
    return robustness_metrics(curves, cfg.severities)
