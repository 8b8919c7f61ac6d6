"""Shared set-up of the pretext-method tests: each method at a tiny size and its real geometry.
The images they run on are the fixtures of tests/methods/conftest.py."""
from __future__ import annotations

import torch

import methods
from methods.backbones import BackboneConfig

BATCH = 16
BACKBONE = BackboneConfig(width=8)
# (image size, config overrides) per method: tiny, but each method's real geometry.
SETUP = {
    "rotnet": (16, {"crop_padding": 1, "flip_p": 0.0}),
    "relative_loc": (32, {"pairs_per_image": 2, "head_hidden_dim": 32}),
    "jigsaw": (32, {"num_permutations": 10, "head_hidden_dim": 32}),
    "inpainting": (16, {"disc_width": 8}),
    "colorization": (16, {}),
    "split_brain": (16, {}),
}
COLOUR = {"colorization", "split_brain"}
PRETEXT_KEYS = {
    "rotnet": {"rotation_acc"}, "relative_loc": {"position_acc"},
    "jigsaw": {"permutation_acc"}, "inpainting": {"masked_mse", "masked_l1"},
    "colorization": {"ab_l2", "ab_l2_gray"}, "split_brain": {"ab_l2", "ab_l2_gray", "l_abs"},
}
NAMES = sorted(SETUP)
# embed width: 8w, the backbone's (split-brain: two half-width 4w halves; jigsaw: the tiles' mean)
EMBED_WIDTH = {name: 8 * BACKBONE.width for name in NAMES}


def make(name: str, **extra):
    spec = methods.get(name)
    size, overrides = SETUP[name]
    cfg = spec.config(**{**overrides, **extra})
    torch.manual_seed(0)
    return spec.model(cfg, BACKBONE, size), spec.views(cfg, size), cfg


def views_of(views, images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    return views(images, torch.Generator().manual_seed(seed))
