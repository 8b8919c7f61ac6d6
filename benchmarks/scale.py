"""Data at scale: folders of 10k, 100k and 1M images through selfsup, beside torchvision.

Writes benchmarks/results/scale.json. Folders are made by benchmarks/make_folders.py from the
photographs bundled with scikit-image (10 class sub-folders, class after class, 64 px JPEGs) and
kept in .cache/scale/; the 1M folder is hard links to the 100k one's files (listed only).

- listing: seconds to list each folder, selfsup's listing against torchvision's `make_dataset`
  (what `ImageFolder` does first), and seconds per thousand files (flat = linear);
- runs: `selfsup run configs/simclr.yaml` on the 10k and 100k folders with the same settings
  (32 px, streamed, a 1 GiB object store, RUN_STEPS steps), and on the embedded digits (Ray's own
  start-up with the same trainer): command to data ready (the `data:` line) and to the first
  training step, peak memory in use above idle (all processes, sampled every 0.25 s), MiB the
  object store spilled to disk;
- loader: a plain `ImageFolder` + `DataLoader` (2 workers, two-view v2 augmentation at 32 px) on
  the same folders, command to first batch;
- entropy: the label entropy of 256-image training batches drawn from the class-sorted 100k
  folder the way a Train worker draws them (streamed, 1,024-row local shuffle buffer).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from benchmarks.common import RESULTS_DIR, ROOT, load_average, machine
from benchmarks.make_folders import link_folder, make_folder

CACHE = ROOT / ".cache" / "scale"
SIZES = (10_000, 100_000)
LISTED_ONLY = 1_000_000
RUN_STEPS = 30
TARGETS = {"first_step_over_ray_s": 30.0, "memory_ratio": 1.5, "entropy_share": 0.95}


def used_mb() -> float:
    """System memory in use (MemTotal - MemAvailable), MiB."""
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0])
    return (fields["MemTotal"] - fields["MemAvailable"]) / 1024


def idle_mb(seconds: float = 3.0) -> float:
    samples = []
    end = time.time() + seconds
    while time.time() < end:
        samples.append(used_mb())
        time.sleep(0.25)
    return min(samples)


def timed_command(argv: list[str], marks: dict[str, str]) -> dict:
    """Run argv; the seconds from start until each `marks` substring first appears in its output,
    the peak memory in use above idle while it ran, its wall time and its exit code."""
    idle = idle_mb()
    start = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    peak, seen, lines = [idle], {}, []

    def sample() -> None:
        while proc.poll() is None:
            peak.append(used_mb())
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        lines.append(line.rstrip())
        for name, text in marks.items():
            if name not in seen and text in line:
                seen[name] = round(time.time() - start, 1)
    proc.wait()
    sampler.join()
    return {"seconds_to": seen, "wall_s": round(time.time() - start, 1),
            "peak_above_idle_mb": round(max(peak) - idle), "returncode": proc.returncode,
            "tail": lines[-5:]}


def selfsup_run(source: str, name: str) -> dict:
    out = CACHE / "runs"
    sets = [f"data.source={source}", "data.image_size=32", "data.cache=none",
            "train.epochs=1", f"train.max_steps={RUN_STEPS}", "train.batch_size=128",
            "eval.stages=[]", "eval.online_every=0", "cluster.object_store_mb=1024",
            f"output.dir={out}"]
    argv = [sys.executable, "-m", "orchestrator.cli", "run", "configs/simclr.yaml",
            *[w for s in sets for w in ("--set", s)], "--name", name]
    subprocess.run(["rm", "-rf", str(out / name)])
    result = timed_command(argv, {"data_ready": "data: ", "first_step": "first step after"})
    summary = json.loads((out / name / "summary.json").read_text()) \
        if (out / name / "summary.json").exists() else {}
    train = summary.get("train", {})
    result.update(steps=train.get("steps"), first_step_s=train.get("first_step_s"),
                  spilled_mb=train.get("object_store_spilled_mb"), streamed=train.get("streamed"))
    return result


LOADER = """
import sys, time, torch
from torchvision import datasets
from torchvision.transforms import v2
aug = v2.Compose([v2.RandomResizedCrop(32), v2.RandomHorizontalFlip(),
                  v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                  v2.RandomGrayscale(0.2), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
ds = datasets.ImageFolder(sys.argv[1], transform=lambda im: (aug(im), aug(im)))
loader = torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True, num_workers=2)
next(iter(loader))
print("first batch", flush=True)
"""


def loader_first_batch(folder: str) -> dict:
    return timed_command([sys.executable, "-c", LOADER, folder], {"first_batch": "first batch"})


def listings(folders: dict[int, str]) -> dict:
    """Seconds to list each folder: selfsup's listing (threads over class folders) and
    torchvision's `make_dataset` (one thread)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    from pipelines.listing import list_source
    from pipelines.sources import inspect_source
    out = {}
    for n, folder in folders.items():
        start = time.perf_counter()
        info = inspect_source(f"folder:{folder}")
        rows = list_source(info, None).table.num_rows
        ours = time.perf_counter() - start
        start = time.perf_counter()
        classes = {c: i for i, c in enumerate(sorted(d for d in os.listdir(folder)
                                                       if not d.startswith(".")))}
        theirs = len(make_dataset(folder, classes, IMG_EXTENSIONS))
        tv = time.perf_counter() - start
        out[str(n)] = {"files": rows, "selfsup_s": round(ours, 2), "torchvision_s": round(tv, 2),
                       "selfsup_s_per_1k": round(ours / rows * 1000, 4),
                       "torchvision_files": theirs}
    return out


def batch_entropy(folder: str, batches: int = 40) -> dict:
    """Median label entropy of training batches from a class-sorted folder, drawn as the worker
    draws them: the streamed pretraining split with a 1,024-row local shuffle buffer (the views
    map rows one to one and drop the label, so it is read before them)."""
    import numpy as np
    import ray

    from methods.config import build
    from pipelines.data import DataConfig, load_splits
    ray.init(num_cpus=2, object_store_memory=1024 * 2**20, include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = build(DataConfig, {"source": f"folder:{folder}", "image_size": 32, "cache": "none"},
                "data")
    splits = load_splits(cfg, need_labels=False)
    entropies = []
    for batch in splits.pretrain.iter_batches(batch_size=256, local_shuffle_buffer_size=1024,
                                    drop_last=True):
        p = np.bincount(batch["label"].astype(np.int64), minlength=10) / 256
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
        if len(entropies) == batches:
            break
    ray.shutdown()
    return {"batches": len(entropies), "median_nats": round(float(np.median(entropies)), 3),
            "min_nats": round(min(entropies), 3), "log_classes": round(float(np.log(10)), 3),
            "share_of_log_classes": round(float(np.median(entropies) / np.log(10)), 3)}


def main() -> int:
    CACHE.mkdir(parents=True, exist_ok=True)
    folders = {n: make_folder(CACHE / f"folder-{n}", n) for n in SIZES}
    folders[LISTED_ONLY] = link_folder(folders[SIZES[-1]], CACHE / f"folder-{LISTED_ONLY}",
                                       LISTED_ONLY)
    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
              "load_before": load_average(), "run_steps": RUN_STEPS, "targets": TARGETS}
    result["listing"] = listings(folders)
    result["runs"] = {"digits": selfsup_run("digits", "scale-digits")}
    result["loader"] = {}
    for n in SIZES:
        result["runs"][str(n)] = selfsup_run(f"folder:{folders[n]}", f"scale-{n}")
        result["loader"][str(n)] = loader_first_batch(folders[n])
    result["entropy"] = batch_entropy(folders[SIZES[-1]])
    runs = result["runs"]
    ray_start = runs["digits"]["seconds_to"].get("first_step", float("nan"))
    big, small = runs[str(SIZES[-1])], runs[str(SIZES[0])]
    result["summary"] = {
        "first_step_100k_s": big["seconds_to"].get("first_step"),
        "ray_startup_first_step_s": ray_start,
        "first_step_over_ray_s": round(big["seconds_to"].get("first_step", float("nan"))
                                       - ray_start, 1),
        "memory_ratio_100k_vs_10k": round(big["peak_above_idle_mb"]
                                          / max(small["peak_above_idle_mb"], 1), 2),
        "spilled_mb": {k: r.get("spilled_mb") for k, r in runs.items()},
    }
    result["load_after"] = load_average()
    (RESULTS_DIR / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
