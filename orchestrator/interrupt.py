"""Stopping a run cleanly: SIGTERM and the first Ctrl-C become a stop the workers act on.

SIGTERM is what `timeout`, SLURM and Kubernetes send before they kill a job. Left to Ray, the
driver prints a native stack dump and aborts, and the running epoch is lost. `selfsup run`
replaces that handler (after `ray.init`, which installs Ray's) by one that raises `Terminated` in
the main thread, as Ctrl-C raises KeyboardInterrupt. The main thread waits on `trainer.fit()`
(orchestrator/train.py), catches either, and sets a `StopFlag`: a tiny actor on the driver's node
that rank 0 polls between steps without waiting for the answer. The workers then agree to stop
(orchestrator/cadence.py), save a checkpoint at the current step, report and return, and the
driver exits with 128 + the signal's number, saying how to resume.

This module imports only Ray: the flag's actor process loads it, and nothing heavier.
"""
from __future__ import annotations

import signal
import threading
import time

import ray


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (a BaseException, like KeyboardInterrupt)."""


class Interrupted(Exception):
    """Training stopped on a signal; `checkpoint` is the newest one written (None: none yet)."""

    def __init__(self, signum: int, checkpoint: str | None):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.checkpoint = signum, checkpoint


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises `Terminated` in the main thread (call it from there, after
    `ray.init`: the handler installed last is the one that runs)."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def handling_signals() -> bool:
    """Whether signals reach this thread as exceptions it can turn into a stop: the main thread
    of a process that called `raise_on_sigterm` (`selfsup run`; not a sweep trial's task)."""
    return (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is _raise_terminated)


@ray.remote(num_cpus=0)
class StopFlag:
    """Set by the driver when asked to stop; read by rank 0 between steps."""

    def __init__(self):
        self.reason = ""

    def request(self, reason: str) -> None:
        self.reason = reason

    def get(self) -> str:
        return self.reason


class StopPoll:
    """Rank 0's view of a StopFlag, looked at after every step: it takes the flag's answer if it
    has come and asks again at most every `every_s` seconds, so a step never waits on the driver
    and the answer is at most that old."""

    def __init__(self, flag, every_s: float = 0.5):
        self.flag, self.every_s = flag, every_s
        self.pending, self.next_ask, self.seen = None, 0.0, False

    def requested(self) -> bool:
        if self.seen or self.flag is None:
            return self.seen
        if self.pending is not None:
            ready, _ = ray.wait([self.pending], timeout=0)
            if not ready:
                return False
            try:
                self.seen = bool(ray.get(self.pending))
            except ray.exceptions.RayError:  # the driver is gone: Train ends the run anyway
                self.flag = None
            self.pending = None
        elif time.monotonic() >= self.next_ask:
            self.pending = self.flag.get.remote()
            self.next_ask = time.monotonic() + self.every_s
        return self.seen
