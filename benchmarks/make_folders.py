"""Image folders of any size for the scale benchmark, cut from the photographs bundled with
scikit-image (nothing downloaded).

`make_folder(root, n)` writes n small JPEGs into 10 class sub-folders (one photograph per class,
random crops of random position and zoom, 64 px), class after class, as a user's folder is laid
out. `link_folder(src, root, n)` makes a folder of n entries as hard links to another folder's
files: the same directory entries a listing must walk, without the disk of n images (for the
listing-only 1M case). Both skip the work if `root` is already complete.

    python -m benchmarks.make_folders DIR N
"""
from __future__ import annotations

import io
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
          "motorcycle_left.png", "retina.jpg", "rocket.jpg", "camera.png", "coins.png")
SIDE = 64
MARKER = ".complete"


def _photo(name: str) -> np.ndarray:
    import skimage.data
    import skimage.io
    img = skimage.io.imread(Path(skimage.data.__file__).parent / name)
    return np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]


def _write_class(root: str, label: int, start: int, count: int, seed: int) -> None:
    from PIL import Image
    photo = _photo(PHOTOS[label])
    rng = np.random.default_rng(seed)
    h, w = photo.shape[:2]
    folder = os.path.join(root, f"class{label:02d}")
    os.makedirs(folder, exist_ok=True)
    for i in range(start, start + count):
        side = int(rng.integers(min(h, w) // 8, min(h, w) // 2))
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((SIDE, SIDE))
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=85)
        with open(os.path.join(folder, f"{i:07d}.jpg"), "wb") as f:
            f.write(buf.getvalue())


def make_folder(root: str | os.PathLike, n: int, workers: int = 2) -> str:
    """A class-sorted folder of `n` 64-px JPEGs in 10 classes (kept if already complete)."""
    root = str(root)
    if os.path.exists(os.path.join(root, MARKER)):
        return root
    per_class = -(-n // len(PHOTOS))
    jobs, chunk = [], 5000
    for label in range(len(PHOTOS)):
        count = min(per_class, n - label * per_class)
        for start in range(0, max(count, 0), chunk):
            jobs.append((root, label, start, min(chunk, count - start),
                         label * 1_000_003 + start))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_class, *zip(*jobs)))
    Path(root, MARKER).touch()
    return root


def link_folder(src: str | os.PathLike, root: str | os.PathLike, n: int) -> str:
    """A folder of `n` hard links, in the class layout of `src`, to `src`'s files."""
    src, root = str(src), str(root)
    if os.path.exists(os.path.join(root, MARKER)):
        return root
    classes = sorted(d for d in os.listdir(src) if not d.startswith("."))
    per_class = -(-n // len(classes))
    for label, cls in enumerate(classes):
        files = sorted(os.listdir(os.path.join(src, cls)))
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(min(per_class, n - label * per_class)):
            target = os.path.join(root, cls, f"{i:07d}.jpg")
            if not os.path.exists(target):
                os.link(os.path.join(src, cls, files[i % len(files)]), target)
    Path(root, MARKER).touch()
    return root


if __name__ == "__main__":
    make_folder(sys.argv[1], int(sys.argv[2]))
