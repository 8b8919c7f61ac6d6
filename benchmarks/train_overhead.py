"""What Ray costs a training run: `selfsup run` (TorchTrainer + Ray Data, 1 worker) against the plain
loop (`fit_plain`) on the same method, config and images, and the time from command to first step.

Both sides run the demo config (configs/simclr.yaml: SimCLR, Chen et al., 2020, arXiv:2002.05709,
on the digits' pretraining split) in fresh processes, alternating, several times. Steady state is
each run's epochs after the first (`metrics.jsonl`'s `images_per_s` for Ray, `EpochStats` for the
plain loop: both count images over the epoch's wall time, views included).

Time to first step, without a hook in the orchestrator: the run is started with
`train.log_every=1`, so rank 0 writes the TensorBoard scalar `train/loss` at step 1, right after the
first optimiser step; every event carries the wall-clock time it was made (same machine, same clock
as the launch time taken here). The first `views/*` image event is written when the first batch
reaches the worker, before its forward pass, and the CLI's `data:` line when the datasets are
built; together they split the wait into start-up + data, trainer start-up + first batch, and the
first step itself.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, load_average, median, ratio, summary, write_result

CONFIG = "configs/simclr.yaml"


def run_overrides(epochs: int, output_dir: str) -> list[str]:
    """The demo config, trained only (no evaluation), with the step-1 marker on."""
    sets = [f"train.epochs={epochs}", "eval.stages=[]", "eval.online_every=0",
            f"train.checkpoint_every={epochs}", "train.log_every=1", f"output.dir={output_dir}"]
    return [arg for s in sets for arg in ("--set", s)]


def selfsup_command() -> list[str]:
    """The installed `selfsup` script beside this Python, else the same entry point via -m."""
    script = Path(sys.executable).with_name("selfsup")
    return [str(script)] if script.exists() else [sys.executable, "-m", "orchestrator.cli"]


def first_events(tensorboard_dir: Path) -> dict:
    """Wall times of the first image event and of the step-1 `train/loss` scalar."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    found: dict = {}
    for path in sorted(tensorboard_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag.startswith("views/"):
                    found.setdefault("first_batch", event.wall_time)
                if value.tag == "train/loss" and event.step == 1:
                    found.setdefault("first_step", event.wall_time)
    return found


def launch_run(output_dir: Path, name: str, epochs: int, command: list[str] | None = None,
               timeout: float = 600) -> dict:
    """Run `selfsup run` as a user would; time its stages from the outside and from its records."""
    args = (command or selfsup_command()) + ["run", CONFIG, "--name", name] + \
        run_overrides(epochs, str(output_dir))
    launched = time.time()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    data_line, lines = None, []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if data_line is None and line.startswith("data:"):
            data_line = time.time()
    code = proc.wait(timeout=timeout)
    finished = time.time()
    if code != 0:
        raise RuntimeError(f"selfsup run exited {code}:\n" + "\n".join(lines[-30:]))
    run_dir = output_dir / name
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    events = first_events(run_dir / "tensorboard")
    since = {k: round(v - launched, 3) for k, v in events.items()}
    return {"epochs_images_per_s": [r["images_per_s"] for r in records],
            "data_ready_s": round(data_line - launched, 3) if data_line else None,
            "first_batch_s": since.get("first_batch"), "first_step_s": since.get("first_step"),
            "total_s": round(finished - launched, 3)}


def plain_epochs(epochs: int, threads: int | None = None) -> list[float]:
    """`fit_plain` on the same config and images as `selfsup run`; images/s of each epoch.

    Threads: every local CPU by default, as the single Train worker gets; `threads=1` is the plain
    loop's best setting on a busy machine (small augmentation ops do not wait at thread barriers).
    """
    import torch
    import methods
    from orchestrator.config import load_config
    from pipelines.train_loop import fit_plain
    overrides = [s for s in run_overrides(epochs, tempfile.gettempdir()) if s != "--set"]
    cfg = load_config(str(ROOT / CONFIG), overrides)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.train.seed)
    spec = methods.get(cfg.method_name)
    model = spec.model(cfg.method, cfg.backbone, cfg.data.image_size)
    images = pretrain_images(cfg.data)
    history = fit_plain(model, spec.views(cfg.method, cfg.data.image_size), images, cfg.train)
    return [h.images_per_s for h in history]


