"""A labeled Ray dataset as in-memory arrays, for the stages that need pixels rather than features
(fine-tuning, corruptions, projector thumbnails). Rows are sorted by key, as `embed` sorts its
features, so index i is the same image in both."""
from __future__ import annotations

import numpy as np


def labeled_arrays(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (N, S, S, 3), labels int64 (N,), keys (N,)) of a dataset, sorted by key."""
    images, labels, keys = [], [], []
    for batch in ds.iter_batches(batch_size=512, batch_format="numpy"):
        images.append(np.asarray(batch["image"], dtype=np.uint8))
        labels.append(np.asarray(batch["label"], dtype=np.int64))
        keys.append(np.asarray(batch["key"]))
    images, labels, keys = np.concatenate(images), np.concatenate(labels), np.concatenate(keys)
    order = np.argsort(keys, kind="stable")
    return images[order], labels[order], keys[order]


def num_classes(*labels: np.ndarray) -> int:
    """Classes spanned by label arrays (0..C-1): the largest label seen, plus one."""
    return max(int(y.max()) for y in labels if len(y)) + 1
