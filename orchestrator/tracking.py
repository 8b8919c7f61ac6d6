"""What a run records: TensorBoard events, metrics.jsonl (our own record — Ray's `Result.metrics`
can be None: one line per epoch, and one for an epoch that `max_steps` cut short) and the progress
lines the CLI prints: one per epoch, more inside a long epoch, and one for the first step."""
from __future__ import annotations

import json
import os
import time

import torch


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_line(r: dict) -> str:
    """A record from rank 0 as one line:

    epoch 3/30  loss 4.1234  812 img/s  ETA 1m12s                          an epoch's end
    epoch 1/3  step 120/781 (15%)  loss 4.1234  812 img/s  ETA 12m30s      inside an epoch
    first step after 21.3 s                                                 after a (re)start
    ETA is the whole run's.
    """
    if "epoch" not in r:
        return f"first step after {r['first_step_s']:.1f} s"
    if "epoch_step" in r:
        where = (f"  step {r['epoch_step']}/{r['epoch_steps']} "
                 f"({100 * r['epoch_step'] // r['epoch_steps']}%)")
    else:
        where = ""
    shown = {**r.get("metrics", {}), **{k: v for k, v in r.get("online", {}).items()
                                        if k in ("knn_top1", "embed_std_ratio")}}
    extra = "  ".join(f"{k} {v:.3f}" for k, v in shown.items())
    return (f"epoch {r['epoch'] + 1}/{r['epochs']}{where}  loss {r['loss']:.4f}  "
            f"{r['images_per_s']:.0f} img/s  ETA {fmt_seconds(r['eta_s'])}"
            + (f"  {extra}" if extra else ""))


class RunLogger:
    """Rank 0's writer: TensorBoard scalars/images and metrics.jsonl under the run directory."""

    def __init__(self, run_dir: str, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter
        self.run_dir = run_dir
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge_step)
        self.started = time.time()

    def step(self, step: int, lr: float, values: dict) -> None:
        self.writer.add_scalar("train/lr", lr, step)
        for k, v in values.items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def progress(self, record: dict) -> None:
        """An in-epoch progress record: its images/s, on the same curve as the epochs'."""
        self.writer.add_scalar("train/images_per_s", record["images_per_s"], record["step"])

    def images(self, step: int, images: dict[str, torch.Tensor]) -> None:
        for tag, x in images.items():
            x = x.detach().cpu()
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float().clamp(0, 1)
            self.writer.add_images(tag, x, step)

    def epoch(self, record: dict) -> None:
        self.writer.add_scalar("train/epoch_loss", record["loss"], record["step"])
        self.writer.add_scalar("train/images_per_s", record["images_per_s"], record["step"])
        for k, v in record.get("online", {}).items():
            self.writer.add_scalar(f"online/{k}", v, record["step"])
        self.writer.flush()
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.writer.close()


def read_records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
