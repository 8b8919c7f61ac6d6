"""methods/momentum.py and the methods' on_step: the EMA rule, schedules, the key queue."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import methods
from methods.momentum import (KeyQueue, cosine_momentum, ema_update_, momentum_copy,
                              warmup_value)
from tests.methods.contract import make


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_momentum_copy_is_a_frozen_equal_copy():
    online = _net(0)
    target = momentum_copy(online)
    for p_t, p_o in zip(target.parameters(), online.parameters()):
        assert torch.equal(p_t, p_o) and p_t.data_ptr() != p_o.data_ptr()
        assert not p_t.requires_grad and p_o.requires_grad


def test_ema_update_follows_the_rule_on_parameters_and_leaves_buffers():
    target, online = _net(0), _net(1)
    target.requires_grad_(False)
    online[1].running_mean.fill_(3.0)
    before = [p.clone() for p in target.parameters()]
    buffers = [b.clone() for b in target.buffers()]
    ema_update_(target, online, 0.9)
    for new, old, o in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * o.detach(), rtol=1e-6, atol=1e-7)
    assert all(torch.equal(b, old) for b, old in zip(target.buffers(), buffers))


def test_ema_update_rejects_mismatched_modules():
    with pytest.raises(ValueError, match="matching"):
        ema_update_(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.9)


def test_cosine_momentum_at_known_steps():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    quarter = 1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2
    assert cosine_momentum(25, 100, 0.996) == pytest.approx(quarter)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(150, 100, 0.99) == pytest.approx(1.0)


def test_warmup_value_at_known_steps():
    assert warmup_value(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert warmup_value(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert warmup_value(30, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert warmup_value(99, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert warmup_value(0, 0, 0.04, 0.07) == pytest.approx(0.07)


def _naive_queue(size: int, batches: list[torch.Tensor],
                 start: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Write every key one at a time into a circular buffer."""
    slots, ptr = [row.clone() for row in start], 0
    for keys in batches:
        for row in keys:
            slots[ptr] = row.clone()
            ptr = (ptr + 1) % size
    return torch.stack(slots), ptr


@pytest.mark.parametrize("size,batch,steps", [(6, 2, 5), (5, 3, 4), (4, 4, 3), (5, 7, 3)])
def test_queue_is_a_fifo_with_wrap_around(size, batch, steps):
    queue = KeyQueue(size, 3)
    start = queue.keys.clone()
    batches = [torch.arange(batch * 3, dtype=torch.float32).view(batch, 3) + 100 * (s + 1)
               for s in range(steps)]
    pointers = []
    for keys in batches:
        queue.enqueue(keys)
        pointers.append(int(queue.ptr))
    expected, ptr = _naive_queue(size, batches, start)
    torch.testing.assert_close(queue.keys, expected)
    assert int(queue.ptr) == ptr
    assert pointers == [(batch * (s + 1)) % size for s in range(steps)]


def test_queue_is_checkpointed_in_the_state_dict():
    queue = KeyQueue(5, 2)
    queue.enqueue(torch.ones(3, 2))
    state = queue.state_dict()
    assert set(state) == {"keys", "ptr"}
    fresh = KeyQueue(5, 2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.keys, queue.keys) and int(fresh.ptr) == 3


def test_queue_starts_with_unit_random_keys():
    keys = KeyQueue(64, 8).keys
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(64))
    assert keys.std() > 0.1


# ---------------------------------------------------------------- the methods' on_step

WITH_MOMENTUM = [n for n in sorted(methods.METHODS) if make(n)[0].momentum_pairs()]


def expected_momentum(cfg, step: int, total: int) -> float:
    """A method's momentum at a step, from its config: a constant `momentum` (MoCo v1/v2) or a
    `base_momentum` raised to 1 by the cosine schedule (MoCo v3, DINO, BYOL)."""
    if hasattr(cfg, "base_momentum"):
        return cosine_momentum(step, total, cfg.base_momentum)
    return cfg.momentum


@pytest.mark.parametrize("name", WITH_MOMENTUM)
@pytest.mark.parametrize("step,total", [(0, 10), (3, 10), (10, 10)])
def test_on_step_moves_the_momentum_encoder_by_exactly_the_ema_rule(name, step, total):
    model, _, cfg = make(name)
    pairs = model.momentum_pairs()
    with torch.no_grad():  # stand-in for an optimiser step: the online networks move
        for _, online in pairs:
            for p in online.parameters():
                p.add_(torch.randn_like(p))
    before = [[p.clone() for p in t.parameters()] for t, _ in pairs]
    online_before = [[p.clone() for p in o.parameters()] for _, o in pairs]
    model.on_step(step, total)
    m = expected_momentum(cfg, step, total)
    for (target, online), old_t, old_o in zip(pairs, before, online_before):
        for new, old, o in zip(target.parameters(), old_t, old_o):
            assert not new.requires_grad
            torch.testing.assert_close(new, m * old + (1 - m) * o, rtol=1e-6, atol=1e-7)
        assert all(torch.equal(p, old) for p, old in zip(online.parameters(), old_o))


def test_dino_on_step_sets_the_teacher_temperature_and_last_layer_freeze_for_the_next_step():
    model = make("dino", freeze_last_layer_frac=0.01)[0]
    assert float(model.teacher_temp) == pytest.approx(0.04)
    assert bool(model.last_layer_frozen)
    model.on_step(14, 100)  # next step 15 of a 30-step warm-up (fraction 0.3)
    assert float(model.teacher_temp) == pytest.approx(0.04 + 0.03 * 15 / 30)
    assert not bool(model.last_layer_frozen)  # freeze covers int(0.01 * 100) = 1 step
    model.on_step(29, 100)
    assert float(model.teacher_temp) == pytest.approx(0.07)
    model.on_step(0, 1000)  # freeze covers 10 steps: step 1 is still frozen
    assert bool(model.last_layer_frozen)
