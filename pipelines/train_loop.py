"""The plain training loop: any registered method, any iterable of view batches, no Ray.

Ray Train workers call `train_epoch` on their dataset shard; unit tests and the overhead benchmark
call `fit_plain` on in-memory images. Nothing here knows which method it trains.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from methods.augment import from_hwc
from methods.config import param
from pipelines.optim import lr_at, make_optimizer, set_lr


@dataclass
class TrainConfig:
    epochs: int = param(30, ge=1, help="passes over the pretraining images")
    batch_size: int = param(256, ge=2, tunable=True, help="global batch size (all workers)")
    optimizer: str = param("lars", choices=("sgd", "lars", "adamw"))
    lr: float = param(0.3, gt=0, tunable=True, help="base lr for batch 256 (scaled linearly)")
    lr_scaling: str = param("linear", choices=("linear", "none"),
                            help="linear: lr * batch_size / 256 (Goyal et al. 2017)")
    weight_decay: float = param(1e-6, ge=0, tunable=True)
    momentum: float = param(0.9, ge=0, lt=1, help="SGD/LARS momentum, AdamW beta1")
    warmup_epochs: float = param(1.0, ge=0)
    final_lr_ratio: float = param(0.0, ge=0, le=1, help="cosine decays to this fraction of lr")
    grad_clip: float | None = param(None, gt=0, help="max gradient norm (None: no clipping)")
    precision: str = param("fp32", choices=("fp32", "bf16"), help="bf16 autocast")
    channels_last: bool = param(False, help="NHWC memory format (faster convolutions on GPUs)")
    compile: bool = param(False, help="torch.compile the method (first steps are slow)")
    prefetch_batches: int = param(2, ge=0, help="batches each worker prefetches (to the device)")
    seed: int = param(0)
    num_workers: int = param(1, ge=1, help="Ray Train workers (data-parallel replicas)")
    use_gpu: bool = param(False)
    cpus_per_worker: float = param(0.0, ge=0, help="0: leave a CPU for Ray Data, give workers the rest")
    torch_threads: int = param(0, ge=0, help="intra-op threads per worker; 0: CPUs on the node / workers")
    sync_batchnorm: bool = param(False, help="SyncBatchNorm across workers (global BN)")
    checkpoint_every: int = param(5, ge=1, help="epochs between checkpoints (the last is always saved)")
    checkpoint_every_minutes: float = param(
        10.0, ge=0, help="also checkpoint mid-epoch when this many minutes passed since the last "
                         "checkpoint (0: off); a stop (SIGTERM, Ctrl-C) always saves one")
    checkpoint_every_steps: int = param(0, ge=0, help="also checkpoint every N steps (0: off)")
    keep_checkpoints: int = param(2, ge=1, help="the newest checkpoints kept, mid-epoch ones "
                                                "included")
    max_failures: int = param(0, ge=-1, help="worker-group restarts from the last checkpoint")
    controller_failure_limit: int = param(3, ge=0, help="retries of a worker group that cannot start")
    log_every: int = param(10, ge=1, help="steps between TensorBoard scalars, and between the "
                                          "workers' checks for a due checkpoint or a stop")
    progress_every_s: float = param(30.0, ge=0, help="seconds between progress lines inside an "
                                                     "epoch (0: off)")
    progress_every_steps: int = param(0, ge=0, help="steps between progress lines inside an "
                                                    "epoch (0: off)")
    max_steps: int = param(0, ge=0, help="stop after this many optimiser steps in all (0: no cap), "
                                         "e.g. a smoke run on big data; the lr schedule, warm-up "
                                         "and ETA use the capped total")
    shuffle_buffer: int = param(1024, ge=0, help="rows in each worker's local shuffle buffer")

    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / 256 if self.lr_scaling == "linear" else self.lr


@dataclass(frozen=True)
class Plan:
    """A run's length: `epochs` passes of `steps_per_epoch` steps, cut at `total` steps."""
    steps_per_epoch: int
    epochs: int
    total: int

    def epoch_steps(self, epoch: int) -> int:
        """Steps of epoch `epoch` (the last one is short when `max_steps` cuts it)."""
        return min(self.steps_per_epoch, self.total - epoch * self.steps_per_epoch)

    @property
    def warmup_epoch(self) -> int:
        """An epoch's steps as warm-up counts them: a run cut to less than an epoch is one."""
        return min(self.steps_per_epoch, self.total)


