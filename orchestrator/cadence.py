"""What Ray Train workers do between steps: progress lines, mid-epoch checkpoints, stops.

`ray.train.report` is a barrier that every worker must reach the same number of times, so a
checkpoint inside an epoch is decided by all workers together. Every `log_every` steps rank 0
reads its clock (`checkpoint_every_minutes`) and the driver's stop flag (SIGTERM, Ctrl-C), and
broadcasts its decision. Every few seconds (by rank 0's clock, so in the same decision on every
worker) they also ask Ray whether a node is about to be preempted: a barrier through Ray's
synchronisation actor, a few ms, too slow for every decision. Checkpoints every
`checkpoint_every_steps` need no agreement: every worker counts the same steps. Progress lines and
the first-step line are rank 0's alone; reading the loss back for them synchronises a GPU, so that
happens only when one is due.
"""
from __future__ import annotations

import time
from typing import Callable

import ray.train
import torch

from methods.distributed import broadcast_
from orchestrator.interrupt import StopPoll
from pipelines.train_loop import Plan, TrainConfig

CHECKPOINT, STOP, ASK_RAY = 1, 2, 4  # bits of the decision rank 0 broadcasts
PREEMPTION_EVERY_S = 5.0


class Cadence:
    """The `on_step_end` hook of `train_epoch` on every worker. Rank 0 alone has `log` (its
    RunLogger), `progress` (the driver's queue), `stop` and `started` (the driver's start time);
    `save(record)` reports a mid-epoch record with a checkpoint, on every worker."""

    def __init__(self, t: TrainConfig, plan: Plan, *, rank: int, device: torch.device,
                 save: Callable[[dict], None], log=None, progress=None,
                 stop: StopPoll | None = None, started: float | None = None):
        self.t, self.plan, self.rank, self.device, self._save = t, plan, rank, device, save
        self.log, self.progress, self.stop, self.started = log, progress, stop, started
        self.first_step_s: float | None = None
        self.stopping = self.pending = self.preempted = False
        self.last_save = self.asked_ray = time.monotonic()
        self.epoch = self.epoch_step = 0
        self.window_start: float | None = None

    def start_epoch(self, epoch: int, epoch_step: int) -> None:
        self.epoch, self.epoch_step = epoch, epoch_step
        self.window_start = None  # from the end of the pass's first step: it waits for data

    def saved(self) -> None:
        self.pending, self.last_save = False, time.monotonic()

    def __call__(self, step: int, lr: float, loss: torch.Tensor, metrics: dict) -> bool:
        self.epoch_step += 1
        if self.rank == 0:
            self._rank0(step, lr, loss, metrics)
            if self.stop is not None:
                self.stop.requested()  # keeps the driver's answer fresh; cheap
        every = self.t.checkpoint_every_steps
        due = bool(every) and step % every == 0
        if step % self.t.log_every == 0:
            flags = self._agree()
            due, self.stopping = due or bool(flags & CHECKPOINT), bool(flags & STOP)
        if self.stopping:
            return True  # the caller saves at this step and returns
        if due and self.epoch_step < self.plan.epoch_steps(self.epoch):
            self._save({"epoch": self.epoch, "epochs": self.plan.epochs, "step": step,
                        "epoch_step": self.epoch_step, "loss": float(loss)})
            self.saved()
        elif due:
            self.pending = True  # the epoch ends here: its own checkpoint comes next
        return False

    def _agree(self) -> int:
        flags, now = 0, time.monotonic()
        if self.rank == 0:
            minutes = self.t.checkpoint_every_minutes
            if minutes and now - self.last_save >= minutes * 60:
                flags |= CHECKPOINT
            if self.stop is not None and self.stop.requested():
                flags |= STOP
            if now - self.asked_ray >= PREEMPTION_EVERY_S:
                flags, self.asked_ray = flags | ASK_RAY, now
        flags = int(broadcast_(torch.tensor(flags, device=self.device)).item())
        if flags & ASK_RAY:
            # a node about to be reclaimed: save once and train on (Ray restarts the run from it)
            preempted = ray.train.get_preemption_info() is not None
            if preempted and not self.preempted:
                flags |= CHECKPOINT
            self.preempted = preempted
        return flags

    def _rank0(self, step: int, lr: float, loss: torch.Tensor, metrics: dict) -> None:
        if self.first_step_s is None and self.started is not None:
            # the driver's clock against this worker's: the same machine, or clocks kept in sync
            self.first_step_s = time.time() - self.started
            self._put({"first_step_s": self.first_step_s})
        if step % self.t.log_every == 0 and self.log is not None:
            self.log.step(step, lr, {"loss": float(loss),
                                     **{k: float(v) for k, v in metrics.items()}})
        if self.window_start is None:
            self._window()
            return
        self.loss_sum += loss.float()
        self.window_steps += 1
        now, t = time.monotonic(), self.t
        due = (t.progress_every_s and now - self.window_start >= t.progress_every_s) or \
            (t.progress_every_steps and step % t.progress_every_steps == 0)
        if due and self.epoch_step < self.plan.epoch_steps(self.epoch):  # else the epoch's line
            seconds = now - self.window_start
            record = {"epoch": self.epoch, "epochs": self.plan.epochs, "step": step,
                      "epoch_step": self.epoch_step,
                      "epoch_steps": self.plan.epoch_steps(self.epoch),
                      "loss": float(self.loss_sum) / self.window_steps,
                      "images_per_s": self.window_steps * t.batch_size / max(seconds, 1e-9),
                      "eta_s": (self.plan.total - step) * seconds / self.window_steps}
            if self.log is not None:
                self.log.progress(record)
            self._put(record)
            self._window()

    def _window(self) -> None:
        self.window_start = time.monotonic()
        self.loss_sum = torch.zeros((), device=self.device)
        self.window_steps = 0

    def _put(self, record: dict) -> None:
        if self.progress is not None:
            self.progress.put(record)
