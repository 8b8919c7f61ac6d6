"""Image corruptions of Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019, arXiv:1903.12261, sized for small images.

Their definitions, at the parameters of their 32 px CIFAR-10-C set, severities 1, 3 and 5 of 5
taken as our levels 1, 2 and 3 (level 0 is the clean image):
  gaussian_noise  x + N(0, c^2) on [0, 1] pixels       c = 0.04, 0.08, 0.10
  gaussian_blur   Gaussian filter of std c pixels      c = 0.4, 0.7, 1.0   (x side / 32)
  contrast        (x - mean) * c + mean, per channel   c = 0.75, 0.4, 0.15
  jpeg            JPEG re-encoding at quality c        c = 80, 58, 40
"""
from __future__ import annotations

import io

import numpy as np

LEVELS = {
    "gaussian_noise": (0.04, 0.08, 0.10),
    "gaussian_blur": (0.4, 0.7, 1.0),
    "contrast": (0.75, 0.4, 0.15),
    "jpeg": (80, 58, 40),
}


def _noise(x: np.ndarray, c: float, seeds: np.ndarray) -> np.ndarray:
    noise = np.stack([np.random.default_rng(int(s)).normal(0.0, c, x.shape[1:]) for s in seeds])
    return x + noise


def _blur(x: np.ndarray, c: float) -> np.ndarray:
    from skimage.filters import gaussian
    sigma = c * x.shape[1] / 32
    return gaussian(x, sigma=(0, sigma, sigma, 0), mode="nearest", preserve_range=True)


def _contrast(x: np.ndarray, c: float) -> np.ndarray:
    mean = x.mean(axis=(1, 2), keepdims=True)  # (N, 1, 1, 3)
    return (x - mean) * c + mean


def _jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    return np.stack(out)


def corrupt(images: np.ndarray, name: str, severity: int, seeds: np.ndarray | None = None
            ) -> np.ndarray:
    """images uint8 (N, S, S, 3) corrupted by `name` at level `severity` (0..3) -> uint8 (N, S, S, 3).

    `seeds` (N,) make the noise of each image reproducible whatever batch it arrives in.
    """
    if name not in LEVELS:
        raise ValueError(f"unknown corruption {name!r}; choices: {', '.join(LEVELS)}")
    if severity == 0:
        return images.copy()
    c = LEVELS[name][severity - 1]
    if name == "jpeg":
        return _jpeg(images, c)
    x = images.astype(np.float64) / 255.0
    if name == "gaussian_noise":
        seeds = np.arange(len(images)) if seeds is None else seeds
        x = _noise(x, c, seeds)
    elif name == "gaussian_blur":
        x = _blur(x, c)
    else:
        x = _contrast(x, c)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
