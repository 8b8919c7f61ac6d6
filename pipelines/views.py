"""The method's views as a Ray Data stage: decoded images in, augmented views out.

Runs after the decoded cache or the streaming read, so every epoch re-executes it and draws new
augmentations; each task seeds its own generator from the OS (methods/views.py explains why).
"""
from __future__ import annotations

from typing import Callable

import ray
import torch

from methods.augment import from_hwc
from methods.views import new_generator


class ViewsUDF:
    """{"image": uint8 (n, S, S, 3), ...} -> the method's views as NumPy arrays (n, ...)."""

    def __init__(self, views: Callable):
        self.views = views

    def __call__(self, batch: dict) -> dict:
        with torch.no_grad():
            out = self.views(from_hwc(batch["image"]), new_generator())  # (n, 3, S, S) in
        return {k: v.numpy() for k, v in out.items()}


def view_dataset(images: ray.data.Dataset, views: Callable, batch_size: int,
                 remote_args: dict | None = None, *, streamed: bool = False) -> ray.data.Dataset:
    """`images` -> a lazily executed dataset of views.

    A decoded cache is reshuffled by block each epoch (its rows were mixed once when listed); a
    streamed dataset is already reshuffled row by row before it is read, and reordering its
    blocks would hold all of them at once (`randomize_block_order` is an all-to-all step).
    """
    if not streamed:
        images = images.randomize_block_order()
    return images.map_batches(ViewsUDF(views), batch_size=batch_size, zero_copy_batch=True,
                              **(remote_args or {}))
