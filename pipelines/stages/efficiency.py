"""`efficiency`: what a representation costs — parameters, training images/s and wall time (from the
run's summary), inference images/s of `embed`, and peak memory.

Inference is timed in a fresh Ray worker process (`max_calls=1`), so its peak memory (CPU: the
process's maximum RSS from `resource.getrusage`; GPU: `torch.cuda.max_memory_allocated`) is that of
loading the model and embedding a batch, not whatever the driver held before.
"""
from __future__ import annotations

import os
import resource
import time

import torch
from torch import nn

from pipelines.checkpoint import MODEL, load_model
from pipelines.stages.registry import StageContext, register_stage

TRAIN_FIGURES = ("images_per_s", "wall_s", "epochs", "steps")


def count_parameters(module: nn.Module) -> int:
    """Every parameter element of `module`, trainable or not (momentum encoders count)."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def inference_throughput(model: nn.Module, image_size: int, batch_size: int, batches: int,
                         device: torch.device | str = "cpu") -> float:
    """Images per second of `model.embed` on random uint8 images, after one warm-up batch."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), generator=g,
                           dtype=torch.uint8).to(device)  # (B, 3, S, S)
    model.embed(images)
    start = time.perf_counter()
    for _ in range(batches):
        model.embed(images)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return batch_size * batches / max(time.perf_counter() - start, 1e-9)


def measure(checkpoint: str, batch_size: int, batches: int, use_gpu: bool) -> dict:
    """Load the checkpoint and time `embed`; meant for a fresh process."""
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    model, meta = load_model(checkpoint, map_location=device)
    ips = inference_throughput(model.to(device), meta["image_size"], batch_size, batches, device)
    out = {"inference_images_per_s": ips, "inference_threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return out


def _train_figures(ctx: StageContext) -> dict:
    return {f"train_{k}": ctx.train[k] for k in TRAIN_FIGURES
            if isinstance(ctx.train.get(k), (int, float)) and ctx.train[k] == ctx.train[k]}


@register_stage("efficiency", needs_labels=False, config=("efficiency",), extra=_train_figures)
def run(ctx: StageContext) -> dict:
    import ray
    cfg = ctx.cfg.efficiency
    model, _ = load_model(ctx.checkpoint)
    encoder = getattr(model, "backbone", None)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    timed = ray.remote(num_cpus=1, num_gpus=int(use_gpu), max_calls=1)(measure)
    metrics = {"params": count_parameters(model),
               "checkpoint_mb": os.path.getsize(os.path.join(ctx.checkpoint, MODEL)) / 2**20,
               **_train_figures(ctx),
               **ray.get(timed.remote(ctx.checkpoint, cfg.batch_size, cfg.batches, use_gpu))}
    if encoder is not None:
        metrics["encoder_params"] = count_parameters(encoder)
    return metrics
