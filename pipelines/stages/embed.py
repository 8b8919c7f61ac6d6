"""`embed`: frozen features of the labeled splits, computed once for every later stage.

A Ray Data actor pool holds the encoder (loaded once per actor, not per batch) and maps the
decoded images to features; the features are stored as Parquet under stages/embed/.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import ray
import torch
from ray.data import ActorPoolStrategy

from pipelines.checkpoint import load_model
from pipelines.stages.registry import StageContext, register_stage


class Embedder:
    """Ray Data actor: {"image" (n, S, S, 3), "label", "key"} -> {"feature" (n, D), "label", "key"}."""

    def __init__(self, checkpoint: str, use_gpu: bool = False):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model, _ = load_model(checkpoint, map_location=self.device)

    def __call__(self, batch: dict) -> dict:
        images = torch.from_numpy(np.ascontiguousarray(batch["image"]))  # (n, S, S, 3)
        images = images.permute(0, 3, 1, 2).to(self.device)
        with torch.no_grad():
            features = self.model.embed(images).float().cpu().numpy()  # (n, D)
        return {"feature": features, "label": batch["label"], "key": batch["key"]}


def embed_dataset(ds: ray.data.Dataset, checkpoint: str, batch_size: int,
                  use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels (N,), keys (N,)) sorted by key, so runs are comparable."""
    out = ds.map_batches(Embedder, fn_constructor_kwargs={"checkpoint": checkpoint,
                                                          "use_gpu": use_gpu},
                         batch_size=batch_size, compute=ActorPoolStrategy(size=1),
                         num_gpus=1 if use_gpu else 0, max_restarts=0).to_pandas()
    out = out.sort_values("key", kind="stable")
    features = np.stack(out["feature"].to_numpy()).astype(np.float32)
    return features, out["label"].to_numpy().astype(np.int64), out["key"].to_numpy()


def _save(path: str, features: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> None:
    pd.DataFrame({"key": keys, "label": labels, "feature": list(features)}).to_parquet(path)


@register_stage("embed")
def run(ctx: StageContext) -> dict:
    out, metrics = {}, {}
    for split in ("train", "test"):
        ds = getattr(ctx.splits, f"probe_{split}")
        features, labels, keys = embed_dataset(ds, ctx.checkpoint, ctx.cfg.batch_size)
        _save(os.path.join(ctx.stage_dir("embed"), f"{split}.parquet"), features, labels, keys)
        out[split] = (features, labels)
        metrics[f"n_{split}"] = len(labels)
    metrics["dim"] = int(out["train"][0].shape[1])
    ctx.outputs["embed"] = out
    return metrics
