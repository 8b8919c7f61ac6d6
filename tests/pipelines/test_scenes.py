"""The embedded colour dataset `scenes`: content, disjoint train/test regions, seeding, cache."""
import socket
from pathlib import Path

import numpy as np
import pytest
from skimage.transform import resize

from pipelines import scenes
from pipelines.scenes import (build_scenes, cache_path, content_box, default_cache_dir,
                              load_photo, load_scenes, split_regions)

SMALL = {"crop_size": 16, "train_per_class": 6, "test_per_class": 4}


@pytest.fixture(scope="module")
def small():
    return build_scenes(**SMALL)


@pytest.fixture(scope="module")
def photos():
    return {name: load_photo(name) for name in scenes.PHOTOS}


def test_classes_are_distinct_colour_photographs(photos):
    assert len(photos) >= 6
    for name, photo in photos.items():
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3, name
        rgb = photo.astype(np.float32)
        assert np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean() > 3.0, f"{name} is grey"
    means = np.stack([p.reshape(-1, 3).mean(0) for p in photos.values()])  # (C, 3)
    gaps = np.abs(means[:, None] - means[None]).sum(-1) + np.eye(len(means)) * 1e9
    assert gaps.min() > 1.0  # no photograph twice (e.g. both motorcycle stereo views)


def test_no_network_is_touched(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("scenes tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert len(build_scenes(crop_size=8, train_per_class=1, test_per_class=1)["classes"]) >= 6


def test_shapes_dtypes_and_labels(small):
    classes = small["classes"]
    assert len(classes) >= 6 and len(set(classes)) == len(classes)
    assert all(isinstance(c, str) for c in classes)
    for split, per_class in (("train", 6), ("test", 4)):
        images, labels, boxes = (small[f"{split}_{k}"] for k in ("images", "labels", "boxes"))
        n = per_class * len(classes)
        assert images.shape == (n, 16, 16, 3) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert boxes.shape == (n, 4) and boxes.dtype == np.int64
        np.testing.assert_array_equal(np.bincount(labels), [per_class] * len(classes))


def test_each_crop_is_its_box_resized(small, photos):
    for split in ("train", "test"):
        rows = zip(small[f"{split}_images"], small[f"{split}_labels"], small[f"{split}_boxes"])
        for image, label, box in rows:
            x0, y0, x1, y1 = box
            source = photos[small["classes"][label]][y0:y1, x0:x1]
            expected = resize(source, (16, 16), anti_aliasing=True, preserve_range=True)
            assert np.abs(image - expected).mean() < 8.0  # a different antialiasing filter


def test_boxes_are_squares_of_several_sizes_inside_the_photograph(photos):
    result = build_scenes(crop_size=16, train_per_class=30, test_per_class=10)
    for split in ("train", "test"):
        boxes, labels = result[f"{split}_boxes"], result[f"{split}_labels"]
        side = boxes[:, 2] - boxes[:, 0]
        np.testing.assert_array_equal(side, boxes[:, 3] - boxes[:, 1])
        for label, name in enumerate(result["classes"]):
            h, w, _ = photos[name].shape
            own = boxes[labels == label]
            assert (own[:, :2] >= 0).all() and (own[:, 2] <= w).all() and (own[:, 3] <= h).all()
            x0, y0, x1, y1 = content_box(name, photos[name].shape)
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert (own[:, 0] >= x0).all() and (own[:, 1] >= y0).all()
            assert (own[:, 2] <= x1).all() and (own[:, 3] <= y1).all()
            short = min(x1 - x0, y1 - y0)
            sides = own[:, 2] - own[:, 0]
            assert sides.min() >= round(0.08 * short) and sides.max() <= round(0.25 * short)
            assert len(np.unique(sides)) >= 3, f"{name}: crops should vary in scale"


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("test_fraction, gap", [(0.3, 16), (0.45, 0)])
def test_train_and_test_boxes_never_overlap(test_fraction, gap):
    result = build_scenes(crop_size=8, train_per_class=25, test_per_class=15,
                          test_fraction=test_fraction, gap=gap, seed=3)
    for label in range(len(result["classes"])):
        train = result["train_boxes"][result["train_labels"] == label]
        test = result["test_boxes"][result["test_labels"] == label]
        assert not any(_overlap(a, b) for a in train.tolist() for b in test.tolist())
        assert train[:, 2].max() + gap <= test[:, 0].min()


def test_split_regions_follow_test_fraction_and_gap():
    train, test = split_regions("chelsea", (300, 451, 3), test_fraction=0.3, gap=16)
    assert test == (451 - 135, 0, 451, 300)
    assert train == (0, 0, 451 - 135 - 16, 300)


def test_same_seed_reproduces_and_other_seed_differs(small):
    again = build_scenes(**SMALL)
    for key in small:
        np.testing.assert_array_equal(small[key], again[key])
    other = build_scenes(**SMALL, seed=1)
    assert not np.array_equal(small["train_boxes"], other["train_boxes"])
    assert not np.array_equal(small["test_images"], other["test_images"])


def test_test_crops_do_not_depend_on_train_size(small):
    bigger = build_scenes(**{**SMALL, "train_per_class": 9})
    np.testing.assert_array_equal(bigger["test_images"], small["test_images"])


def test_source_crop_too_large_for_a_region_is_an_error():
    with pytest.raises(ValueError, match="source_crop"):
        build_scenes(source_crop=(0.2, 0.6), train_per_class=1, test_per_class=1)


def test_cache_is_reused_and_rebuilt_when_parameters_change(tmp_path, monkeypatch):
    calls = []
    real_build = scenes.build_scenes

    def counting_build(**params):
        calls.append(params)
        return real_build(**params)
    monkeypatch.setattr(scenes, "build_scenes", counting_build)

    first = load_scenes(cache_dir=tmp_path, **SMALL)
    path = cache_path(tmp_path, **SMALL)
    assert path.exists() and len(calls) == 1
    mtime = path.stat().st_mtime_ns
    second = load_scenes(cache_dir=tmp_path, **SMALL)
    assert len(calls) == 1 and path.stat().st_mtime_ns == mtime
    assert second["classes"] == first["classes"]
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])

    load_scenes(cache_dir=tmp_path, **{**SMALL, "seed": 5})
    assert len(calls) == 2 and len(list(tmp_path.glob("*.npz"))) == 2


