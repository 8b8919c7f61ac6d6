"""The six pretext-task methods, one contract for all: views stay batch-aligned, each model
trains, checkpoints, embeds and scores its own task on CPU with no Ray. Their labels, method by
method, are in test_pretext_labels.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import methods
from tests.methods.pretext_common import (BACKBONE, BATCH, EMBED_WIDTH, NAMES, PRETEXT_KEYS, SETUP,
                                          make, views_of)

# tiny tensors gain nothing from threads (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the contract, every method

@pytest.mark.parametrize("images", NAMES, indirect=True)
def test_views_are_batch_aligned_and_images_stay_uint8(request, images):
    name = request.node.callspec.params["images"]
    _, views, _ = make(name)
    batch = views_of(views, images)
    assert batch and all(v.shape[0] == BATCH for v in batch.values())
    for key, value in batch.items():
        if value.dim() >= 4 and value.shape[-3] == 3:
            assert value.dtype == torch.uint8, key
    again = views_of(views, images)
    assert all(torch.equal(batch[k], again[k]) for k in batch), "a seeded generator must repeat"


@pytest.mark.parametrize("images", NAMES, indirect=True)
def test_forward_backward_gives_finite_loss_and_backbone_gradients(request, images):
    model, views, _ = make(request.node.callspec.params["images"])
    loss, metrics = model(views_of(views, images))
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("images", NAMES, indirect=True)
def test_loss_falls_on_a_fixed_batch(request, images):
    model, views, _ = make(request.node.callspec.params["images"])
    batch = views_of(views, images)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses


@pytest.mark.parametrize("images", NAMES, indirect=True)
def test_state_dict_round_trip_gives_identical_outputs(request, images):
    name = request.node.callspec.params["images"]
    model, views, cfg = make(name)
    batch = views_of(views, images)
    model(batch)[0].backward()  # one training forward moves BN statistics (and the colour prior)
    torch.manual_seed(123)  # different initial weights
    fresh = methods.get(name).model(cfg, BACKBONE, SETUP[name][0])
    model.eval(), fresh.eval()
    assert not torch.equal(fresh.embed(images), model.embed(images))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch)[0], model(batch)[0], rtol=0, atol=0)
        torch.testing.assert_close(fresh.embed(images), model.embed(images), rtol=0, atol=0)
        assert fresh.pretext_metrics(batch) == model.pretext_metrics(batch)


@pytest.mark.parametrize("images", NAMES, indirect=True)
def test_embed_pretext_metrics_and_pictures(request, images):
    name = request.node.callspec.params["images"]
    model, views, _ = make(name)
    model.eval()
    features = model.embed(images)
    assert features.shape == (BATCH, EMBED_WIDTH[name]) and torch.isfinite(features).all()
    batch = views_of(views, images)
    scores = model.pretext_metrics(batch)
    assert set(scores) == PRETEXT_KEYS[name]
    assert all(isinstance(v, float) and np.isfinite(v) for v in scores.values())
    for tag, picture in model.log_images(batch).items():
        assert picture.dim() == 4 and picture.shape[1] == 3, tag
        if picture.dtype != torch.uint8:
            assert picture.min() >= 0 and picture.max() <= 1, tag


def test_all_six_are_registered_with_their_paper():
    for name in NAMES:
        assert "arXiv:" in methods.get(name).paper
