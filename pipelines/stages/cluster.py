"""`cluster`: k-means on the frozen test features with k = number of classes, scored against the
labels by normalised mutual information (Strehl & Ghosh, JMLR 2002) and the adjusted Rand index
(Hubert & Arabie, 1985) — the clustering evaluation of DeepCluster (Caron, Bojanowski, Joulin,
Douze, 2018, arXiv:1807.05520). Both are 1 for a perfect partition and about 0 for a random one.
"""
from __future__ import annotations

import numpy as np

from pipelines.stages.config import KMeansConfig
from pipelines.stages.registry import StageContext, register_stage


def cluster_scores(features: np.ndarray, labels: np.ndarray, cfg: KMeansConfig,
                   seed: int) -> dict:
    """{"nmi", "ari", "k"} of k-means (k = distinct labels) on features (N, D)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    x = features.astype(np.float64)
    if cfg.l2_normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = len(np.unique(labels))
    assigned = KMeans(n_clusters=k, n_init=cfg.n_init, random_state=seed).fit_predict(x)
    return {"nmi": float(normalized_mutual_info_score(labels, assigned)),
            "ari": float(adjusted_rand_score(labels, assigned)), "k": k}


@register_stage("cluster", requires=("embed",), config=("cluster",))
def run(ctx: StageContext) -> dict:
    features, labels = ctx.output("embed")["test"]
    return cluster_scores(features, labels, ctx.cfg.cluster, ctx.seed)