def plan_run(steps_per_epoch: int, cfg: TrainConfig) -> Plan:
    """`cfg.epochs` epochs of `steps_per_epoch` steps, capped at `cfg.max_steps` in all."""
    total = steps_per_epoch * cfg.epochs
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    return Plan(steps_per_epoch, -(-total // steps_per_epoch), total)


@dataclass
class EpochStats:
    loss: float
    steps: int
    images: int
    seconds: float
    metrics: dict

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def unwrap(model: nn.Module) -> nn.Module:
    """The method itself, under torch.compile's and DistributedDataParallel's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return make_optimizer(model, cfg.optimizer, cfg.scaled_lr(), cfg.weight_decay, cfg.momentum)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """Move a batch to `device` without blocking (pinned host memory makes this asynchronous)."""
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        if channels_last and v.dim() == 4:
            v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def prepare_module(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Apply the memory-format and compile options to a (device-placed) method."""
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if cfg.compile else model


StepHook = Callable[[int, float, torch.Tensor, dict], bool]


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[dict],
                cfg: TrainConfig, *, step: int, total_steps: int, steps_per_epoch: int,
                device: torch.device, steps: int | None = None,
                on_step_end: StepHook | None = None) -> EpochStats:
    """One pass over `batches`, at most `steps` (>= 1) long (default `steps_per_epoch`, which sets
    the warm-up); `step` is the global step at entry.

    Losses and metrics accumulate on the device and are read back at the end, so a GPU is not
    synchronised after every step. `on_step_end(step, lr, loss, metrics)` runs after every step
    with the step count so far and the step's detached tensors (reading them synchronises a GPU:
    the hook does it every few steps); it returns True to end the pass there.
    """
    method = unwrap(model)
    model.train()
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    steps = steps_per_epoch if steps is None else steps
    loss_sum, sums, n_images, n_steps = torch.zeros((), device=device), {}, 0, 0
    start = time.perf_counter()
    for batch in batches:
        batch = to_device(batch, device, cfg.channels_last)
        lr = lr_at(step, total_steps, warmup, cfg.scaled_lr(), cfg.final_lr_ratio)
        set_lr(optimizer, lr)
        with _autocast(device, cfg.precision):
            loss, metrics = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        method.on_step(step, total_steps)
        step, n_steps = step + 1, n_steps + 1
        loss_sum += loss.detach().float()
        n_images += next(iter(batch.values())).shape[0]
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v)
        if (on_step_end is not None and on_step_end(step, lr, loss.detach(), metrics)) \
                or n_steps == steps:
            break
    seconds = time.perf_counter() - start
    n = max(n_steps, 1)
    return EpochStats(float(loss_sum) / n if n_steps else float("nan"), n_steps, n_images, seconds,
                      {k: float(v) / n for k, v in sums.items()})


def iterate_views(images: np.ndarray, views: Callable, batch_size: int,
                  generator: torch.Generator) -> Iterable[dict]:
    """In-process stand-in for the Ray Data view pipeline: shuffled batches of fresh views."""
    order = torch.randperm(len(images), generator=generator).numpy()
    for i in range(0, len(order) - batch_size + 1, batch_size):
        yield views(from_hwc(images[order[i:i + batch_size]]), generator)


def fit_plain(model: nn.Module, views: Callable, images: np.ndarray, cfg: TrainConfig,
              device: torch.device | None = None) -> list[EpochStats]:
    """Train `model` on uint8 images (N, H, W, 3) in this process, no Ray: tests and benchmarks."""
    device = device or torch.device("cpu")
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    model = prepare_module(model, cfg)
    plan = plan_run(len(images) // cfg.batch_size, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    history = []
    for epoch in range(plan.epochs):
        history.append(train_epoch(model, optimizer, iterate_views(images, views, cfg.batch_size, g),
                                   cfg, step=epoch * plan.steps_per_epoch, total_steps=plan.total,
                                   steps_per_epoch=plan.warmup_epoch,
                                   steps=plan.epoch_steps(epoch), device=device))
    return history
