"""`knn`: weighted k-nearest-neighbour classification on L2-normalised frozen features.

Wu, Xiong, Yu, Lin, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
CVPR 2018, arXiv:1805.01978: the k most cosine-similar training features vote for their label with
weight exp(similarity / T).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.stages.arrays import num_classes
from pipelines.stages.registry import StageContext, register_stage


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int,
                temperature: float, num_classes: int, chunk: int = 1024) -> torch.Tensor:
    """Predicted labels (M,) for test_x (M, D) from train_x (N, D) with labels train_y (N,)."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    k = min(k, train_x.shape[0])
    preds = []
    for start in range(0, test_x.shape[0], chunk):
        sim = test_x[start:start + chunk] @ train_x.T  # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        weights = (top_sim / temperature).exp()  # (m, k)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype)  # (m, C)
        votes.scatter_add_(1, train_y[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_top1(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
             k: int, temperature: float) -> float:
    (xtr, ytr), (xte, yte) = train, test
    classes = num_classes(ytr, yte)
    pred = knn_predict(torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), k,
                       temperature, classes)
    return float((pred.numpy() == yte).mean())


@register_stage("knn", requires=("embed",), config=("knn",))
def run(ctx: StageContext) -> dict:
    features = ctx.output("embed")
    train, test = features["train"], features["test"]
    scores = {f"top1_k{k}": knn_top1(train, test, k, ctx.cfg.knn.temperature)
              for k in ctx.cfg.knn.k}
    return {"top1": scores[f"top1_k{ctx.cfg.knn.k[0]}"], **scores}
