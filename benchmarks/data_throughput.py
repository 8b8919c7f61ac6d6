"""Images/s of selfsup's view pipeline (Ray Data) against torch's DataLoader, same CPUs, same code.

The augmentation is SimCLR's two views (Chen et al., 2020, arXiv:2002.05709): the CIFAR recipe at
32 px (appendix B.9: jitter strength 0.5, no blur) on the digits upscaled, and the ImageNet recipe
at 224 px (appendix A: strength 1.0, blur p = 0.5) on JPEG crops of the scenes photographs,
decoded by the pipeline. Three sides, interleaved epoch by epoch in one process:

- `ray`: `view_dataset` over the decoded cache, read with `iter_torch_batches` as a Train worker
  reads its shard (local shuffle buffer, prefetch); `ray.init(num_cpus=n)`.
- `loader_same`: a DataLoader with n workers running the same code (`methods.views.TwoViews`) on
  batches drawn from the same decoded images: the fair comparison, same work per image.
- `loader_tv2`: a DataLoader with n workers and torchvision v2 per-image transforms, the usual
  hand-written script (REFERENCES.md's baseline).
- `ray_identity`: the Ray side with views that only copy the images: what Ray Data itself costs
  at these shapes (tasks, object store, Arrow, the shuffle buffer, batching), for the breakdown.

"n CPUs" is enforced, not only requested: the process (and so Ray's raylet and workers, and the
DataLoader's workers, which inherit it) is pinned to n cores with `sched_setaffinity`.
"""
from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from benchmarks.common import load_average, ratio, summary, write_result
from methods.augment import from_hwc
from methods.views import AugmentConfig, TwoViews, new_generator

SIDES = ("ray", "loader_same", "loader_tv2", "ray_identity")
LOADERS = ("loader_same", "loader_tv2")
# SimCLR recipes: CIFAR (appendix B.9) for the small images, ImageNet (appendix A) for 224 px.
RECIPES = {32: AugmentConfig(jitter_strength=0.5, blur_p=0.0),
           224: AugmentConfig(jitter_strength=1.0, blur_p=0.5)}
SHUFFLE_BUFFER = 1024   # TrainConfig.shuffle_buffer's default, as a Train worker reads its shard
PREFETCH = 2            # TrainConfig.prefetch_batches's default; the DataLoader's prefetch_factor


def recipe(size: int) -> AugmentConfig:
    return RECIPES[32] if size <= 64 else RECIPES[224]


def tv2_transform(size: int, aug: AugmentConfig):
    """The same recipe as torchvision v2 per-image transforms (uint8 (3, H, W) in and out)."""
    from torchvision.transforms import v2
    from methods.augment import default_blur_kernel_size
    s = aug.jitter_strength
    steps = [v2.RandomResizedCrop(size, scale=aug.crop_scale, antialias=True),
             v2.RandomHorizontalFlip(aug.flip_p),
             v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=aug.jitter_p),
             v2.RandomGrayscale(aug.gray_p)]
    if aug.blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(default_blur_kernel_size(size), (0.1, 2.0))],
                                    p=aug.blur_p))
    return v2.Compose(steps)


class IdentityViews:
    """Views that cost nothing: the input batch and a copy, shaped as TwoViews' output."""

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> dict:
        return {"view1": images, "view2": images.clone()}


class BatchViews(Dataset):
    """Index = a list of image indices; returns `views` of that batch, as the Ray UDF does."""

    def __init__(self, images: np.ndarray, views):
        self.images, self.views = images, views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices: list[int]) -> dict:
        chunk = torch.from_numpy(self.images[indices])  # (B, S, S, 3), a copy
        with torch.no_grad():
            return self.views(from_hwc(chunk), new_generator())