def pretrain_images(data_cfg):
    """The digits' pretraining split as `load_splits` makes it, without Ray: uint8 (N, S, S, 3)."""
    import numpy as np
    from PIL import Image
    from pipelines.data import stratified_test_keys
    from pipelines.decode import square_resize
    from pipelines.sources import load_digits
    if data_cfg.source != "digits":
        raise ValueError(f"the overhead benchmark uses the digits source, not {data_cfg.source}")
    digits = load_digits()
    keys = np.array([f"digits/{i:06d}" for i in range(len(digits["labels"]))])
    test = stratified_test_keys(keys, digits["labels"], data_cfg.test_fraction, data_cfg.seed)
    keep = [i for i, k in enumerate(keys) if k not in test]
    return np.stack([square_resize(Image.fromarray(digits["images"][i]).convert("RGB"),
                                   data_cfg.image_size) for i in keep])  # (N, S, S, 3)


def launch_plain(epochs: int, threads: int = 0, timeout: float = 600) -> list[float]:
    """`plain_epochs` in a fresh process, as `selfsup run` gets one (threads 0: every CPU)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.train_overhead", "--plain-child",
                          "--epochs", str(epochs), "--threads", str(threads)], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cli_start_s() -> float:
    """Wall time of `selfsup run CONFIG --print-config`: interpreter, imports and config only."""
    start = time.time()
    subprocess.run(selfsup_command() + ["run", CONFIG, "--print-config"], cwd=ROOT, check=True,
                   capture_output=True)
    return round(time.time() - start, 3)


def run(reps: int = 2, epochs: int = 6, command: list[str] | None = None, plain=None,
        results_dir=None) -> dict:
    """Alternate Ray runs and plain runs; write train_overhead.json and return its content."""
    before = load_average()
    ray_runs, plain_runs, plain1_runs = [], [], []
    with tempfile.TemporaryDirectory(prefix="selfsup-bench-") as tmp:
        for i in range(reps):
            ray_runs.append(launch_run(Path(tmp), f"overhead-{i}", epochs, command))
            plain_runs.append((plain or launch_plain)(epochs))
            plain1_runs.append((plain or launch_plain)(epochs, 1))
    steady_ray = [x for r in ray_runs for x in r["epochs_images_per_s"][1:]]
    steady_plain = [x for p in plain_runs for x in p[1:]]
    steady_plain1 = [x for p in plain1_runs for x in p[1:]]
    # A run's threads can land in a slow mode for the whole run (seen here: 42 against 1,200
    # img/s, every epoch); the headline compares with the plain loop's best run.
    best_plain = max(median(p[1:]) for p in plain_runs + plain1_runs)
    first = [r["first_step_s"] for r in ray_runs if r["first_step_s"] is not None]
    result = {
        "targets": {"ratio": ">= 0.90", "first_step_s": "<= 20 on 2 cores"},
        "config": CONFIG, "epochs_per_run": epochs, "reps": reps,
        "ray_images_per_s": summary(steady_ray), "plain_images_per_s": summary(steady_plain),
        "ratio_ray_vs_plain": ratio(median(steady_ray), median(steady_plain)),
        "plain_best_run_images_per_s": round(best_plain, 1),
        "ratio_ray_vs_plain_best_run": ratio(median(steady_ray), best_plain),
        "plain_1_thread_images_per_s": summary(steady_plain1),
        "ratio_ray_vs_plain_1_thread": ratio(median(steady_ray), median(steady_plain1)),
        "first_step_s": summary(first),
        "cli_start_s": cli_start_s() if command is None else None,
        "ray_runs": ray_runs, "plain_runs": [[round(x, 1) for x in p] for p in plain_runs],
        "plain_1_thread_runs": [[round(x, 1) for x in p] for p in plain1_runs],
        "load_before": before, "load_after": load_average()}
    write_result("train_overhead", result, results_dir)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--plain-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--results-dir", default=None)
    a = p.parse_args()
    if a.plain_child:
        print(json.dumps(plain_epochs(a.epochs, a.threads or None)))
    else:
        run(a.reps, a.epochs, results_dir=a.results_dir)


if __name__ == "__main__":
    main()
