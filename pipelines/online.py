"""Online evaluation during pretraining: kNN top-1 and a collapse measure, every E epochs.

SSL losses are not comparable across temperatures, queue sizes or masking ratios, so sweeps rank
and early-stop trials on this kNN (Wu et al., 2018, arXiv:1805.01978). The collapse measure is
SimSiam's (Chen & He, 2021, arXiv:2011.10566, section 4.1): the per-dimension standard deviation of
L2-normalised embeddings, which is about 1/sqrt(D) for spread-out features and 0 when every image
maps to the same point; `embed_std_ratio` = std * sqrt(D) is therefore ~1 healthy and ~0 collapsed.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.augment import from_hwc
from pipelines.stages.arrays import num_classes
from pipelines.stages.knn import knn_predict


@torch.no_grad()
def embed_batches(method: nn.Module, batches: Iterable[dict], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) on CPU, labels (N,)) of batches {"image": (n, S, S, 3) uint8, "label"}."""
    feats, labels = [], []
    for b in batches:
        images = from_hwc(np.asarray(b["image"])).to(device)  # (n, 3, S, S)
        feats.append(method.embed(images).float().cpu())
        labels.append(torch.as_tensor(np.asarray(b["label"])).long())
    return torch.cat(feats), torch.cat(labels)


def collapse_stats(features: torch.Tensor) -> dict:
    """Per-dimension std of L2-normalised features (mean over dimensions), and that std * sqrt(D)."""
    z = F.normalize(features.float(), dim=1)  # (N, D)
    std = float(z.std(dim=0).mean())
    return {"embed_std": std, "embed_std_ratio": std * features.shape[1] ** 0.5}


def online_eval(method: nn.Module, train_batches: Iterable[dict], test_batches: Iterable[dict],
                k: int, temperature: float, device: torch.device) -> dict:
    """kNN top-1 of the current encoder on the probe splits, and the collapse measure."""
    was_training = method.training
    method.eval()
    try:
        xtr, ytr = embed_batches(method, train_batches, device)
        xte, yte = embed_batches(method, test_batches, device)
    finally:
        method.train(was_training)
    classes = num_classes(ytr.numpy(), yte.numpy())
    pred = knn_predict(xtr, ytr, xte, k, temperature, classes)
    return {"knn_top1": float((pred == yte).float().mean()), **collapse_stats(xte)}
