"""`scenes`: a labeled colour dataset cut from the photographs bundled inside scikit-image.

Colorization (Zhang, Isola, Efros, 2016, arXiv:1603.08511) and split-brain autoencoders (Zhang,
Isola, Efros, 2017, arXiv:1611.09842) need colour images, and the other embedded source (digits)
is grayscale. Each class is one photograph; its crops are taken at random positions and sizes and
resized to `crop_size`. Train crops lie in the left part of a photograph and test crops in its
right part (`test_fraction` of the width), `gap` pixels apart, so no source pixel is in both.

Only files shipped inside the scikit-image package are read, by path, so nothing is ever fetched
from the network. Left out: grayscale images, chessboard_RGB / phantom / horse (no colour),
color.png (a synthetic colour wheel) and logo.png (a graphic), motorcycle_right.png (the stereo
twin of motorcycle_left), and every image skimage downloads with pooch (lily, kidney, eagle,
skin, cells3d, ...).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import numbers
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import skimage
import skimage.data
import skimage.io
from PIL import Image

# class name -> (bundled file, content box (x0, y0, x1, y1) or None for the whole photograph)
PHOTOS: dict[str, tuple[str, tuple[int, int, int, int] | None]] = {
    "astronaut": ("astronaut.png", None),
    "chelsea": ("chelsea.png", None),
    "coffee": ("coffee.png", None),
    "hubble_deep_field": ("hubble_deep_field.jpg", None),
    "immunohistochemistry": ("ihc.png", None),
    "motorcycle": ("motorcycle_left.png", None),
    # The square inscribed in the fundus disc; the black surround would give empty crops.
    "retina": ("retina.jpg", (220, 220, 1185, 1185)),
    "rocket": ("rocket.jpg", None),
}
_FORMAT_VERSION = 1  # bump when the construction changes, so old caches are not reused


def load_photo(name: str) -> np.ndarray:
    """The bundled photograph of class `name` as uint8 (H, W, 3), read from skimage's package."""
    filename, _ = PHOTOS[name]
    photo = skimage.io.imread(Path(skimage.data.__file__).parent / filename)
    if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
        raise ValueError(f"{filename}: expected uint8 (H, W, 3), got {photo.dtype} {photo.shape}")
    return photo


