"""sRGB <-> CIELAB in torch, and the quantised ab space of colorization.

Colorful Image Colorization (Zhang, Isola, Efros, 2016, arXiv:1603.08511) predicts, per pixel, a
distribution over Q bins of the ab plane (grid 10), trained on soft-encoded targets (5 nearest
bins, Gaussian sigma 5) weighted by class rebalancing (lambda 0.5), and decodes with the annealed
mean (T 0.38). `ab_prior` and `rebalance_weights` give the paper's smoothed colour prior p~ and
its class weights. Split-brain autoencoders (Zhang, Isola, Efros, 2017, arXiv:1611.09842) reuse the
same L/ab split and ab classification.

Conventions match skimage.color.rgb2lab / lab2rgb: sRGB in [0, 1], D65 white, 2-degree observer,
L in [0, 100], a and b roughly in [-128, 127]. Colour channels are dim -3, so (B, 3, H, W) or
(3, H, W) both work; the conversions are differentiable.
"""
from __future__ import annotations

import functools

import torch

# sRGB primaries to CIE XYZ (D65), as in the sRGB specification and skimage.
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)  # XYZ of the D65 reference white, 2-degree observer
_EPSILON = 0.008856  # CIE (6/29)^3: below it the cube root is replaced by a line
_KAPPA_SLOPE = 7.787  # slope of that line, (29/6)^2 / 3
_F_EPSILON = 0.2068966  # f(_EPSILON) = 6/29, where lab_to_rgb switches back
_AB_SAMPLES_PER_EDGE = 256  # 8-bit levels on each face of the RGB cube, for ab_bins


