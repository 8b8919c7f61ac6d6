"""The plain loop, optimisers and schedule, with no Ray."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.backbones import BackboneConfig
from methods.config import build
from methods.simclr import SimCLR, SimCLRConfig
from methods.views import TwoViews
from pipelines.optim import LARS, lr_at
from pipelines.train_loop import TrainConfig, fit_plain


def tiny_simclr():
    cfg = build(SimCLRConfig, {"proj_hidden_dim": 32, "proj_dim": 16}, "method")
    return SimCLR(cfg, BackboneConfig(width=8), 16), TwoViews(cfg.aug, 16)


def digits16(n=256):
    from sklearn.datasets import load_digits
    d = load_digits().images[:n]
    x = torch.from_numpy(np.round(d / 16 * 255).astype(np.uint8)).float()[:, None]
    x = torch.nn.functional.interpolate(x, size=16, mode="bilinear").round().clamp(0, 255)
    return x.byte().repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()  # (n, 16, 16, 3)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 100, 10, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)  # cosine midpoint


def test_lars_step_matches_the_trust_ratio_rule():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([0.6, 0.8])
    LARS([{"params": [w], "weight_decay": 0.0}], lr=1.0, momentum=0.9, eta=0.001).step()
    trust = 0.001 * 5.0 / 1.0
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - trust * torch.tensor([0.6, 0.8]))


def test_lars_skips_adaptation_for_excluded_groups():
    b = torch.nn.Parameter(torch.tensor([1.0]))
    b.grad = torch.tensor([0.5])
    LARS([{"params": [b], "weight_decay": 0.0, "lars": False}], lr=0.1, momentum=0.0).step()
    assert b.item() == pytest.approx(1.0 - 0.05)


def test_fit_plain_lowers_simclr_loss():
    torch.manual_seed(0)
    model, views = tiny_simclr()
    cfg = build(TrainConfig, {"epochs": 6, "batch_size": 64, "optimizer": "adamw", "lr": 0.01,
                              "warmup_epochs": 0, "weight_decay": 0.0}, "train")
    history = fit_plain(model, views, digits16(256), cfg)
    assert len(history) == 6 and all(h.steps == 4 for h in history)
    assert all(math.isfinite(h.loss) for h in history)
    assert history[-1].loss < history[0].loss - 0.05


def test_channels_last_and_bf16_run_on_cpu():
    model, views = tiny_simclr()
    cfg = build(TrainConfig, {"epochs": 1, "batch_size": 32, "channels_last": True,
                              "precision": "bf16"}, "train")
    history = fit_plain(model, views, digits16(64), cfg)
    assert math.isfinite(history[0].loss) and history[0].steps == 2
