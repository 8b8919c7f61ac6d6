"""Random patch masking as in MAE — He, Chen, Xie, Li, Dollar, Girshick, "Masked Autoencoders Are
Scalable Vision Learners", CVPR 2022, arXiv:2111.06377, section 3.

Each image keeps a uniformly random subset of exactly int(L * (1 - ratio)) of its L patches, drawn
by sorting per-patch uniform noise (the reference code's shuffle), so every image of a batch masks
the same number of patches and the visible tokens stack into one (B, L_keep, D) tensor.
"""
from __future__ import annotations

import torch


def num_visible(num_patches: int, ratio: float) -> int:
    """Patches an image keeps: int(L * (1 - ratio)), the reference code's rounding."""
    return int(num_patches * (1.0 - ratio))


def random_masking(batch: int, num_patches: int, ratio: float, device: torch.device,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_keep (B, L_keep) long, ascending; mask (B, L) bool, True = removed)."""
    keep = num_visible(num_patches, ratio)
    noise = torch.rand(batch, num_patches, generator=generator,
                       device=generator.device if generator is not None else device)
    ids_keep = noise.argsort(dim=1)[:, :keep].sort(dim=1).values.to(device)  # (B, L_keep)
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=device)  # (B, L)
    mask.scatter_(1, ids_keep, False)
    return ids_keep, mask


def take_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens (B, L, D), ids (B, N) -> the selected tokens (B, N, D), in the order of ids."""
    return tokens.gather(1, ids[..., None].expand(-1, -1, tokens.shape[-1]))


def place_tokens(fill: torch.Tensor, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Copy of fill (B, L, D) with tokens (B, N, D) written at positions ids (B, N)."""
    return fill.scatter(1, ids[..., None].expand(-1, -1, fill.shape[-1]), tokens)