def _channel_matmul(matrix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Apply a (3, 3) colour matrix to the channel dim -3 of `image` (..., 3, H, W)."""
    return torch.einsum("ij,...jhw->...ihw", matrix.to(image), image)


def _xyz_from_rgb() -> torch.Tensor:
    return torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64)  # (3, 3); float64, cast on use


def _white(image: torch.Tensor) -> torch.Tensor:
    return torch.tensor(_WHITE_D65, dtype=torch.float64).to(image).view(3, 1, 1)  # (3, 1, 1)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB (..., 3, H, W) in [0, 1] -> CIELAB (..., 3, H, W), L in [0, 100], a, b about +-128."""
    # The clamps inside the branches keep the gradients of the unused branch finite at 0.
    linear = torch.where(rgb > 0.04045, ((rgb.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4,
                         rgb / 12.92)
    xyz = _channel_matmul(_xyz_from_rgb(), linear) / _white(rgb)  # (..., 3, H, W)
    f = torch.where(xyz > _EPSILON, xyz.clamp(min=_EPSILON) ** (1.0 / 3.0),
                    _KAPPA_SLOPE * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(dim=-3)
    lab = (116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz))
    return torch.stack(lab, dim=-3)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIELAB (..., 3, H, W) -> sRGB (..., 3, H, W) clipped to [0, 1]."""
    lightness, a, b = lab.unbind(dim=-3)
    fy = (lightness + 16.0) / 116.0
    # Negative Z is out of gamut; clip it to 0 as skimage does.
    f = torch.stack((fy + a / 500.0, fy, (fy - b / 200.0).clamp(min=0.0)), dim=-3)
    xyz = torch.where(f > _F_EPSILON, f ** 3, (f - 16.0 / 116.0) / _KAPPA_SLOPE) * _white(lab)
    linear = _channel_matmul(torch.linalg.inv(_xyz_from_rgb()), xyz)
    rgb = torch.where(linear > 0.0031308,
                      1.055 * linear.clamp(min=0.0031308) ** (1.0 / 2.4) - 0.055,
                      12.92 * linear)
    return rgb.clamp(0.0, 1.0)


def _rgb_cube_surface(levels: int) -> torch.Tensor:
    """Every colour on the six faces of the RGB cube at `levels` steps: (6 * levels^2, 3, 1, 1)."""
    u = torch.linspace(0.0, 1.0, levels, dtype=torch.float64)
    s, t = (g.reshape(-1) for g in torch.meshgrid(u, u, indexing="ij"))  # (levels^2,)
    faces = []
    for fixed in range(3):
        free = [c for c in range(3) if c != fixed]
        for value in (0.0, 1.0):
            face = torch.full((s.numel(), 3), value, dtype=torch.float64)
            face[:, free[0]], face[:, free[1]] = s, t
            faces.append(face)
    return torch.cat(faces).view(-1, 3, 1, 1)


@functools.lru_cache(maxsize=None)
def _ab_bins_cached(grid: float) -> torch.Tensor:
    # Every vertical (fixed-ab) line through the sRGB solid in Lab leaves it through the
    # cube's surface, so the surface's ab values cover the whole gamut's ab projection.
    ab = rgb_to_lab(_rgb_cube_surface(_AB_SAMPLES_PER_EDGE))[:, 1:, 0, 0]  # (S, 2)
    cells = torch.unique(torch.round(ab / grid).long(), dim=0)  # (Q, 2), sorted by (a, b)
    return cells.to(torch.float32) * grid


def ab_bins(grid: float = 10.0) -> torch.Tensor:
    """Centres (Q, 2) of the ab cells (multiples of `grid`) that some sRGB colour falls in.

    For grid 10 this gives Q = 261 (a in [-90, 100], b in [-110, 90]). The paper reports 313;
    no grid-10 placement lets sRGB colours occupy that many cells, so its set also holds cells
    no sRGB colour falls in.
    """
    return _ab_bins_cached(float(grid)).clone()


def _flat_ab(ab: torch.Tensor) -> torch.Tensor:
    return ab.permute(0, 2, 3, 1).reshape(-1, 2)  # (B*H*W, 2)


def encode_ab(ab: torch.Tensor, bins: torch.Tensor, sigma: float = 5.0, k: int = 5) -> torch.Tensor:
    """Soft-encode ab (B, 2, H, W) over bins (Q, 2) -> targets (B, Q, H, W) summing to 1.

    Each pixel's weight goes to its k nearest bins with a Gaussian of its distance (paper: k=5,
    sigma=5).
    """
    batch, _, height, width = ab.shape
    bins = bins.to(ab)
    dist = torch.cdist(_flat_ab(ab), bins)  # (B*H*W, Q)
    near_dist, near_idx = dist.topk(k, dim=1, largest=False)  # (B*H*W, k)
    weights = torch.softmax(-near_dist ** 2 / (2.0 * sigma ** 2), dim=1)  # (B*H*W, k)
    targets = torch.zeros_like(dist).scatter_(1, near_idx, weights)  # (B*H*W, Q)
    return targets.view(batch, height, width, -1).permute(0, 3, 1, 2)


def decode_ab(logits: torch.Tensor, bins: torch.Tensor, temperature: float = 0.38) -> torch.Tensor:
    """Annealed mean of the predicted distribution: logits (B, Q, H, W) -> ab (B, 2, H, W).

    Re-normalising exp(log z / T) equals softmax(logits / T); T=0.38 is the paper's choice between
    the mean (T=1, desaturated) and the mode (T->0, patchy).
    """
    probs = torch.softmax(logits / temperature, dim=1)  # (B, Q, H, W)
    return torch.einsum("bqhw,qc->bchw", probs, bins.to(probs))


def ab_prior(ab: torch.Tensor, bins: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """Empirical distribution p~ (Q,) of ab (B, 2, H, W) over its nearest bins, smoothed by a
    Gaussian of width sigma in ab space, as the paper estimates it for class rebalancing."""
    bins = bins.to(ab)
    nearest = torch.cdist(_flat_ab(ab), bins).argmin(dim=1)  # (B*H*W,)
    counts = torch.bincount(nearest, minlength=bins.shape[0]).to(ab)  # (Q,)
    kernel = torch.exp(-torch.cdist(bins, bins) ** 2 / (2.0 * sigma ** 2))  # (Q, Q)
    smoothed = kernel @ counts  # (Q,)
    return smoothed / smoothed.sum()


def rebalance_weights(prior: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """Class-rebalancing weights (Q,): w ~ ((1 - lam) p~ + lam / Q)^-1, scaled so E_p~[w] = 1."""
    prior = prior / prior.sum()  # (Q,)
    weights = 1.0 / ((1.0 - lam) * prior + lam / prior.numel())  # (Q,)
    return weights / (prior * weights).sum()
