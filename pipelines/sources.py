"""Image sources: where images come from, before Ray reads them.

`digits`        scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)
`scenes`        labeled crops of scikit-image's bundled colour photographs (pipelines/scenes.py)
`folder:PATH`   one sub-folder per class, or a flat folder of unlabeled images
`parquet:PATH`  a file or folder of Parquet with an image-bytes column and an optional label column

Everything here runs in the driver without Ray, so a bad source fails before any resource is
asked for: `inspect_source` lists what a source holds and whether it is labeled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from methods.config import ConfigError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm"}
EMBEDDED = ("digits", "scenes")


@dataclass
class SourceInfo:
    """What a source holds. Embedded sources carry their (decoded) arrays; file sources paths."""
    kind: str                                 # digits | scenes | folder | parquet
    path: str = ""
    labeled: bool = True
    classes: list[str] = field(default_factory=list)
    items: list[dict] = field(default_factory=list)   # folder: {"key", "label", "path"}
    arrays: dict = field(default_factory=dict)        # embedded: images/labels (+ fixed split)


def parse_source(spec: str, key: str) -> tuple[str, str]:
    kind, _, path = spec.partition(":")
    if kind in EMBEDDED and not path:
        return kind, ""
    if kind in ("folder", "parquet") and path:
        return kind, os.path.abspath(os.path.expanduser(path))
    raise ConfigError(f"{key}: {spec!r} is not a source; use one of digits, scenes, folder:PATH, "
                      f"parquet:PATH")


def inspect_source(spec: str, key: str = "data.source", *, image_column: str = "image",
                   label_column: str = "label", load_arrays: bool = False,
                   scenes_args: dict | None = None) -> SourceInfo:
    """List the source named by `spec`; raise ConfigError naming `key` if it cannot be used."""
    kind, path = parse_source(spec, key)
    if kind == "folder":
        return _inspect_folder(path, key)
    if kind == "parquet":
        return _inspect_parquet(path, key, image_column, label_column)
    info = SourceInfo(kind=kind)
    if load_arrays:
        info.arrays = load_digits() if kind == "digits" else _load_scenes(scenes_args or {})
        info.classes = info.arrays["classes"]
    return info


def load_digits() -> dict:
    """scikit-learn's digits as uint8 (N, 8, 8) grayscale in [0, 255] with labels."""
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    images = np.round(d.images / 16.0 * 255.0).astype(np.uint8)  # (N, 8, 8), values 0..16 -> 0..255
    return {"images": images, "labels": d.target.astype(np.int64),
            "classes": [str(c) for c in d.target_names]}


def _load_scenes(args: dict) -> dict:
    from pipelines.scenes import load_scenes
    s = load_scenes(**args)
    return {"train_images": s["train_images"], "train_labels": s["train_labels"],
            "test_images": s["test_images"], "test_labels": s["test_labels"],
            "classes": list(s["classes"])}


def _inspect_folder(path: str, key: str) -> SourceInfo:
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: folder {path} does not exist")
    entries = sorted(os.listdir(path))
    top_files = [e for e in entries if _is_image(os.path.join(path, e))]
    class_dirs = [e for e in entries if os.path.isdir(os.path.join(path, e))
                  and not e.startswith(".")]
    if top_files and class_dirs:
        raise ConfigError(f"{key}: {path} has images at its top level and class sub-folders "
                          f"{class_dirs[:3]}; move the top-level images into a class folder")
    if top_files:
        items = [{"key": f, "label": -1, "path": os.path.join(path, f)} for f in top_files]
        return SourceInfo(kind="folder", path=path, labeled=False, items=items)
    items = []
    for label, cls in enumerate(class_dirs):
        for root, dirs, files in os.walk(os.path.join(path, cls)):
            dirs.sort()
            for f in sorted(files):
                full = os.path.join(root, f)
                if _is_image(full):
                    items.append({"key": os.path.relpath(full, path), "label": label, "path": full})
    if not items:
        raise ConfigError(f"{key}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {path}")
    return SourceInfo(kind="folder", path=path, labeled=True, classes=class_dirs, items=items)


def _is_image(path: str) -> bool:
    return os.path.isfile(path) and os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _inspect_parquet(path: str, key: str, image_column: str, label_column: str) -> SourceInfo:
    import pyarrow.dataset as pads
    if not os.path.exists(path):
        raise ConfigError(f"{key}: {path} does not exist")
    names = pads.dataset(path, format="parquet").schema.names
    if image_column not in names:
        raise ConfigError(f"data.image_column: {image_column!r} is not a column of {path}; "
                          f"its columns: {', '.join(names)}")
    labeled = label_column in names
    classes = parquet_classes(path, label_column) if labeled else []
    return SourceInfo(kind="parquet", path=path, labeled=labeled, classes=[str(c) for c in classes])


def parquet_classes(path: str, label_column: str) -> list:
    """Sorted distinct labels of a Parquet source (read from the label column only)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    column = pads.dataset(path, format="parquet").to_table(columns=[label_column]).column(0)
    return sorted(v for v in pc.unique(column).to_pylist() if v is not None)
