"""Vision Transformer backbones built from torchvision's ViT encoder blocks.

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, arXiv:2010.11929: non-overlapping
patches, a linear patch embedding, a CLS token and pre-norm transformer blocks. Sizes follow DeiT
(Touvron et al., 2021, arXiv:2012.12877): tiny 192/12/3, small 384/12/6, base 768/12/12 (width,
depth, heads), MLP ratio 4. Positions are the fixed 2-D sine-cosine embedding MoCo v3 and MAE use
(Chen, Xie, He, 2021, arXiv:2104.02057, section 4; He et al., 2021, arXiv:2111.06377).

The attention and MLP blocks are torchvision's `EncoderBlock`. The pieces are exposed so that
token-level methods can use them: `patch_tokens` (patch embedding + positions), `encode` (CLS +
blocks + final norm on any subset of tokens, which is what MAE needs) and `blocks` (for decoders).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import EncoderBlock

from methods.backbones import BackboneConfig, register_backbone
from methods.config import ConfigError

SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}
MLP_RATIO = 4
LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions for a grid x grid of patches, row-major: (grid^2, dim).

    Half the channels encode the row, half the column; each half is sin/cos at dim/4 frequencies
    1 / 10000^(i / (dim/4)), as in the transformer's 1-D encoding.
    """
    if dim % 4:
        raise ValueError(f"sine-cosine positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angles = coord[:, None] * omega[None, :]  # (grid^2, dim/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()  # (grid^2, dim)


def blocks(depth: int, dim: int, heads: int, mlp_ratio: int = MLP_RATIO) -> nn.Sequential:
    """`depth` pre-norm transformer blocks (torchvision's EncoderBlock), no dropout."""
    return nn.Sequential(*[EncoderBlock(heads, dim, mlp_ratio * dim, 0.0, 0.0, LAYER_NORM)
                           for _ in range(depth)])


class ViT(nn.Module):
    """images (B, 3, H, W), normalised -> CLS feature (B, D) after the final LayerNorm.

    The CLS token is the feature because the ViT methods here that train a global objective
    (MoCo v3, DINO) put their loss on it; MAE, whose loss trains the patch tokens, pools them
    itself (methods/mae.py).
    """

    def __init__(self, image_size: int, patch_size: int, dim: int, depth: int, heads: int):
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"backbone.patch_size: {patch_size} does not divide the image size "
                              f"{image_size}")
        self.patch_size, self.dim = patch_size, dim
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        # initialised as the linear layer it is (MAE and MoCo v3 code: Xavier uniform)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(dim, -1))
        nn.init.zeros_(self.patch_embed.bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls_token, std=0.02)
        # fixed, rebuilt from the config, so not part of the checkpoint
        self.register_buffer("pos_embed", sincos_2d(self.grid, dim)[None], persistent=False)
        self.blocks = blocks(depth, dim, heads)
        self.norm = LAYER_NORM(dim)

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def positions(self, grid: int) -> torch.Tensor:
        """Positions for a grid x grid input: (1, grid^2, D); other grids are interpolated from
        the training grid (bicubic), as DINO does for its smaller local crops."""
        if grid == self.grid:
            return self.pos_embed
        table = self.pos_embed.reshape(1, self.grid, self.grid, self.dim).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(1, grid * grid, self.dim)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> patch tokens with positions added, row-major: (B, L, D)."""
        tokens = self.patch_embed(images)  # (B, D, H/p, W/p)
        grid = tokens.shape[-1]
        if tokens.shape[-2] != grid:
            raise ValueError(f"ViT expects square images, got {tuple(images.shape[-2:])}")
        return tokens.flatten(2).transpose(1, 2) + self.positions(grid)  # (B, L, D)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Positioned tokens (B, N), any subset -> [CLS, tokens] after blocks + norm: (B, 1+N, D)."""
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        return self.norm(self.blocks(torch.cat([cls, tokens], dim=1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(self.patch_tokens(images))[:, 0]  # (B, D)


def _builder(name: str):
    dim, depth, heads = SIZES[name]

    def build(cfg: BackboneConfig, image_size: int) -> tuple[nn.Module, int]:
        return ViT(image_size, cfg.patch_size, dim, cfg.depth or depth, heads), dim

    build.__name__ = name
    return build


for _name in SIZES:
    register_backbone(_name)(_builder(_name))
