"""Peak memory of MoCo's queue against SimCLR's batch for the same number of negatives.

MoCo v2 (Chen, Fan, Girshick, He, 2020, arXiv:2003.04297, table 3) reports per-GPU memory on
ImageNet with ResNet-50: MoCo at batch 256 with its queue 5.0 GB, the end-to-end mechanism
(SimCLR's, Chen et al., 2020, arXiv:2002.05709) 7.4 GB at batch 256 and about 93 GB at batch 4096.
Here: MoCo v2 at batch 256 with a queue of 4096 keys against SimCLR at batch 4096 (and 256), with
resnet_small at 16 px on CPU.

Each case runs in a fresh process: build the model and optimiser, run one warm-up step on 8 images
(optimiser state, kernel caches, the first allocations), read the peak resident set size
(`ru_maxrss`), run one training step of the real loop (`train_epoch`: forward, backward,
optimiser, `on_step`), read it again. The difference is what one step of that batch adds on top
of the model's steady state: activations kept for backward, gradients of the activations, the
similarity matrix, the queue's logits. The absolute peak also holds the interpreter and torch's
libraries (several hundred MB), which a GPU's memory does not, so the difference is the figure to
compare with the paper's ratio; both are recorded.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from benchmarks.common import ROOT, load_average, ratio, write_result

# (case name, method, batch size, queue size or None)
CASES = [("moco_v2_b256_q4096", "moco_v2", 256, 4096),
         ("simclr_b256", "simclr", 256, None),
         ("simclr_b4096", "simclr", 4096, None)]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def one_step(method: str, batch: int, queue: int | None, size: int, width: int) -> dict:
    """Peak RSS before and after one training step of `method` at `batch` (this process)."""
    import torch
    import methods
    from methods.backbones import BackboneConfig
    from pipelines.train_loop import TrainConfig, build_optimizer, train_epoch
    torch.manual_seed(0)
    torch.set_num_threads(1)  # memory does not depend on it; run time on a shared machine does
    spec = methods.get(method)
    cfg = spec.config(queue_size=queue) if queue else spec.config()
    model = spec.model(cfg, BackboneConfig(name="resnet_small", width=width), size)
    train = TrainConfig(batch_size=batch, warmup_epochs=0)
    optimizer = build_optimizer(model, train)

    def step(n: int) -> float:
        views = {k: torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
                 for k in ("view1", "view2")}  # (n, 3, S, S) each
        start = time.perf_counter()
        train_epoch(model, optimizer, [views], train, step=0, total_steps=2, steps_per_epoch=1,
                    device=torch.device("cpu"))
        return time.perf_counter() - start

    step(8)
    baseline = peak_mb()
    seconds = step(batch)
    peak = peak_mb()
    negatives = queue if queue else 2 * batch - 2  # NT-Xent: the 2B - 2 other views of the batch
    return {"method": method, "batch_size": batch, "queue_size": queue, "negatives": negatives,
            "image_size": size, "width": width, "baseline_mb": round(baseline, 1),
            "peak_mb": round(peak, 1), "step_mb": round(peak - baseline, 1),
            "step_s": round(seconds, 3),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}


def measure(method: str, batch: int, queue: int | None, size: int, width: int,
            timeout: float = 600) -> dict:
    """`one_step` in a fresh process, so no earlier case's peak is counted."""
    args = [sys.executable, "-m", "benchmarks.memory_negatives", "--child", method,
            "--batch", str(batch), "--size", str(size), "--width", str(width)]
    if queue:
        args += ["--queue", str(queue)]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(cases=CASES, size: int = 16, width: int = 16, results_dir=None) -> dict:
    """Every case; writes memory_negatives.json and returns its content."""
    before = load_average()
    results = {name: measure(method, batch, queue, size, width)
               for name, method, batch, queue in cases}
    moco, big = results[cases[0][0]], results[cases[-1][0]]
    result = {"cases": results,
              "ratio_step_mb": ratio(big["step_mb"], moco["step_mb"]),
              "ratio_peak_mb": ratio(big["peak_mb"], moco["peak_mb"]),
              "paper": {"moco_b256_gb": 5.0, "end_to_end_b256_gb": 7.4,
                        "end_to_end_b4096_gb": 93.0, "ratio": round(93.0 / 5.0, 2),
                        "source": "MoCo v2, arXiv:2003.04297, table 3 (8 V100, ResNet-50)"},
              "load_before": before, "load_after": load_average()}
    write_result("memory_negatives", result, results_dir)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", metavar="METHOD", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--queue", type=int, default=None)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--results-dir", default=None)
    a = p.parse_args()
    if a.child:
        print(json.dumps(one_step(a.child, a.batch, a.queue, a.size, a.width)))
    else:
        run(size=a.size, width=a.width, results_dir=a.results_dir)


if __name__ == "__main__":
    main()
