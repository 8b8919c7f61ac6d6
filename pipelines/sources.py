"""Image sources: what a `data.source` names, checked cheaply before Ray starts.

`digits`              scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)
`scenes`              labeled crops of scikit-image's bundled colour photographs (pipelines/scenes.py)
`folder:LOCATION`     one sub-folder per class, or a flat folder of unlabeled images
`parquet:LOCATION`    a Parquet file or a folder of them: an image-bytes column, optionally a label
`webdataset:LOCATION` a .tar shard or a folder of them (WebDataset: members `KEY.jpg`, `KEY.cls`)

LOCATION is a local path or a `file://`, `s3://` or `gs://` URI (pipelines/uri.py). Two levels of
checking: `parse_source` is syntax only (runs anywhere, e.g. on a laptop submitting to a cluster);
`inspect_source` looks at the top of the source (a folder's first level, one Parquet footer, one
tar header), never the whole of it, so it is cheap at any size. The full listing runs in Ray tasks
(pipelines/listing.py).
"""
from __future__ import annotations

import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from methods.config import ConfigError
from pipelines import uri

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm"}
EMBEDDED = ("digits", "scenes")
FILE_KINDS = ("folder", "parquet", "webdataset")
# WebDataset: the member holding a sample's class (its convention: an integer as text)
WDS_LABEL = "cls"


@dataclass
class SourceInfo:
    """What a source holds. Embedded sources carry their (decoded) arrays; file sources a location."""
    kind: str                                 # digits | scenes | folder | parquet | webdataset
    location: str = ""                        # absolute path or URI
    labeled: bool = True
    classes: list[str] = field(default_factory=list)  # embedded and folder; else from the listing
    arrays: dict = field(default_factory=dict)        # embedded: images/labels (+ fixed split)


def parse_source(spec: str, key: str) -> tuple[str, str]:
    """(kind, normalised location) of a source spec; syntax only, nothing is opened."""
    kind, _, location = spec.partition(":")
    if kind in EMBEDDED and not location:
        return kind, ""
    if kind in FILE_KINDS and location:
        return kind, uri.normalize(location, key)
    raise ConfigError(f"{key}: {spec!r} is not a source; use one of digits, scenes, "
                      f"folder:LOCATION, parquet:LOCATION, webdataset:LOCATION (a path or a "
                      f"file://, s3:// or gs:// URI)")


def _opt(data: Any, name: str, default: Any) -> Any:
    return getattr(data, name, default) if data is not None else default


def inspect_source(spec: str, key: str = "data.source", data: Any = None, *,
                   load_arrays: bool = False, scenes_args: dict | None = None) -> SourceInfo:
    """Check the source named by `spec` exists and say whether it is labeled; ConfigError names
    `key`. `data` is the DataConfig (columns, endpoint); `load_arrays` loads embedded data."""
    kind, location = parse_source(spec, key)
    if kind in EMBEDDED:
        info = SourceInfo(kind=kind)
        if load_arrays:
            info.arrays = load_digits() if kind == "digits" else _load_scenes(scenes_args or {})
            info.classes = info.arrays["classes"]
        return info
    fs, path = uri.filesystem(location, _opt(data, "endpoint_url", None))
    try:
        if kind == "folder":
            return _inspect_folder(fs, path, location, key)
        if kind == "parquet":
            return _inspect_parquet(fs, path, location, key, _opt(data, "image_column", "image"),
                                    _opt(data, "label_column", "label"))
        return _inspect_webdataset(fs, path, location, key)
    except OSError as e:  # permissions, credentials, an unreachable endpoint
        raise ConfigError(f"{key}: cannot read {location}: {e}") from None


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


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _children(fs, path: str, location: str, key: str, what: str):
    import pyarrow.fs as pafs
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise ConfigError(f"{key}: {what} {location} does not exist")
    return fs.get_file_info(pafs.FileSelector(path, recursive=False))


def _inspect_folder(fs, path: str, location: str, key: str) -> SourceInfo:
    import pyarrow.fs as pafs
    entries = _children(fs, path, location, key, "folder")
    top_files = [e.base_name for e in entries
                 if e.type == pafs.FileType.File and is_image_name(e.base_name)]
    class_dirs = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory
                        and not e.base_name.startswith("."))
    if top_files and class_dirs:
        raise ConfigError(f"{key}: {location} has images at its top level and class sub-folders "
                          f"{class_dirs[:3]}; move the top-level images into a class folder")
    if not top_files and not class_dirs:
        raise ConfigError(f"{key}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) and no "
                          f"class sub-folders in {location}")
    return SourceInfo(kind="folder", location=location, labeled=bool(class_dirs),
                      classes=class_dirs)


def data_files(fs, path: str, location: str, key: str, suffix: str) -> list[str]:
    """The files of a source: `path` itself, or the `suffix` files under it (sorted, recursive)."""
    import pyarrow.fs as pafs
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type != pafs.FileType.Directory:
        raise ConfigError(f"{key}: {location} does not exist")
    files = sorted(e.path for e in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if e.type == pafs.FileType.File and e.path.endswith(suffix)
                   and not os.path.basename(e.path).startswith((".", "_")))
    if not files:
        raise ConfigError(f"{key}: no {suffix} files under {location}")
    return files


def _first_file(fs, path: str, location: str, key: str, suffix: str) -> str:
    """One `suffix` file of the source, found without listing all of it."""
    import pyarrow.fs as pafs
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return path
    for entry in sorted(_children(fs, path, location, key, "folder"), key=lambda e: e.path):
        if entry.type == pafs.FileType.File and entry.path.endswith(suffix):
            return entry.path
        if entry.type == pafs.FileType.Directory and not entry.base_name.startswith((".", "_")):
            found = data_files(fs, entry.path, location, key, suffix)
            return found[0]
    raise ConfigError(f"{key}: no {suffix} files under {location}")


def _inspect_parquet(fs, path: str, location: str, key: str, image_column: str,
                     label_column: str) -> SourceInfo:
    import pyarrow.parquet as pq
    first = _first_file(fs, path, location, key, ".parquet")
    with fs.open_input_file(first) as f:
        names = pq.read_schema(f).names
    if image_column not in names:
        raise ConfigError(f"data.image_column: {image_column!r} is not a column of {location}; "
                          f"its columns: {', '.join(names)}")
    return SourceInfo(kind="parquet", location=location, labeled=label_column in names)


def wds_member(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name into (sample key, extension): the key runs to the
    first dot of the file name, so `a/b.seg.png` is sample `a/b`, member `seg.png`."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def _inspect_webdataset(fs, path: str, location: str, key: str) -> SourceInfo:
    first = _first_file(fs, path, location, key, ".tar")
    members: set[str] = set()
    with fs.open_input_stream(first) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        sample = None
        for member in tar:
            stem, ext = wds_member(member.name)
            if sample is not None and stem != sample:
                break
            sample = stem
            members.add(ext)
    if not any(f".{m}" in IMAGE_EXTENSIONS for m in members):
        raise ConfigError(f"{key}: the first sample of {first} has no image member (members: "
                          f"{sorted(members)}; expected one of {sorted(IMAGE_EXTENSIONS)})")
    return SourceInfo(kind="webdataset", location=location, labeled=WDS_LABEL in members)
