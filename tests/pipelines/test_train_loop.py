"""The plain loop, optimisers and schedule, and checkpoints inside epochs, with no Ray."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.backbones import BackboneConfig
from methods.config import build
from methods.simclr import SimCLR, SimCLRConfig
from methods.views import TwoViews
from pipelines import checkpoint as ckpt
from pipelines.optim import LARS, lr_at
from pipelines.train_loop import (TrainConfig, build_optimizer, fit_plain, iterate_views,
                                  plan_run, train_epoch)


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


def test_max_steps_caps_the_run_and_the_schedule_uses_the_capped_total():
    cfg = build(TrainConfig, {"epochs": 3, "batch_size": 64, "max_steps": 6}, "train")
    plan = plan_run(4, cfg)
    assert (plan.epochs, plan.total, plan.epoch_steps(0), plan.epoch_steps(1)) == (2, 6, 4, 2)
    assert plan_run(4, build(TrainConfig, {"epochs": 3, "max_steps": 2}, "train")).warmup_epoch == 2
    assert plan_run(4, build(TrainConfig, {"epochs": 3}, "train")).total == 12
    model, views = tiny_simclr()
    assert [h.steps for h in fit_plain(model, views, digits16(256), cfg)] == [4, 2]


def test_a_resumed_pass_goes_on_from_its_step_and_a_hook_can_end_it():
    model, views = tiny_simclr()
    cfg = build(TrainConfig, {"batch_size": 32, "warmup_epochs": 0, "optimizer": "sgd"}, "train")
    optimizer = build_optimizer(model, cfg)
    seen = []

    def hook(step, lr, loss, metrics) -> bool:
        assert loss.dim() == 0 and not loss.requires_grad
        seen.append((step, lr))
        return step == 20

    def batches():
        return iterate_views(digits16(256), views, 32, torch.Generator().manual_seed(0))

    # 5 of an 8-step epoch were done before a stop: the pass runs the 3 left, lr from step 5 on
    stats = train_epoch(model, optimizer, batches(), cfg, step=5, total_steps=16,
                        steps_per_epoch=8, steps=3, device=torch.device("cpu"), on_step_end=hook)
    assert stats.steps == 3 and [s for s, _ in seen] == [6, 7, 8]
    assert [lr for _, lr in seen] == pytest.approx([lr_at(s, 16, 0, cfg.scaled_lr())
                                                    for s in (5, 6, 7)])
    stats = train_epoch(model, optimizer, batches(), cfg, step=18, total_steps=32,
                        steps_per_epoch=8, device=torch.device("cpu"), on_step_end=hook)
    assert stats.steps == 2  # the hook ended the pass at step 20


def test_a_checkpoint_inside_an_epoch_round_trips_and_old_ones_mean_epoch_complete(tmp_path):
    model, _ = tiny_simclr()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt.save(str(tmp_path / "mid"), model, optimizer, step=120, epoch=2, epoch_step=37,
              build_info={})
    assert ckpt.read_meta(str(tmp_path / "mid"))["epoch_step"] == 37
    assert ckpt.load_train_state(str(tmp_path / "mid"), model, optimizer) == (120, 2, 37)
    ckpt.save(str(tmp_path / "end"), model, optimizer, step=160, epoch=3, build_info={})
    assert ckpt.load_train_state(str(tmp_path / "end"), model, optimizer) == (160, 4, 0)
    assert ckpt.resume_point({"step": 80, "epoch": 1}) == (80, 2, 0)  # from before epoch_step