class ImageViews(Dataset):
    """One image in, two independently transformed uint8 views (3, S, S) out."""

    def __init__(self, images: np.ndarray, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = torch.from_numpy(self.images[i]).permute(2, 0, 1)  # (3, S, S) uint8
        return {"view1": self.transform(image), "view2": self.transform(image)}


def make_loader(side: str, images: np.ndarray, size: int, batch: int, workers: int) -> DataLoader:
    """The DataLoader of `side` over `images` (N, S, S, 3); `workers` = 0 runs in this process."""
    common = dict(num_workers=workers, persistent_workers=True, prefetch_factor=PREFETCH,
                  multiprocessing_context="spawn") if workers else {}  # no fork after ray.init
    aug = recipe(size)
    if side == "loader_same":
        sampler = BatchSampler(RandomSampler(range(len(images))), batch, drop_last=True)
        return DataLoader(BatchViews(images, TwoViews(aug, size)), batch_size=None,
                          sampler=sampler, **common)
    return DataLoader(ImageViews(images, tv2_transform(size, aug)), batch_size=batch,
                      shuffle=True, drop_last=True, **common)


def timed_epoch(batches) -> dict:
    """Consume one epoch: images, seconds, and the wait for the first batch."""
    start = time.perf_counter()
    images, first = 0, None
    for b in batches:
        images += b["view1"].shape[0]
        if first is None:
            first = time.perf_counter() - start
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "first_batch_s": first or seconds,
            "images_per_s": images / seconds}


def scene_jpegs(folder: Path, count: int, seed: int = 0, quality: int = 90) -> None:
    """`count` JPEG files of random square crops (256-448 px) of the scenes photographs."""
    from PIL import Image
    from pipelines.scenes import PHOTOS, load_photo
    rng = np.random.default_rng(seed)
    photos = [load_photo(name) for name in PHOTOS]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = photo.shape[:2]
        side = int(min(rng.integers(256, 449), height, width))
        y, x = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        buf = io.BytesIO()
        Image.fromarray(photo[y:y + side, x:x + side]).save(buf, "JPEG", quality=quality)
        (folder / f"scene_{i:05d}.jpg").write_bytes(buf.getvalue())


def decoded_cache(size: int, count: int, workdir: Path) -> tuple:
    """The decoded cache selfsup builds (Ray Data, materialised) and its decode time.

    32 px: the digits source (its pretraining split) repeated to about `count` images. 224 px:
    `count` JPEGs written to `workdir` and decoded by the folder source's Ray Data stage.
    """
    from pipelines.data import DataConfig, load_splits
    start = time.perf_counter()
    if size <= 64:
        ds = load_splits(DataConfig(source="digits", image_size=size), need_labels=False).pretrain
        copies = max(1, round(count / ds.count()))
        ds = ds.union(*[ds] * (copies - 1)).materialize() if copies > 1 else ds
    else:
        scene_jpegs(workdir / "jpegs", count)
        spec = f"folder:{workdir / 'jpegs'}"
        ds = load_splits(DataConfig(source=spec, image_size=size), need_labels=False).pretrain
    return ds, time.perf_counter() - start


def start_ray(cpus: int) -> bool:
    """Start Ray with `cpus` logical CPUs; False if one is already running here (tests share it)."""
    import ray
    from orchestrator.ray_env import quiet_logs
    quiet_logs(verbose=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return False
    ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=600 * 2**20,
             log_to_driver=False)
    return True


def _ray_batches(views_ds, batch: int, shuffle: int | None = SHUFFLE_BUFFER):
    return views_ds.iter_torch_batches(batch_size=batch, drop_last=True,
                                       local_shuffle_buffer_size=shuffle,
                                       prefetch_batches=PREFETCH)


def epoch_functions(cache, images: np.ndarray, size: int, batch: int, cpus: int,
                    candidates: bool = True) -> tuple:
    """({side: a function that runs one epoch of it}, the selfsup views dataset). At small sizes two more candidate changes to
    the Ray side are measured: `ray_big_tasks` (views tasks of 4 training batches, not one) and
    `ray_no_shuffle` (no local shuffle buffer in the reader)."""
    from pipelines.views import view_dataset
    views = TwoViews(recipe(size), size)
    ray_sides = {"ray": (view_dataset(cache, views, batch), SHUFFLE_BUFFER),
                 "ray_identity": (view_dataset(cache, IdentityViews(), batch), SHUFFLE_BUFFER)}
    if candidates and size <= 64:
        ray_sides["ray_big_tasks"] = (view_dataset(cache, views, 4 * batch), SHUFFLE_BUFFER)
        ray_sides["ray_no_shuffle"] = (ray_sides["ray"][0], None)
    epochs = {s: (lambda ds=ds, buf=buf: timed_epoch(_ray_batches(ds, batch, buf)))
              for s, (ds, buf) in ray_sides.items()}
    for side in LOADERS:
        loader = make_loader(side, images, size, batch, cpus)
        epochs[side] = lambda loader=loader: timed_epoch(loader)
    return epochs, ray_sides["ray"][0]


