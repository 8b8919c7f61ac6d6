"""Jigsaw puzzles — Noroozi, Favaro, "Unsupervised Learning of Visual Representations by Solving
Jigsaw Puzzles", ECCV 2016, arXiv:1603.09246.

An image is cut into a 3x3 grid of tiles, each taken at a random place inside its cell (so
neighbouring tiles do not share edges), the tiles are shuffled by one of N fixed permutations, each
tile goes through the same encoder (the paper's "context-free network"), and an MLP on the
concatenated tile features names the permutation's index. Each tile is standardised to zero mean
and unit standard deviation on its own, as the paper does, so low-level statistics shared by
neighbouring tiles are no shortcut. `embed` reads the encoder the way it was trained: on the
unshuffled image's centred grid of tiles, their features averaged over the nine tiles by default
(global average pooling over the grid, a D-wide feature like every other ResNet method's) or
concatenated in cell order (what the context-free network's classifier sees for the identity
permutation; 9 D wide, and on digits 2304 random-init dimensions already probe as well as pixels).

The permutation set follows the paper's Algorithm 1: start from a random permutation, then
repeatedly add the remaining permutation with the largest summed Hamming distance to those already
chosen. It is a pure function of (N, seed), computed once per process and cached.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods import augment
from methods.backbones import BackboneConfig, build_backbone, normalize
from methods.base import SSLMethod
from methods.config import param
from methods.heads import mlp
from methods.patches import (GRID, centred_grid, check_grid, check_grid_config, crop_patches,
                             sample_grid)
from methods.registry import register

TILES = GRID * GRID  # 9
MIN_TILE_STD = 0.02  # a flat tile (blank digit border) stays flat instead of amplifying noise


@dataclass
class JigsawConfig:
    # Paper: 1000 permutations for its transfer results (it also studies 100 and others).
    num_permutations: int = param(1000, ge=2, le=10000, tunable=True,
                                  help="size N of the permutation set (the number of classes)")
    permutation_seed: int = param(0, ge=0, help="seed of the greedy permutation-set construction")
    # Paper: 64 px tiles at random places in the 75 px cells of a 225 px crop. Shrunk here to fit
    # 32 px images: 8 px tiles, 2 px apart, moved up to 1 px (3*8 + 2*2 + 2*1 = 30).
    tile_size: int = param(8, ge=2, tunable=True, help="side of each tile (px)")
    gap: int = param(2, ge=0, help="pixels between neighbouring cells' tiles before jitter")
    jitter: int = param(1, ge=0, help="each tile moves up to this many px along each axis")
    tile_norm: bool = param(True, help="standardise each tile on its own (paper)")
    head_hidden_dim: int = param(1024, ge=1, help="hidden width of the permutation classifier "
                                 "(the paper's fc7 has 4096)")
    embed_pool: str = param("mean", choices=("mean", "concat"),
                            help="evaluation feature: the tiles' features averaged (D) or "
                                 "concatenated in cell order (9 D)")


def all_permutations(n: int) -> torch.Tensor:
    """Every permutation of range(n) once, (n!, n) int8, built by inserting k at every place."""
    perms = torch.zeros(1, 0, dtype=torch.int8)
    for k in range(n):
        grown = [torch.cat([perms[:, :j], torch.full((len(perms), 1), k, dtype=torch.int8),
                            perms[:, j:]], 1) for j in range(k + 1)]
        perms = torch.cat(grown)  # (k+1)! rows
    return perms


@functools.lru_cache(maxsize=4)
def _greedy_permutations(count: int, seed: int) -> torch.Tensor:
    candidates = all_permutations(TILES)  # (9!, 9)
    if count > len(candidates):
        raise ValueError(f"only {len(candidates)} permutations of {TILES} tiles exist, "
                         f"asked for {count}")
    g = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(len(candidates), (1,), generator=g))]
    distance_sum = torch.zeros(len(candidates), dtype=torch.int32)  # (9!,)
    available = torch.ones(len(candidates), dtype=torch.bool)
    for _ in range(count - 1):
        last = candidates[chosen[-1]]
        distance_sum += (candidates != last).sum(1, dtype=torch.int32)
        available[chosen[-1]] = False
        chosen.append(int(distance_sum.masked_fill(~available, -1).argmax()))  # first on ties
    return candidates[chosen].long()  # (N, 9)


def permutation_set(count: int, seed: int = 0) -> torch.Tensor:
    """N permutations (N, 9) long of the 9 tiles, greedily spread in Hamming distance."""
    return _greedy_permutations(count, seed).clone()


def standardize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float, each image (or tile) at zero mean and unit std on its own."""
    x = images.float().div_(255.0)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    std = x.flatten(1).std(dim=1).clamp_min(MIN_TILE_STD).view(-1, 1, 1, 1)
    return (x - mean) / std


