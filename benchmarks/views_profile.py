"""Where a views task spends its time: cProfile of the Ray Data views UDF on one core.

`pipelines.views.ViewsUDF` wrapping SimCLR's `TwoViews` (Chen et al., 2020, arXiv:2002.05709) is
called on real batches, single-threaded as in a 1-CPU Ray Data task, under cProfile; the
cumulative time of each augmentation step and of the UDF's own copies is reported per image and
as a share of the call. 32 px: digits upscaled, batch 256; 224 px: crops of the scenes
photographs, batch 64 (the recipes of benchmarks/data_throughput.py).

Each profile runs in a fresh process twice, alternating: as a Ray worker starts today, and with
glibc's malloc told to use transparent huge pages (`HUGEPAGES`). A float batch of 64 images at
224 px is 38 MB, above glibc's largest mmap threshold (32 MB), so every such temporary is a fresh
mapping whose 4 kB pages fault in one by one; the minor page faults per image are recorded.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks.common import ROOT, load_average, median, write_result
from benchmarks.data_throughput import recipe

# glibc (>= 2.35) backs malloc's large blocks with transparent huge pages: one page fault per 2 MB
# instead of one per 4 kB for the batch-sized temporaries of every augmentation op.
HUGEPAGES = {"env_vars": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}}
# (label, module file suffix, function name): the steps of one `augment_view` call and the UDF's
STEPS = [("udf_call_total", "pipelines/views.py", "__call__"),
         ("two_views_total", "methods/views.py", "__call__"),
         ("to_float", "methods/augment.py", "to_float"),
         ("random_resized_crop", "methods/augment.py", "random_resized_crop"),
         ("random_hflip", "methods/augment.py", "random_hflip"),
         ("color_jitter", "methods/augment.py", "color_jitter"),
         ("  brightness", "methods/augment.py", "_brightness"),
         ("  contrast", "methods/augment.py", "_contrast"),
         ("  saturation", "methods/augment.py", "_saturation"),
         ("  hue", "methods/augment.py", "_hue"),
         ("random_grayscale", "methods/augment.py", "random_grayscale"),
         ("random_gaussian_blur", "methods/augment.py", "random_gaussian_blur"),
         ("to_uint8", "methods/augment.py", "to_uint8"),
         ("udf_input_copy", "~", "<built-in method numpy.ascontiguousarray>"),
         ("tensor_contiguous", "~", "<method 'contiguous' of 'torch._C.TensorBase' objects>"),
         ("output_to_numpy", "~", "<method 'numpy' of 'torch._C.TensorBase' objects>")]


def sample_images(size: int, count: int, seed: int = 0) -> np.ndarray:
    """uint8 (count, size, size, 3): digits upscaled (size <= 64) or scenes photograph crops."""
    from PIL import Image
    from pipelines.decode import square_resize
    rng = np.random.default_rng(seed)
    if size <= 64:
        from pipelines.sources import load_digits
        digits = load_digits()["images"]
        pick = rng.integers(0, len(digits), count)
        return np.stack([square_resize(Image.fromarray(digits[i]).convert("RGB"), size)
                         for i in pick])
    from pipelines.scenes import PHOTOS, load_photo
    photos = [load_photo(name) for name in PHOTOS]
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(min(rng.integers(256, 449), *photo.shape[:2]))
        y = rng.integers(0, photo.shape[0] - side + 1)
        x = rng.integers(0, photo.shape[1] - side + 1)
        crops.append(square_resize(Image.fromarray(photo[y:y + side, x:x + side]), size))
    return np.stack(crops)


def _cumulative(stats: pstats.Stats, file_suffix: str, name: str) -> float:
    total = 0.0
    for (path, _, func), (_, _, _, cumtime, _) in stats.stats.items():
        if func == name and path.endswith(file_suffix):
            total += cumtime
    return total


def profile(size: int, batch: int, calls: int) -> dict:
    """Profile `calls` UDF calls on batches of `batch` images of `size` px, one thread."""
    from methods.views import TwoViews
    from pipelines.views import ViewsUDF
    torch.set_num_threads(1)
    udf = ViewsUDF(TwoViews(recipe(size), size))
    batches = [{"image": sample_images(size, batch, seed)} for seed in range(calls + 1)]
    udf(batches[0])  # warm-up: first-call allocations and kernel selection
    profiler = cProfile.Profile()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    profiler.enable()
    for b in batches[1:]:
        udf(b)
    profiler.disable()
    wall = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    stats = pstats.Stats(profiler)
    images = batch * calls
    total = _cumulative(stats, *STEPS[0][1:]) or wall
    steps = {label.strip(): {"us_per_image": round(1e6 * t / images, 1),
                             "share": round(t / total, 3)}
             for label, suffix, name in STEPS
             if (t := _cumulative(stats, suffix, name)) > 0}
    return {"image_size": size, "batch_size": batch, "calls": calls,
            "images_per_s_one_core": round(images / wall, 1),
            "minor_faults_per_image": round(faults / images, 1), "steps": steps}


def launch(cell: tuple[int, int, int], env: dict) -> dict:
    """`profile(*cell)` in a fresh process with `env` added to its environment."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.views_profile", "--child",
                          *map(str, cell)], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(cells=((32, 256, 8), (224, 64, 4)), reps: int = 2, results_dir=None) -> dict:
    """Profile each (size, batch, calls) `reps` times per environment, alternating; write
    views_profile.json (the median run of today's environment, and both speeds) and return it."""
    before = load_average()
    envs = {"default": {}, "hugepages": HUGEPAGES["env_vars"]}
    out, speed = [], {}
    for cell in cells:
        runs = {name: [] for name in envs}
        for _ in range(reps):
            for name, env in envs.items():
                runs[name].append(launch(cell, env))
        ranked = sorted(runs["default"], key=lambda r: r["images_per_s_one_core"])
        out.append(ranked[(len(ranked) - 1) // 2])
        speed[cell[0]] = {name: {
            "images_per_s_one_core": median([r["images_per_s_one_core"] for r in rs]),
            "minor_faults_per_image": median([r["minor_faults_per_image"] for r in rs])}
            for name, rs in runs.items()}
    result = {"cells": out, "hugepages_env": HUGEPAGES["env_vars"], "by_environment": speed,
              "reps": reps, "load_before": before, "load_after": load_average()}
    write_result("views_profile", result, results_dir)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=3, type=int, metavar=("SIZE", "BATCH", "CALLS"),
                   help=argparse.SUPPRESS)
    p.add_argument("--results-dir", default=None)
    a = p.parse_args()
    if a.child:
        print(json.dumps(profile(*a.child)))
    else:
        run(results_dir=a.results_dir)


if __name__ == "__main__":
    main()
