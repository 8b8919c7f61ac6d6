"""GPU readiness, checked on CPU: every training option a GPU run would set still trains here.

A few steps of the plain loop (`fit_plain`, the demo config: SimCLR, Chen et al., 2020,
arXiv:2002.05709, resnet_small at 16 px) with each option of `TrainConfig` — bf16 autocast,
channels_last, torch.compile — each in a fresh process, recording that it ran, a finite loss and
its images/s (the second epoch: the first holds compilation). Pinned memory, non-blocking copies
and prefetching are properties of the batch iterator a Train worker uses
(`iter_torch_batches(prefetch_batches=..., pin_memory=..., device=...)`); they are checked on a
small Ray Data view pipeline. The speed-ups these options exist for need a GPU; on a CPU they show
only that nothing breaks (bf16 and channels_last are usually slower on CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

from benchmarks.common import ROOT, load_average, write_result

# The last is what a GPU run sets (README); compiling it once shows torch.compile works here.
OPTIONS = {"fp32": {}, "bf16": {"precision": "bf16"}, "channels_last": {"channels_last": True},
           "bf16+channels_last+compile": {"precision": "bf16", "channels_last": True,
                                          "compile": True}}
CONFIG = "configs/simclr.yaml"


def train_option(option: str, images: int, epochs: int = 2) -> dict:
    """`fit_plain` with OPTIONS[option] for `epochs` epochs on `images` digits (this process)."""
    import dataclasses
    import torch
    import methods
    from benchmarks.train_overhead import pretrain_images
    from orchestrator.config import load_config
    from pipelines.train_loop import fit_plain
    torch.set_num_threads(1)  # one core: steady figures on a shared machine
    torch.manual_seed(0)
    cfg = load_config(str(ROOT / CONFIG), [f"train.epochs={epochs}", "train.warmup_epochs=0"])
    train = dataclasses.replace(cfg.train, **OPTIONS[option])
    spec = methods.get(cfg.method_name)
    model = spec.model(cfg.method, cfg.backbone, cfg.data.image_size)
    data = pretrain_images(cfg.data)[:images]
    start = time.perf_counter()
    history = fit_plain(model, spec.views(cfg.method, cfg.data.image_size), data, train)
    return {"ran": all(math.isfinite(h.loss) for h in history), "steps": sum(h.steps for h in history),
            "loss": [round(h.loss, 4) for h in history],
            "images_per_s": round(history[-1].images_per_s, 1),
            "first_epoch_s": round(history[0].seconds, 2),
            "total_s": round(time.perf_counter() - start, 2), "torch_threads": 1}


def launch_option(option: str, images: int, timeout: float) -> dict:
    """`train_option` in a fresh process; a failure or a timeout is recorded, not raised."""
    args = [sys.executable, "-m", "benchmarks.gpu_readiness", "--child", option,
            "--images", str(images)]
    try:
        out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ran": False, "error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        return {"ran": False, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def iterator_checks(images: int = 256, batch: int = 64) -> dict:
    """Prefetching, non-blocking device copies and pinning through Ray Data's torch iterator."""
    import ray
    import torch
    from benchmarks.data_throughput import recipe, start_ray, timed_epoch
    from methods.views import TwoViews
    from pipelines.views import view_dataset
    checks: dict = {"cuda_available": torch.cuda.is_available()}
    started = start_ray(2)
    try:
        data = ray.data.from_items([{"image": torch.randint(0, 256, (16, 16, 3),
                                                            dtype=torch.uint8).numpy()}
                                    for _ in range(images)])
        views = view_dataset(data, TwoViews(recipe(16), 16), batch)
        timed_epoch(views.iter_torch_batches(batch_size=batch))  # warm-up: worker start-up
        for prefetch in (0, 2):
            it = views.iter_torch_batches(batch_size=batch, prefetch_batches=prefetch,
                                          device="cpu", drop_last=True)
            checks[f"prefetch_{prefetch}"] = {"ran": True,
                                              "images_per_s": round(timed_epoch(it)["images_per_s"])}
        checks["pin_memory"] = _pin_check(views, batch)
    finally:
        if started:
            ray.shutdown()
    return checks


def _pin_check(views, batch: int) -> dict:
    """Pinning needs a CUDA driver: the Train worker asks for it only when its device is CUDA."""
    try:
        next(iter(views.iter_torch_batches(batch_size=batch, pin_memory=True)))
        return {"ran": True}
    except Exception as e:  # the error type depends on the torch build
        return {"ran": False, "expected_without_gpu": True, "error": str(e).splitlines()[0][:200]}


def run(options=tuple(OPTIONS), images: int = 512, timeout: float = 300, results_dir=None) -> dict:
    """Every option and the iterator checks; writes gpu_readiness.json and returns its content."""
    before = load_average()
    result = {"config": CONFIG, "images": images,
              "options": {o: launch_option(o, images, timeout) for o in options},
              "iterator": iterator_checks(),
              "load_before": before, "load_after": load_average()}
    write_result("gpu_readiness", result, results_dir)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=sorted(OPTIONS), help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--results-dir", default=None)
    a = p.parse_args()
    if a.child:
        print(json.dumps(train_option(a.child, a.images)))
    else:
        run(images=a.images, timeout=a.timeout, results_dir=a.results_dir)


if __name__ == "__main__":
    main()
