"""Decoding normalises every mode and size, and a bad file fails alone."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.decode import ImageDecodeError, decode_batch, decode_one
from tests.pipelines.images import BROKEN, awkward_images


@pytest.mark.parametrize("name", [n for n in awkward_images() if n not in BROKEN])
def test_every_good_image_becomes_rgb_square(name):
    out = decode_one(awkward_images()[name], 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_grayscale_is_replicated_to_three_channels():
    out = decode_one(awkward_images()["gray.png"], 16)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_transparent_pixels_become_black():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert decode_one(buf.getvalue(), 8).max() == 0


@pytest.mark.parametrize("name", BROKEN)
def test_broken_files_raise(name):
    with pytest.raises(Exception):
        decode_one(awkward_images()[name], 16)


def test_batch_keeps_good_images_and_marks_bad():
    files = awkward_images()
    batch = {"bytes": list(files.values()), "key": np.array(list(files)),
             "label": np.zeros(len(files), dtype=np.int64)}
    out = decode_batch(batch, size=8, strict=False)
    bad = {k for k, ok in zip(out["key"], out["ok"]) if not ok}
    assert bad == set(BROKEN)
    good_rows = out["image"][out["ok"]]
    assert good_rows.shape == (len(files) - 2, 8, 8, 3) and good_rows.any(axis=(1, 2, 3)).all()


def test_strict_mode_names_the_file():
    files = awkward_images()
    batch = {"bytes": [files["rgb.png"], files["corrupt.png"]], "key": np.array(["a", "x/corrupt.png"]),
             "label": np.zeros(2, dtype=np.int64)}
    with pytest.raises(ImageDecodeError, match="x/corrupt.png"):
        decode_batch(batch, size=8, strict=True)
