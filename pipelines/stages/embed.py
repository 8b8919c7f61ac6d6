"""`embed`: frozen features of the labeled splits, computed once for every later stage.

A Ray Data actor pool holds the encoder (loaded once per actor, not per batch) and maps the
decoded images to features; the features are stored as Parquet under stages/embed/.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import ray
import torch
from ray.data import ActorPoolStrategy

from methods.augment import from_hwc
from pipelines.checkpoint import load_model
from pipelines.stages.registry import StageContext, register_stage


class Embedder:
    """Ray Data actor: {"image" (n, S, S, 3), ...} -> {"feature" (n, D), ...}; other columns pass."""

    def __init__(self, checkpoint: str, use_gpu: bool = False):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model, _ = load_model(checkpoint, map_location=self.device)

    def __call__(self, batch: dict) -> dict:
        images = from_hwc(batch["image"]).to(self.device)  # (n, 3, S, S)
        with torch.no_grad():
            features = self.model.embed(images).float().cpu().numpy()  # (n, D)
        return {"feature": features, **{k: v for k, v in batch.items() if k != "image"}}


def embed_frame(ds: ray.data.Dataset, checkpoint: str, batch_size: int,
                use_gpu: bool = False) -> tuple[np.ndarray, pd.DataFrame]:
    """(features (N, D) float32, the other columns) sorted by key, so runs are comparable."""
    with warnings.catch_warnings():
        # Ray 2.60 deprecates `ray_remote_args` but names no parameter for max_restarts. Without
        # it a broken actor restarts forever and Ray logs ray-project/ray#53727 on every start.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        out = ds.map_batches(Embedder, fn_constructor_kwargs={"checkpoint": checkpoint,
                                                              "use_gpu": use_gpu},
                             batch_size=batch_size, compute=ActorPoolStrategy(size=1),
                             num_gpus=1 if use_gpu else 0, max_restarts=0).to_pandas()
    out = out.sort_values("key", kind="stable").reset_index(drop=True)
    return np.stack(out.pop("feature").to_numpy()).astype(np.float32), out


def embed_dataset(ds: ray.data.Dataset, checkpoint: str, batch_size: int,
                  use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels (N,), keys (N,)) sorted by key."""
    features, out = embed_frame(ds, checkpoint, batch_size, use_gpu)
    return features, out["label"].to_numpy().astype(np.int64), out["key"].to_numpy()


def _tag(batch: dict, split: str) -> dict:
    return {**batch, "split": np.full(len(batch["key"]), split)}


def _save(path: str, features: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> None:
    pd.DataFrame({"key": keys, "label": labels, "feature": list(features)}).to_parquet(path)


def load(ctx: StageContext) -> dict:
    """{"train": (features, labels), "test": ...} from the stored Parquet files."""
    out = {}
    for split in ("train", "test"):
        df = pd.read_parquet(os.path.join(ctx.stage_dir("embed"), f"{split}.parquet"))
        out[split] = (np.stack(df["feature"].to_numpy()).astype(np.float32),
                      df["label"].to_numpy().astype(np.int64))
    return out


@register_stage("embed", load=load)
def run(ctx: StageContext) -> dict:
    """Both labeled splits through one actor pool (one model load), then stored per split."""
    tagged = [getattr(ctx.splits, f"probe_{split}").map_batches(_tag, fn_kwargs={"split": split})
              for split in ("train", "test")]
    features, frame = embed_frame(tagged[0].union(tagged[1]), ctx.checkpoint, ctx.cfg.batch_size)
    out, metrics = {}, {}
    for split in ("train", "test"):
        m = (frame["split"] == split).to_numpy()
        labels, keys = frame["label"].to_numpy()[m].astype(np.int64), frame["key"].to_numpy()[m]
        _save(os.path.join(ctx.stage_dir("embed"), f"{split}.parquet"), features[m], labels, keys)
        out[split] = (features[m], labels)
        metrics[f"n_{split}"] = int(m.sum())
    metrics["dim"] = int(features.shape[1])
    ctx.outputs["embed"] = out
    return metrics
