"""One suite over moco_v1, moco_v2, moco_v3, cpc, dino and mae: views on real digits,
forward/backward, a loss that falls on a fixed batch, state_dict round trip, embed shape.

Tiny sizes keep every test fast: 16 px digits, resnet_small of width 4, and a 2-block, 32-wide
ViT registered for the test (`vit_test`) that runs the same code as vit_tiny.
"""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import methods
from methods.backbones import BACKBONES, BackboneConfig
from methods.config import build
from methods.vit import ViT

SIZE = 16
BATCH = 8
TINY = {
    "moco_v1": ({"queue_size": 16, "proj_dim": 8}, "resnet_small"),
    "moco_v2": ({"queue_size": 16, "proj_hidden_dim": 16, "proj_dim": 8}, "resnet_small"),
    "moco_v3": ({"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16}, "vit_test"),
    "cpc": ({"grid": 3, "steps": 2, "context_layers": 1}, "resnet_small"),
    "dino": ({"out_dim": 16, "head_hidden_dim": 16, "bottleneck_dim": 8, "n_local": 2,
              "local_size": 8, "freeze_last_layer_frac": 0.0}, "vit_test"),
    "mae": ({"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}, "vit_test"),
}
VIEW_SHAPES = {
    "moco_v1": {"view1": SIZE, "view2": SIZE}, "moco_v2": {"view1": SIZE, "view2": SIZE},
    "moco_v3": {"view1": SIZE, "view2": SIZE}, "cpc": {"view": SIZE}, "mae": {"view": SIZE},
    "dino": {"global0": SIZE, "global1": SIZE, "local0": 8, "local1": 8},
}
NAMES = sorted(TINY)


@pytest.fixture(autouse=True)
def vit_test(monkeypatch):
    monkeypatch.setitem(BACKBONES, "vit_test",
                        lambda cfg, size: (ViT(size, cfg.patch_size, 32, 2, 2), 32))


def make(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    cfg, backbone = TINY[name]
    spec = methods.get(name)
    torch.manual_seed(seed)
    return spec.model(build(spec.config, {**cfg, **overrides}, "method"),
                      BackboneConfig(name=backbone, width=4, patch_size=4), SIZE)


def views(name: str, images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    spec = methods.get(name)
    fn = spec.views(build(spec.config, TINY[name][0], "method"), SIZE)
    return fn(images, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """The first BATCH scikit-learn digits, upscaled to 16 px RGB: uint8 (B, 3, 16, 16)."""
    images = torch.from_numpy(load_digits().images[:BATCH].astype(np.float32) / 16.0)
    images = F.interpolate(images[:, None], size=SIZE, mode="bilinear", align_corners=False)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)


def test_every_method_of_this_issue_is_registered_with_its_paper():
    for name in NAMES:
        spec = methods.get(name)
        assert "arXiv:" in spec.paper
        build(spec.config, {}, "method")  # the paper defaults are a valid config


def test_paper_defaults():
    get = lambda name: build(methods.get(name).config, {}, "method")  # noqa: E731
    v1, v2, v3, dino, mae = (get(n) for n in ("moco_v1", "moco_v2", "moco_v3", "dino", "mae"))
    assert (v1.queue_size, v1.momentum, v1.temperature, v1.mlp_head) == (65536, 0.999, 0.07, False)
    assert (v2.temperature, v2.mlp_head, v2.aug.blur_p) == (0.2, True, 0.5)
    assert (v3.temperature, v3.base_momentum, v3.proj_layers) == (0.2, 0.99, 3)
    assert (dino.student_temp, dino.center_momentum, dino.base_momentum) == (0.1, 0.9, 0.996)
    assert (dino.warmup_teacher_temp, dino.teacher_temp) == (0.04, 0.07)
    assert (mae.mask_ratio, mae.decoder_depth, mae.decoder_dim) == (0.75, 8, 512)
    assert mae.norm_pix


@pytest.mark.parametrize("name", NAMES)
def test_views_on_real_digits(name, digits):
    out = views(name, digits)
    assert set(out) == set(VIEW_SHAPES[name])
    for key, side in VIEW_SHAPES[name].items():
        assert out[key].dtype == torch.uint8 and out[key].shape == (BATCH, 3, side, side)
    again, other = views(name, digits, seed=0), views(name, digits, seed=1)
    assert all(torch.equal(out[k], again[k]) for k in out)
    assert any(not torch.equal(out[k], other[k]) for k in out)


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_reaches_every_trainable_parameter(name, digits):
    model = make(name)
    loss, metrics = model(views(name, digits))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:  # DDP needs a gradient for every trainable parameter
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        else:
            assert p.grad is None, pname


def _restore_buffers(model: torch.nn.Module, initial: dict[str, torch.Tensor]) -> None:
    for name, buf in model.named_buffers():
        if name in initial:
            buf.copy_(initial[name])


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_on_a_fixed_batch(name, digits):
    """Train 12 steps on one fixed batch with the buffers (queue, centre, schedules) held at their
    initial values, so the negatives are fixed too: a queue refilled with this batch's own keys
    would make its positives into negatives. Same mask draws before and after."""
    model, batch = make(name), views(name, digits)
    initial = {k: v.clone() for k, v in model.named_buffers()}

    def loss_now() -> float:
        probe = copy.deepcopy(model)
        _restore_buffers(probe, initial)
        torch.manual_seed(123)
        with torch.no_grad():
            return float(probe(batch)[0])

    before = loss_now()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(12):
        _restore_buffers(model, initial)
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.on_step(step, 12)
    assert loss_now() < before


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name, digits):
    model, batch = make(name), views(name, digits)
    loss, _ = model(batch)  # queues and centres move
    loss.backward()
    model.on_step(0, 10)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = make(name, seed=1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    torch.manual_seed(5)
    loss_a = model(batch)[0]
    torch.manual_seed(5)
    loss_b = fresh(batch)[0]
    torch.testing.assert_close(loss_a, loss_b)
    model.eval(), fresh.eval()
    torch.testing.assert_close(model.embed(digits), fresh.embed(digits))


@pytest.mark.parametrize("name", NAMES)
def test_embed_gives_one_feature_vector_per_image(name, digits):
    model = make(name).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    features = model.embed(digits)
    assert features.shape == (BATCH, 32)  # vit_test is 32 wide; resnet_small of width 4: 8 * 4
    assert features.dtype == torch.float32
    assert torch.isfinite(features).all() and not features.requires_grad
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    torch.testing.assert_close(model.embed(digits[:2]), features[:2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_log_images_are_displayable(name, digits):
    pictures = make(name).log_images(views(name, digits))
    assert pictures
    for image in pictures.values():
        assert image.ndim == 4 and image.shape[1] == 3
        if image.is_floating_point():
            assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
