"""Patches cut from a batch of images: the geometry of the patch-based pretext tasks.

Context prediction (Doersch, Gupta, Efros, 2015, arXiv:1505.05192, section 3.1) samples a 3x3
grid of patches separated by a gap, each jittered by a few pixels, so a network cannot solve the
task by continuing lines or textures across patch borders. Jigsaw puzzles (Noroozi, Favaro, 2016,
arXiv:1603.09246, section 3.3) cut each tile at a random position inside its cell for the same
reason. Both use `sample_grid` + `crop_patches`; `random_translate` is the pad-and-crop
augmentation of CIFAR training (RotNet, Gidaris et al., 2018, arXiv:1803.07728).

Corners are integer (row, column) pixel positions of a patch's top-left pixel, so a patch is an
exact copy of image pixels (any dtype, uint8 included) and a test can check it pixel for pixel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from methods.config import ConfigError

GRID = 3  # patches per side of the grid
CENTRE = GRID * GRID // 2  # row-major index of the centre cell
NEIGHBOURS = tuple(i for i in range(GRID * GRID) if i != CENTRE)  # the 8 cells around it


def grid_extent(patch: int, gap: int) -> int:
    """Side in pixels of an unjittered 3x3 grid of `patch`-pixel patches `gap` pixels apart."""
    return GRID * patch + (GRID - 1) * gap


def check_grid(image_size: int, patch: int, gap: int, jitter: int) -> None:
    """Raise ValueError when a jittered grid does not fit in an image of `image_size` pixels."""
    need = grid_extent(patch, gap) + 2 * jitter
    if patch < 1 or gap < 0 or jitter < 0 or need > image_size:
        raise ValueError(f"a 3x3 grid of {patch} px patches, gap {gap} px and jitter {jitter} px "
                         f"needs {need} px, more than the {image_size} px images")


def check_grid_config(image_size: int, patch: int, gap: int, jitter: int, patch_key: str) -> None:
    """`check_grid` for a config: ConfigError naming `patch_key` (the method's own key)."""
    try:
        check_grid(image_size, patch, gap, jitter)
    except ValueError as e:
        raise ConfigError(f"{patch_key}: {e}; lower {patch_key}, method.gap or method.jitter, "
                          f"or raise data.image_size") from None


def cell_offsets(patch: int, gap: int) -> Tensor:
    """(9, 2) long: (row, column) of each cell's top-left pixel relative to the grid's origin."""
    steps = torch.arange(GRID) * (patch + gap)  # (3,)
    rows, cols = torch.meshgrid(steps, steps, indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], 1)  # (9, 2)


def sample_grid(batch: int, image_size: int, patch: int, gap: int, jitter: int, *,
                generator: torch.Generator) -> Tensor:
    """Top-left corners (B, 9, 2) long of a jittered 3x3 grid per image, cells row-major.

    The grid sits at a uniformly random place that leaves room for the jitter; each patch then
    moves by an independent integer offset in [-jitter, jitter] along each axis.
    """
    check_grid(image_size, patch, gap, jitter)
    room = image_size - grid_extent(patch, gap) - 2 * jitter  # free pixels for the grid's origin
    origin = torch.randint(0, room + 1, (batch, 1, 2), generator=generator) + jitter  # (B, 1, 2)
    shifts = torch.randint(-jitter, jitter + 1, (batch, GRID * GRID, 2), generator=generator)
    return origin + cell_offsets(patch, gap) + shifts  # (B, 9, 2)


def centred_grid(batch: int, image_size: int, patch: int, gap: int) -> Tensor:
    """Top-left corners (B, 9, 2) long of the unjittered 3x3 grid centred in the image."""
    check_grid(image_size, patch, gap, 0)
    origin = (image_size - grid_extent(patch, gap)) // 2
    return (origin + cell_offsets(patch, gap)).expand(batch, -1, -1)  # (B, 9, 2)


def crop_patches(images: Tensor, corners: Tensor, size: int) -> Tensor:
    """images (B, C, H, W), corners (B, K, 2) (row, column) -> patches (B, K, C, size, size)."""
    corners = corners.to(images.device)
    span = torch.arange(size, device=images.device)  # (size,)
    rows = (corners[..., 0, None] + span)[..., :, None]  # (B, K, size, 1)
    cols = (corners[..., 1, None] + span)[..., None, :]  # (B, K, 1, size)
    index = torch.arange(images.shape[0], device=images.device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    patches = images[index, :, rows, cols]  # (B, K, size, size, C): advanced indices go first
    return patches.permute(0, 1, 4, 2, 3).contiguous()


def random_translate(images: Tensor, padding: int, *, generator: torch.Generator) -> Tensor:
    """Pad each image by `padding` zero pixels and crop its original size back at a random place."""
    if padding == 0:
        return images
    batch, _, height, width = images.shape
    if height != width:
        raise ValueError(f"random_translate needs square images, got {height}x{width}")
    padded = F.pad(images, (padding,) * 4)
    corners = torch.randint(0, 2 * padding + 1, (batch, 1, 2), generator=generator)  # (B, 1, 2)
    return crop_patches(padded, corners, height)[:, 0]  # (B, C, H, W)
