"""Shared set-up of the pretext-method label tests (test_pretext_labels.py): how many images, and
which methods see colour photographs. Every model is built at the tiny size its registration
declares (tests/methods/contract.py)."""
from __future__ import annotations

from tests.methods.contract import make, tiny_backbone, tiny_size, views_of  # noqa: F401

BATCH = 16
COLOUR = {"colorization", "split_brain"}
