"""methods/distributed.py and the gathered losses on a real 2-process gloo group.

One module-scoped fixture spawns the two workers once; each worker takes its half of a fixed
global batch, runs every collective and gathered loss, and saves what it saw. The tests compare
those results with the same computation on the whole batch in this single process.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from methods.distributed import (all_gather_no_grad, all_gather_with_grad, all_reduce_mean_,
                                 broadcast_, rank, world_size)
from methods.losses import contrastive_batch_loss, nt_xent

WORLD = 2
N, D = 3, 5  # per-worker batch and feature size
TEMPERATURE = 0.2
SPAWN_TIMEOUT_S = 60

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    names = ("x", "z1", "z2", "q", "k")
    return {name: torch.randn(WORLD * N, D, generator=g, dtype=torch.float64) for name in names}


def _gather_weights(worker: int) -> torch.Tensor:
    # Each worker weights the gathered tensor differently, so every slice's gradient is a sum of
    # distinct contributions from both workers.
    return torch.arange(WORLD * N * D, dtype=torch.float64).reshape(WORLD * N, D) * (worker + 1)


def _local(t: torch.Tensor, worker: int) -> torch.Tensor:
    return t[worker * N:(worker + 1) * N].clone().requires_grad_()


def _run_collectives(worker: int) -> dict:
    batch = _global_batch()
    local = {name: _local(t, worker) for name, t in batch.items()}
    out: dict = {"world_size": world_size(), "rank": rank()}

    gathered = all_gather_with_grad(local["x"])  # (W * N, D)
    (gathered * _gather_weights(worker)).sum().backward()
    out.update(gathered=gathered.detach(), x_grad=local["x"].grad)
    no_grad = all_gather_no_grad(local["x"])
    out.update(no_grad=no_grad, no_grad_requires_grad=no_grad.requires_grad)

    loss = nt_xent(local["z1"], local["z2"], TEMPERATURE)
    loss.backward()
    out.update(nt_xent=loss.detach(), z1_grad=local["z1"].grad, z2_grad=local["z2"].grad)
    out["nt_xent_local"] = nt_xent(local["z1"], local["z2"], TEMPERATURE, gather=False).detach()

    loss = contrastive_batch_loss(local["q"], local["k"], TEMPERATURE)
    loss.backward()
    out.update(mocov3=loss.detach(), q_grad=local["q"].grad, k_has_grad=local["k"].grad is not None)

    out["mean"] = all_reduce_mean_(torch.full((4,), float(worker + 1)))
    out["broadcast"] = broadcast_(torch.full((3,), float(worker + 10)), src=1)
    return out


def _worker(worker: int, init_file: str, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=worker,
                            world_size=WORLD, timeout=timedelta(seconds=SPAWN_TIMEOUT_S))
    try:
        torch.save(_run_collectives(worker), Path(out_dir) / f"rank{worker}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> list[dict]:
    """What each of the two gloo workers computed, indexed by rank."""
    tmp = tmp_path_factory.mktemp("gloo")
    context = mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"gloo workers did not finish within {SPAWN_TIMEOUT_S} s")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_without_process_group_everything_is_a_no_op():
    x = torch.randn(3, 4, requires_grad=True)
    assert world_size() == 1 and rank() == 0
    assert all_gather_with_grad(x) is x
    gathered = all_gather_no_grad(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    y = torch.randn(5)
    before = y.clone()
    assert all_reduce_mean_(y) is y and torch.equal(y, before)
    assert broadcast_(y) is y and torch.equal(y, before)


def test_workers_know_their_rank(workers):
    assert [(w["world_size"], w["rank"]) for w in workers] == [(WORLD, 0), (WORLD, 1)]


def test_all_gather_with_grad_concatenates_and_routes_gradients(workers):
    x = _global_batch()["x"]
    # d(sum of worker losses)/d(gathered): each worker's slice receives every worker's weights.
    weight_sum = sum(_gather_weights(r) for r in range(WORLD))
    for r, w in enumerate(workers):
        assert torch.equal(w["gathered"], x)
        torch.testing.assert_close(w["x_grad"], weight_sum[r * N:(r + 1) * N])


def test_all_gather_no_grad_concatenates_detached(workers):
    x = _global_batch()["x"]
    for w in workers:
        assert torch.equal(w["no_grad"], x) and not w["no_grad_requires_grad"]


def test_nt_xent_on_two_workers_equals_the_global_batch_on_one(workers):
    batch = _global_batch()
    z1, z2 = batch["z1"].requires_grad_(), batch["z2"].requires_grad_()
    expected = nt_xent(z1, z2, TEMPERATURE)
    expected.backward()
    torch.testing.assert_close(sum(w["nt_xent"] for w in workers) / WORLD, expected.detach())
    # Worker r's gradient is d(sum of worker losses)/dz_r = WORLD * d(global mean loss)/dz_r.
    torch.testing.assert_close(torch.cat([w["z1_grad"] for w in workers]) / WORLD, z1.grad)
    torch.testing.assert_close(torch.cat([w["z2_grad"] for w in workers]) / WORLD, z2.grad)


def test_nt_xent_without_gather_uses_local_negatives_only(workers):
    batch = _global_batch()
    for r, w in enumerate(workers):
        local = nt_xent(batch["z1"][r * N:(r + 1) * N], batch["z2"][r * N:(r + 1) * N], TEMPERATURE)
        torch.testing.assert_close(w["nt_xent_local"], local)
        assert not torch.allclose(w["nt_xent_local"], w["nt_xent"])


def test_contrastive_batch_loss_on_two_workers_equals_the_global_batch_on_one(workers):
    batch = _global_batch()
    q = batch["q"].requires_grad_()
    expected = contrastive_batch_loss(q, batch["k"], TEMPERATURE)
    expected.backward()
    torch.testing.assert_close(sum(w["mocov3"] for w in workers) / WORLD, expected.detach())
    torch.testing.assert_close(torch.cat([w["q_grad"] for w in workers]) / WORLD, q.grad)
    assert not any(w["k_has_grad"] for w in workers)


def test_all_reduce_mean_and_broadcast(workers):
    for w in workers:
        torch.testing.assert_close(w["mean"], torch.full((4,), 1.5))
        torch.testing.assert_close(w["broadcast"], torch.full((3,), 11.0))
