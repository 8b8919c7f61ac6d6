"""Fixtures shared by the methods tests: real images at each method's tiny size, digits or the
scenes photographs for the colour methods."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from pipelines.scenes import load_scenes
from tests.methods.contract import resized
from tests.methods.pretext_common import BATCH, COLOUR, tiny_size


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared machine idle threads spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    d = load_digits()
    gray = (d.images[:BATCH] * 255 / 16).round().astype(np.uint8)  # (B, 8, 8)
    return np.repeat(gray[..., None], 3, axis=3)  # (B, 8, 8, 3)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> np.ndarray:
    data = load_scenes(tmp_path_factory.mktemp("scenes"), crop_size=32, train_per_class=2,
                       test_per_class=1)
    return data["train_images"]  # (16, 32, 32, 3), two crops of each photograph


@pytest.fixture
def images(request, digits, scenes):
    """Real images for `request.param` (a method name) at its test size."""
    return resized(scenes if request.param in COLOUR else digits, tiny_size(request.param))