def measure(size: int, cpus: int, count: int, batch: int, reps: int, workdir: Path,
            candidates: bool = True) -> dict:
    """One (size, CPUs) cell: every side's epochs, interleaved, after one warm-up epoch each."""
    import ray
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(affinity)[:cpus])
    torch.set_num_threads(cpus)
    started = start_ray(cpus)
    try:
        cache, decode_s = decoded_cache(size, count, workdir)
        images = cache.take_batch(cache.count(), batch_format="numpy")["image"]  # (N, S, S, 3)
        epochs, views_ds = epoch_functions(cache, images, size, batch, cpus, candidates)
        warmup = {s: run_epoch() for s, run_epoch in epochs.items()}
        runs = {s: [] for s in epochs}
        for _ in range(reps):
            for s, run_epoch in epochs.items():
                runs[s].append(run_epoch())
        stats = views_ds.stats()
        del epochs
    finally:
        if started:
            ray.shutdown()
        os.sched_setaffinity(0, affinity)
    return _cell(size, cpus, len(images), batch, decode_s, warmup, runs, stats)


def _cell(size, cpus, n, batch, decode_s, warmup, runs, stats) -> dict:
    ips = {s: summary([r["images_per_s"] for r in reps]) for s, reps in runs.items()}
    first = {s: summary([r["first_batch_s"] for r in reps]) for s, reps in runs.items()}
    return {"image_size": size, "cpus": cpus, "images_per_epoch": n, "batch_size": batch,
            "recipe": vars(recipe(size)) | {"crop_scale": list(recipe(size).crop_scale)},
            "decode_s": round(decode_s, 3), "images_per_s": ips, "first_batch_s": first,
            "warmup_images_per_s": {s: round(w["images_per_s"], 1) for s, w in warmup.items()},
            "ratio_ray_vs_loader_same": ratio(ips["ray"]["median"], ips["loader_same"]["median"]),
            "ratio_ray_vs_loader_tv2": ratio(ips["ray"]["median"], ips["loader_tv2"]["median"]),
            "ray_data_stats": views_stats(stats)}


def views_stats(stats: str, lines: int = 40) -> list[str]:
    """Ray Data's own report on the views operator and the iterator (the last Ray epoch)."""
    text = stats.splitlines()
    start = next((i for i, line in enumerate(text) if "ViewsUDF" in line), 0)
    return [line for line in text[start:start + lines] if line.strip()]


def run(sizes=(32, 224), cpus=(1, 2), reps: int = 3, counts: dict | None = None,
        batches: dict | None = None, candidates: bool = True, results_dir=None) -> dict:
    """Every (size, CPUs) cell; writes data_throughput.json and returns its content.
    `candidates`: also measure the candidate changes to the Ray side (`epoch_functions`)."""
    counts = counts or {32: 3800, 224: 384}
    batches = batches or {32: 256, 224: 64}
    cells = []
    with tempfile.TemporaryDirectory(prefix="selfsup-bench-") as tmp:
        for size in sizes:
            for n in cpus:
                before = load_average()
                cell = measure(size, n, counts[size], batches[size], reps, Path(tmp), candidates)
                cells.append({**cell, "load_before": before, "load_after": load_average()})
    result = {"target": "ratio_ray_vs_loader_same >= 1.0", "reps": reps,
              "shuffle_buffer": SHUFFLE_BUFFER, "prefetch": PREFETCH, "cells": cells}
    write_result("data_throughput", result, results_dir)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--count32", type=int, default=3800)
    p.add_argument("--count224", type=int, default=384)
    p.add_argument("--results-dir", default=None)
    a = p.parse_args()
    run(tuple(a.sizes), tuple(a.cpus), a.reps, {32: a.count32, 224: a.count224},
        results_dir=a.results_dir)


if __name__ == "__main__":
    main()