def content_box(name: str, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The part (x0, y0, x1, y1) of photograph `name` (of array shape (H, W, 3)) crops come from."""
    return PHOTOS[name][1] or (0, 0, shape[1], shape[0])


def split_regions(name: str, shape: tuple[int, ...], test_fraction: float,
                  gap: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """(train, test) regions (x0, y0, x1, y1) of a photograph: left part / right part, disjoint."""
    x0, y0, x1, y1 = content_box(name, shape)
    test_x0 = x1 - round(test_fraction * (x1 - x0))
    return (x0, y0, test_x0 - gap, y1), (test_x0, y0, x1, y1)


def _sample_boxes(rng: np.random.Generator, region: tuple[int, int, int, int], count: int,
                  sides: tuple[int, int]) -> np.ndarray:
    """`count` random squares (x0, y0, x1, y1) inside `region`, sides in [sides[0], sides[1]]."""
    rx0, ry0, rx1, ry1 = region
    side = rng.integers(sides[0], sides[1] + 1, size=count)  # (N,)
    x = rx0 + (rng.random(count) * (rx1 - rx0 - side + 1)).astype(np.int64)  # (N,)
    y = ry0 + (rng.random(count) * (ry1 - ry0 - side + 1)).astype(np.int64)  # (N,)
    return np.stack([x, y, x + side, y + side], axis=1)  # (N, 4)


def _render(photo: np.ndarray, boxes: np.ndarray, crop_size: int) -> np.ndarray:
    """Cut each box and resize it to crop_size with an antialiasing (Lanczos) filter."""
    crops = np.empty((len(boxes), crop_size, crop_size, 3), dtype=np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        # Slice before resizing: PIL's `box=` argument would let the filter read pixels outside.
        crop = Image.fromarray(np.ascontiguousarray(photo[y0:y1, x0:x1]))
        crops[i] = np.asarray(crop.resize((crop_size, crop_size), Image.Resampling.LANCZOS))
    return crops


def _side_range(name: str, regions: tuple, short_side: int,
                source_crop: tuple[float, float]) -> tuple[int, int]:
    """Crop sides in pixels for one photograph; source_crop is a fraction of its shorter side."""
    lo, hi = (max(1, round(f * short_side)) for f in source_crop)
    room = min(min(r[2] - r[0], r[3] - r[1]) for r in regions)
    if not 0 < source_crop[0] <= source_crop[1] or hi > room:
        raise ValueError(f"source_crop={tuple(source_crop)} gives sides {lo}..{hi} px for {name!r} "
                         f"but its train/test regions only fit {room} px; lower source_crop[1], "
                         f"test_fraction or gap")
    return lo, hi


def build_scenes(crop_size: int = 32, source_crop: tuple[float, float] = (0.08, 0.25),
                 train_per_class: int = 300, test_per_class: int = 100,
                 test_fraction: float = 0.3, gap: int = 16, seed: int = 0) -> dict:
    """Cut the dataset. Crop sides are fractions `source_crop` of each photograph's shorter side.

    Returns {"train_images", "test_images": uint8 (N, crop_size, crop_size, 3),
    "train_labels", "test_labels": int64 (N,), "train_boxes", "test_boxes": int64 (N, 4) source
    squares (x0, y0, x1, y1) in photograph pixels, "classes": list[str]}, grouped by class.
    """
    if not 0 < test_fraction < 1 or gap < 0 or crop_size < 1 or seed < 0:
        raise ValueError(f"need 0 < test_fraction < 1, gap >= 0, crop_size >= 1, seed >= 0; got "
                         f"{test_fraction}, {gap}, {crop_size}, {seed}")
    parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for label, name in enumerate(PHOTOS):
        photo = load_photo(name)  # (H, W, 3)
        regions = split_regions(name, photo.shape, test_fraction, gap)
        x0, y0, x1, y1 = content_box(name, photo.shape)
        sides = _side_range(name, regions, min(x1 - x0, y1 - y0), source_crop)
        for split_index, (split, count) in enumerate((("train", train_per_class),
                                                      ("test", test_per_class))):
            # One stream per (photograph, split): the test crops do not depend on train_per_class.
            rng = np.random.default_rng([seed, label, split_index])
            boxes = _sample_boxes(rng, regions[split_index], count, sides)  # (n, 4)
            labels = np.full(count, label, dtype=np.int64)  # (n,)
            parts[split].append((_render(photo, boxes, crop_size), labels, boxes))
    scenes: dict = {"classes": list(PHOTOS)}
    for split, chunks in parts.items():
        for field, arrays in zip(("images", "labels", "boxes"), zip(*chunks)):
            scenes[f"{split}_{field}"] = np.concatenate(arrays)
    return scenes


_BUILD_SIGNATURE = inspect.signature(build_scenes)


def default_cache_dir() -> Path:
    """$SELFSUP_CACHE_DIR/scenes if that variable is set, else ~/.cache/selfsup/scenes."""
    root = os.environ.get("SELFSUP_CACHE_DIR")
    return Path(root) / "scenes" if root else Path.home() / ".cache" / "selfsup" / "scenes"


def _plain(value):
    """Parameters as JSON-stable values: (0.1, 0.3) and [0.1, 0.3], 32 and np.int64(32) agree."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def cache_path(cache_dir: str | os.PathLike | None = None, **params) -> Path:
    """Where `load_scenes(**params)` keeps its .npz: a hash of every build parameter."""
    bound = _BUILD_SIGNATURE.bind(**params)
    bound.apply_defaults()
    plain = {k: _plain(v) for k, v in bound.arguments.items()}
    key = json.dumps({"format": _FORMAT_VERSION, "skimage": skimage.__version__, "photos": PHOTOS,
                      "params": plain}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / f"scenes-{digest}.npz"


def _write_atomic(path: Path, scenes: dict) -> None:
    """Write to a temporary file beside `path`, then rename: a crash leaves no partial cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **{k: np.asarray(v) for k, v in scenes.items()})
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache dir needs it readable
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as npz:
        scenes = {k: npz[k] for k in npz.files}
    scenes["classes"] = [str(c) for c in scenes["classes"]]
    return scenes


def load_scenes(cache_dir: str | os.PathLike | None = None, **params) -> dict:
    """`build_scenes(**params)`, built once and then read from the cache in `cache_dir`."""
    path = cache_path(cache_dir, **params)
    if path.exists():
        try:
            return _read(path)
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
            # Not written by us (writes are atomic), e.g. a truncated copy: rebuild and replace.
            pass
    scenes = build_scenes(**params)
    _write_atomic(path, scenes)
    return scenes
