"""`tsne`: a 2-D map of the frozen test features coloured by label, and TensorBoard's projector.

t-SNE of van der Maaten & Hinton, "Visualizing Data using t-SNE", JMLR 2008 (PCA initialisation,
automatic learning rate); above `eval.tsne.max_points` points the map is PCA, which is linear and
fast. The PNG is drawn with matplotlib's Agg canvas (no display needed). The projector gets the
features with image thumbnails (`SummaryWriter.add_embedding(label_img=...)`).
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import torch

from pipelines.checkpoint import read_meta
from pipelines.stages.config import TSNEConfig
from methods.augment import from_hwc
from pipelines.stages.registry import StageContext, register_stage

PROJECTOR_TAG = "test_features"  # the projector's folder is tensorboard/<step>/<tag>


def project_2d(features: np.ndarray, cfg: TSNEConfig, seed: int) -> tuple[np.ndarray, str]:
    """(coordinates (N, 2), "tsne" | "pca")."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    x = features.astype(np.float32)
    if len(x) > cfg.max_points or len(x) <= 3:
        return PCA(n_components=2, random_state=seed).fit_transform(x), "pca"
    perplexity = min(cfg.perplexity, (len(x) - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed)
    return tsne.fit_transform(x), "tsne"


def scatter_png(coords: np.ndarray, labels: np.ndarray, names: list[str], title: str,
                path: str) -> None:
    """Save a scatter of coords (N, 2), one colour per label, with a legend of class names."""
    import matplotlib
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 5.6), dpi=100)
    ax = fig.add_subplot()
    classes = np.unique(labels)
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for i, c in enumerate(classes):
        m = labels == c
        name = names[c] if 0 <= c < len(names) else str(c)
        ax.scatter(coords[m, 0], coords[m, 1], s=8, alpha=0.8, label=name, color=cmap(i % cmap.N))
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=2, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_projector(logdir: str, features: np.ndarray, labels: np.ndarray, images: np.ndarray,
                    names: list[str], step: int) -> None:
    """Features (N, D) with label metadata and thumbnails from images uint8 (N, S, S, 3)."""
    from torch.utils.tensorboard import SummaryWriter
    shutil.rmtree(os.path.join(logdir, f"{step:05d}", PROJECTOR_TAG), ignore_errors=True)
    thumbs = from_hwc(images).float() / 255.0
    meta = [names[c] if 0 <= c < len(names) else str(c) for c in labels.tolist()]
    with SummaryWriter(logdir) as writer:
        writer.add_embedding(torch.from_numpy(features), metadata=meta, label_img=thumbs,
                             global_step=step, tag=PROJECTOR_TAG)


@register_stage("tsne", requires=("embed",), config=("tsne",))
def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg.tsne
    features, labels = ctx.output("embed")["test"]
    names = list(getattr(ctx.splits, "classes", None) or [])
    coords, method = project_2d(features, cfg, ctx.seed)
    out = ctx.stage_dir("tsne")
    np.savez(os.path.join(out, "coords.npz"), coords=coords, labels=labels)
    title = f"{'t-SNE' if method == 'tsne' else 'PCA'} of {len(labels)} test features"
    scatter_png(coords, labels, names, title,
                os.path.join(out, "tsne.png"))
    if cfg.projector_points:
        images, image_labels, _ = ctx.images("test")
        n = min(cfg.projector_points, len(images))
        step = int(read_meta(ctx.checkpoint).get("step", 0))
        write_projector(os.path.join(ctx.run_dir, "tensorboard"), features[:n], image_labels[:n],
                        images[:n], names, step)
    return {"projection": method, "points": int(len(labels))}