class JigsawViews:
    """images uint8 (B, 3, S, S) -> {"tiles": uint8 (B, 9, 3, t, t), "permutation": (B,) long}:
    with p = permutation_set(N, seed)[permutation[b]], tiles[b, i] is the tile of grid cell p[i]
    (cells numbered row-major), so putting tiles[b, i] back in cell p[i] solves the puzzle."""

    def __init__(self, tile_size: int, gap: int, jitter: int, permutations: torch.Tensor,
                 image_size: int):
        check_grid(image_size, tile_size, gap, jitter)
        self.tile_size, self.gap, self.jitter, self.size = tile_size, gap, jitter, image_size
        self.permutations = permutations  # (N, 9)

    def layout(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(corners (B, 9, 2) of the tiles in cell order, permutation indices (B,))."""
        corners = sample_grid(batch, self.size, self.tile_size, self.gap, self.jitter,
                              generator=generator)
        index = torch.randint(0, len(self.permutations), (batch,), generator=generator)
        return corners, index

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        images = augment.fit_size(images, self.size)
        corners, index = self.layout(images.shape[0], generator)  # (B, 9, 2), (B,)
        perms = self.permutations[index]  # (B, 9)
        shuffled = corners.gather(1, perms[..., None].expand(-1, -1, 2))  # (B, 9, 2)
        return {"tiles": crop_patches(images, shuffled, self.tile_size), "permutation": index}


class Jigsaw(SSLMethod):
    def __init__(self, cfg: JigsawConfig, backbone: BackboneConfig, image_size: int):
        super().__init__()
        check_grid_config(image_size, cfg.tile_size, cfg.gap, cfg.jitter, "method.tile_size")
        self.tile_norm, self.tile_size, self.gap = cfg.tile_norm, cfg.tile_size, cfg.gap
        self.embed_pool = cfg.embed_pool
        self.backbone, dim = build_backbone(backbone, image_size)
        self.head = mlp(TILES * dim, cfg.head_hidden_dim, cfg.num_permutations, num_layers=2)

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        return standardize(images) if self.tile_norm else normalize(images)

    def logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, N), labels (B,))."""
        tiles = batch["tiles"]  # (B, 9, 3, t, t)
        features = self.backbone(self._input(tiles.flatten(0, 1)))  # (9B, D)
        return self.head(features.view(tiles.shape[0], -1)), batch["permutation"]

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logits, labels = self.logits(batch)
        loss = F.cross_entropy(logits, labels)
        return loss, {"permutation_acc": (logits.detach().argmax(1) == labels).float().mean()}

    @torch.no_grad()
    def pretext_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        logits, labels = self.logits(batch)
        return {"permutation_acc": float((logits.argmax(1) == labels).float().mean())}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The context-free network's tile features of the unshuffled image, averaged (B, D) or
        concatenated in cell order (B, 9 * D). The encoder only ever saw tiles (and its BatchNorm
        statistics are tile statistics), so it is read on the image's centred 3x3 grid of tiles."""
        corners = centred_grid(images.shape[0], images.shape[-1], self.tile_size, self.gap)
        tiles = crop_patches(images, corners, self.tile_size)  # (B, 9, 3, t, t)
        features = self.backbone(self._input(tiles.flatten(0, 1)))  # (9B, D)
        features = features.view(images.shape[0], TILES, -1)  # (B, 9, D)
        return features.mean(1) if self.embed_pool == "mean" else features.flatten(1)

    def log_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = min(4, batch["tiles"].shape[0])
        return {"views/tiles": batch["tiles"][:n].flatten(0, 1)}  # 9 shuffled tiles per image


def views(cfg: JigsawConfig, image_size: int) -> JigsawViews:
    check_grid_config(image_size, cfg.tile_size, cfg.gap, cfg.jitter, "method.tile_size")
    return JigsawViews(cfg.tile_size, cfg.gap, cfg.jitter,
                       permutation_set(cfg.num_permutations, cfg.permutation_seed), image_size)


register("jigsaw", config=JigsawConfig, model=Jigsaw, views=views,
         paper="Noroozi, Favaro 2016, arXiv:1603.09246",
         tiny={"method": {"num_permutations": 10, "head_hidden_dim": 32}, "backbone": {"width": 4},
               "image_size": 32})