def test_cache_key_covers_every_parameter_and_ignores_spelling(tmp_path):
    base = cache_path(tmp_path)
    assert base == cache_path(tmp_path, crop_size=np.int64(32), source_crop=[0.08, 0.25])
    changes = {"crop_size": 16, "source_crop": (0.1, 0.25), "train_per_class": 7,
               "test_per_class": 7, "test_fraction": 0.25, "gap": 4, "seed": 1}
    paths = {cache_path(tmp_path, **{name: value}) for name, value in changes.items()}
    assert base not in paths and len(paths) == len(changes)
    with pytest.raises(TypeError):
        cache_path(tmp_path, crop_sise=16)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def crash(file, **arrays):
        file.write(b"PK half a zip")
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez_compressed", crash)
    with pytest.raises(KeyboardInterrupt):
        load_scenes(cache_dir=tmp_path, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_cache_is_rebuilt(tmp_path):
    path = cache_path(tmp_path, **SMALL)
    path.write_bytes(b"not a zip")
    result = load_scenes(cache_dir=tmp_path, **SMALL)
    assert result["train_images"].shape == (6 * len(result["classes"]), 16, 16, 3)
    np.testing.assert_array_equal(np.load(path)["train_images"], result["train_images"])


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFSUP_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "scenes"
    monkeypatch.delenv("SELFSUP_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == Path(tmp_path / "home" / ".cache" / "selfsup" / "scenes")
