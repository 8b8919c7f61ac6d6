"""Two training steps of SimCLR, MoCo v2 and DINO on 2 gloo workers equal the same steps on 1.

The global batch of B examples is split B/2 per worker; the single-worker run sees all B. Both
start from the same weights and get the same views (computed once here). The 2-worker run is
what Ray Train runs: DistributedDataParallel over a gloo group, collectives from
methods/distributed.py. Equal losses, equal weights after the steps, the same MoCo queue
(K = 12 with 8 keys a step, so the second step wraps around) and the same DINO centre prove that
the gathered negatives, the enqueued keys of all workers, the shuffled key batch and the
all-reduced centre are right.

BatchNorm: per-worker batch statistics differ from the global batch's, and
torch.nn.SyncBatchNorm refuses CPU tensors (torch 2.14: "SyncBatchNorm expected input tensor to
be on GPU"). The 2-worker models therefore use `GlobalBatchNorm` below, which computes the
statistics of the global batch by gathering the inputs with gradient — what SyncBatchNorm does on
GPUs — while the 1-worker models keep torch's plain BatchNorm. With it MoCo's shuffling BN is
exercised too: the shuffled key batch must come back in the right order for the losses to match.
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
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from methods.distributed import all_gather_with_grad
from tests.methods.contract import make, tiny_size, views_of

WORLD = 2
BATCH = 8  # global; BATCH // WORLD per worker
STEPS = 2
SPAWN_TIMEOUT_S = 90
# What each case needs on top of the method's registered tiny config: a queue that wraps in two
# steps, momenta low enough for the encoders to move visibly.
CASES = {"simclr": {}, "moco_v2": {"queue_size": 12, "momentum": 0.9},
         "dino": {"base_momentum": 0.9, "freeze_last_layer_frac": 0.0}}

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Training-mode BatchNorm over the batch of all workers; same parameters and buffers."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected (B, C, ...) input, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        x_all = all_gather_with_grad(x)  # (W * B, C, ...)
        mean, var = x_all.mean(dims), x_all.var(dims, unbiased=False)  # (C,)
        with torch.no_grad():
            n = x_all.numel() // x_all.shape[1]
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked.add_(1)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def to_global_bn(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine)
            bn.load_state_dict(child.state_dict())
            bn.requires_grad_(any(p.requires_grad for p in child.parameters()))  # momentum copies
            setattr(module, name, bn)
        else:
            to_global_bn(child)
    return module


def _model(name: str) -> nn.Module:
    return make(name, **CASES[name])[0]


def _views(name: str, images: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    return views_of(make(name, **CASES[name])[1], images, seed)


def _train(name: str, state: dict, batches: list[dict], distributed: bool) -> dict:
    """STEPS SGD steps from `state` on `batches`: the per-step losses and the final state."""
    model = _model(name)
    model.load_state_dict(state)
    if distributed:
        model = DistributedDataParallel(to_global_bn(model))
    method = getattr(model, "module", model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                                momentum=0.9)
    losses = []
    for step, batch in enumerate(batches):
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.on_step(step, STEPS)
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "state": method.state_dict()}


def _worker(rank: int, init_file: str, tmp: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=SPAWN_TIMEOUT_S))
    try:
        inputs = torch.load(Path(tmp) / "inputs.pt", weights_only=True)
        share = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        out = {name: _train(name, case["state"],
                            [{k: v[share] for k, v in b.items()} for b in case["batches"]], True)
               for name, case in inputs.items()}
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict, list[dict]]:
    """(inputs, the 1-worker results, the 2 workers' results) for every case."""
    tmp = tmp_path_factory.mktemp("multiworker")
    inputs = {}
    for name in CASES:
        size = tiny_size(name)
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8, generator=g)
        inputs[name] = {"state": _model(name).state_dict(),
                        "batches": [_views(name, images, seed) for seed in range(STEPS)]}
    torch.save(inputs, tmp / "inputs.pt")
    single = {name: _train(name, case["state"], case["batches"], False)
              for name, case in inputs.items()}
    context = mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"gloo workers did not finish within {SPAWN_TIMEOUT_S} s")
    workers = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return inputs, single, workers


def _assert_states_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_workers_give_the_loss_of_the_global_batch(runs, name):
    _, single, workers = runs
    mean = sum(w[name]["losses"] for w in workers) / WORLD  # DDP optimises the mean
    torch.testing.assert_close(mean, single[name]["losses"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(workers[0][name]["losses"], workers[1][name]["losses"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_workers_end_in_the_state_of_one(runs, name):
    _, single, workers = runs
    for w in workers:
        _assert_states_equal(w[name]["state"], single[name]["state"])


def test_moco_queue_holds_every_workers_keys_in_global_order(runs):
    inputs, single, workers = runs
    queue = single["moco_v2"]["state"]["queue.keys"]
    assert int(single["moco_v2"]["state"]["queue.ptr"]) == (STEPS * BATCH) % 12
    changed = ~torch.isclose(queue, inputs["moco_v2"]["state"]["queue.keys"]).all(dim=1)
    assert int(changed.sum()) == 12  # 16 keys written into 12 slots: every slot is new
    for w in workers:
        torch.testing.assert_close(w["moco_v2"]["state"]["queue.keys"], queue, rtol=1e-4,
                                   atol=1e-5)
        assert torch.equal(w["moco_v2"]["state"]["queue.ptr"],
                           single["moco_v2"]["state"]["queue.ptr"])


def test_dino_centre_is_the_mean_over_all_workers(runs):
    _, single, workers = runs
    centre = single["dino"]["state"]["center"]
    assert centre.abs().sum() > 0
    for w in workers:
        torch.testing.assert_close(w["dino"]["state"]["center"], centre, rtol=1e-4, atol=1e-6)


def test_simclr_negatives_span_the_global_batch(runs):
    """A worker's loss with only its own half as negatives differs from what it computed."""
    inputs, _, workers = runs
    model = _model("simclr")
    model.load_state_dict(inputs["simclr"]["state"])
    half = {k: v[:BATCH // WORLD] for k, v in inputs["simclr"]["batches"][0].items()}
    with torch.no_grad():
        local_only = model(half)[0]
    assert not torch.isclose(local_only, workers[0]["simclr"]["losses"][0], rtol=1e-3)
