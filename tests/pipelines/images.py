"""Image files of every awkward kind, made on the fly for data-source tests."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def awkward_images(seed: int = 0) -> dict[str, bytes]:
    """name -> encoded bytes: good images in many modes and sizes, plus two broken files."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8), "RGB")
    jpeg = io.BytesIO()
    rgb.resize((40, 24)).save(jpeg, format="JPEG")
    good = {
        "rgb.png": _png(rgb),
        "gray.png": _png(Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), "L")),
        "rgba.png": _png(Image.fromarray(rng.integers(0, 255, (12, 18, 4), dtype=np.uint8), "RGBA")),
        "palette.png": _png(rgb.convert("P")),
        "deep16.png": _png(Image.fromarray(rng.integers(0, 65535, (10, 10), dtype=np.uint16))),
        "photo.jpg": jpeg.getvalue(),
    }
    return {**good, "corrupt.png": b"this is not an image at all",
            "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2]}


BROKEN = ("corrupt.png", "truncated.jpg")


def write_folder(root: str, classes: tuple[str, ...] = ("cat", "dog")) -> dict[str, str]:
    """A class-per-subfolder dataset: every awkward image in every class. Returns key -> class."""
    keys = {}
    for cls in classes:
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for name, data in awkward_images(seed=len(cls)).items():
            with open(os.path.join(root, cls, name), "wb") as f:
                f.write(data)
            keys[f"{cls}/{name}"] = cls
    return keys
