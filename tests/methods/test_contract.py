"""The method contract, for every registered method (the timm pattern): a method is tested as soon
as it is registered, at the tiny size its registration declares.

Views on real images, forward/backward on CPU, a loss that falls on a fixed batch, the state_dict
round trip, `on_step` moving exactly what the method declares (and `forward` changing nothing but
BatchNorm statistics), `features`/`embed`, the pretext, collapse and picture hooks.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import methods
from methods.base import SSLMethod
from methods.config import build
from pipelines.optim import make_optimizer
from pipelines.scenes import load_scenes
from tests.methods.contract import make, resized, tiny_size, views_of

NAMES = sorted(methods.METHODS)
BATCH = 8
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> np.ndarray:
    """Real colour images: crops of the photographs bundled with scikit-image, uint8 (8, 32, 32, 3)."""
    data = load_scenes(tmp_path_factory.mktemp("scenes"), crop_size=32, train_per_class=1,
                       test_per_class=1)
    return data["train_images"][:BATCH]


def images_for(name: str, photos: np.ndarray) -> torch.Tensor:
    return resized(photos, tiny_size(name))


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def _restore(model: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for key, value in model.named_buffers():
        value.copy_(buffers[key])


def test_every_method_registers_its_paper_its_defaults_and_a_tiny_config():
    assert NAMES
    for name in NAMES:
        spec = methods.get(name)
        assert issubclass(spec.model, SSLMethod), name
        assert "arXiv:" in spec.paper, name
        assert isinstance(spec.tiny.get("image_size"), int) and "backbone" in spec.tiny, \
            f"{name}: its registration declares no tiny config (tiny={spec.tiny})"
        build(spec.config, {}, "method")  # the paper defaults are a valid config


@pytest.mark.parametrize("name", NAMES)
def test_views_are_batch_aligned_uint8_and_seeded(name, photos):
    _, views, _ = make(name)
    images = images_for(name, photos)
    batch = views_of(views, images)
    assert batch and all(v.shape[0] == BATCH for v in batch.values())
    for key, value in batch.items():
        if value.dim() >= 4 and value.shape[-3] == 3:
            assert value.dtype == torch.uint8, key
    again = views_of(views, images)
    assert all(torch.equal(batch[k], again[k]) for k in batch), "a seeded generator must repeat"
    # images decoded larger than the training size (data.decode_size) give the same shapes
    larger = views_of(views, resized(photos, 2 * tiny_size(name)))
    assert {k: v.shape for k, v in larger.items()} == {k: v.shape for k, v in batch.items()}


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_reaches_every_trainable_parameter(name, photos):
    model, views, _ = make(name)
    loss, metrics = model(views_of(views, images_for(name, photos)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:  # DDP needs a gradient for every trainable parameter
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        else:
            assert p.grad is None, pname
    assert any(float(p.grad.abs().sum()) > 0 for p in model.backbone.parameters()
               if p.grad is not None)


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_on_a_fixed_batch(name, photos):
    """12 Adam steps on one fixed batch with the buffers (queue, centre, schedules, prior) held at
    their initial values, so the task is fixed too (a queue refilled with this batch's own keys
    would turn its positives into negatives); the same random draws before and after."""
    model, views, _ = make(name)
    batch = views_of(views, images_for(name, photos))
    initial = _buffers(model)

    def loss_now() -> float:
        probe = copy.deepcopy(model)
        _restore(probe, initial)
        torch.manual_seed(123)
        with torch.no_grad():
            return float(probe(batch)[0])

    before = loss_now()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(12):
        _restore(model, initial)
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.on_step(step, 12)
    after = loss_now()
    assert math.isfinite(after) and after < before, (before, after)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_gives_identical_outputs(name, photos):
    model, views, cfg = make(name)
    images = images_for(name, photos)
    batch = views_of(views, images)
    loss, _ = model(batch)
    loss.backward()
    model.on_step(0, 10)  # queues, centres and priors move
    fresh, _, _ = make(name, seed=1)
    model.eval(), fresh.eval()
    assert not torch.equal(fresh.embed(images), model.embed(images))
    fresh.load_state_dict(model.state_dict())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.manual_seed(5)
        loss_a = model(batch)[0]
        torch.manual_seed(5)
        torch.testing.assert_close(fresh(batch)[0], loss_a, rtol=0, atol=0)
        torch.testing.assert_close(fresh.embed(images), model.embed(images), rtol=0, atol=0)
        assert fresh.pretext_metrics(batch) == model.pretext_metrics(batch)


@pytest.mark.parametrize("name", NAMES)
def test_on_step_moves_what_it_declares_and_forward_changes_no_state(name, photos):
    model, views, _ = make(name)
    batch = views_of(views, images_for(name, photos))
    before = _buffers(model)
    loss, _ = model(batch)
    for key, value in model.named_buffers():
        if not key.endswith(BN_STATS):
            assert torch.equal(value, before[key]), f"forward changed {key}: belongs in on_step"
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    buffers = _buffers(model)
    targets = {id(p) for target, _ in model.momentum_pairs() for p in target.parameters()}
    pairs = [(t, o, [p.detach().clone() for p in t.parameters()])
             for t, o in model.momentum_pairs()]
    model.on_step(0, 10)
    for target, online, old in pairs:  # EMA: strictly towards the online twin, no gradients
        new = list(target.parameters())
        gap_before = sum(float((t - o).norm()) for t, o in zip(old, online.parameters()))
        gap_after = sum(float((t - o).norm()) for t, o in zip(new, online.parameters()))
        assert gap_after < gap_before and not any(p.requires_grad for p in new)
    for key, p in model.named_parameters():
        if id(p) not in targets:
            assert torch.equal(p, params[key]), f"on_step changed the online parameter {key}"
    for key in model.step_buffers():
        assert not torch.equal(model.get_buffer(key), buffers[key]), f"on_step left {key}"
    assert not model.pending, "on_step must use up what forward left it"


@pytest.mark.parametrize("name", NAMES)
def test_momentum_targets_are_never_optimised(name):
    model, _, _ = make(name)
    optimised = {id(p) for g in make_optimizer(model, "sgd", 0.1, 0.0, 0.9).param_groups
                 for p in g["params"]}
    for target, _ in model.momentum_pairs():
        assert not any(id(p) in optimised for p in target.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_features_carry_gradients_and_embed_does_not(name, photos):
    model, _, _ = make(name)
    model.eval()
    images = images_for(name, photos)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    embedded = model.embed(images)
    assert embedded.ndim == 2 and embedded.shape[0] == BATCH and embedded.dtype == torch.float32
    assert torch.isfinite(embedded).all() and not embedded.requires_grad
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    torch.testing.assert_close(model.embed(images[:2]), embedded[:2], rtol=1e-4, atol=1e-5)
    model.requires_grad_(True)  # as fine-tuning does: momentum copies (DINO's teacher) too
    features = model.features(images)  # what fine-tuning trains through
    torch.testing.assert_close(features.detach(), embedded)
    features.sum().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_pretext_collapse_and_picture_hooks(name, photos):
    model, views, _ = make(name)
    model.eval()
    batch = views_of(views, images_for(name, photos))
    scores = model.pretext_metrics(batch)
    assert bool(scores) == model.has_pretext_task()
    assert all(isinstance(v, float) and np.isfinite(v) for v in scores.values())
    assert model.collapse({}) is None
    pictures = model.log_images(batch)
    assert pictures
    for tag, picture in pictures.items():
        assert picture.dim() == 4 and picture.shape[1] == 3, tag
        if picture.dtype != torch.uint8:
            assert picture.min() >= 0 and picture.max() <= 1, tag
