"""Pretraining through Ray Train: two workers, outputs, progress and checkpoints inside epochs,
and a SIGTERM that checkpoints the running epoch, which the same command then finishes."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from orchestrator.config import apply_overrides, from_dict
from orchestrator.tracking import progress_line, read_records
from tests.conftest import TINY


def tiny_cfg(tmp_path, *extra):
    d = apply_overrides({"method": {"name": "simclr"}},
                        TINY + [f"output.dir={tmp_path}", "output.name=r"] + list(extra))
    return from_dict(d)


@pytest.mark.ray
def test_two_worker_run_writes_every_output(ray_session, tmp_path):
    from orchestrator.run import run_experiment
    from orchestrator.train import checkpoint_candidates
    from pipelines.checkpoint import read_meta
    cfg = tiny_cfg(tmp_path, "train.num_workers=2", "train.epochs=2", "eval.online_every=1",
                   "eval.stages=[knn,linear]", "train.progress_every_steps=4",
                   "train.checkpoint_every_steps=5", "train.log_every=2")
    lines = []
    summary = run_experiment(cfg, log=lines.append)
    run = tmp_path / "r"
    steps_per_epoch = (1257 // 2) // 64
    assert summary["train"]["steps"] == 2 * steps_per_epoch
    assert summary["train"]["epochs"] == 2 and summary["train"]["skipped_images"] == 0
    for stage in ("knn", "linear"):
        assert 0.0 <= summary["eval"][stage]["top1"] <= 1.0
    # better than chance even after two tiny epochs: the probe works on real features
    assert summary["eval"]["linear"]["top1"] > 0.5
    saved = json.loads((run / "summary.json").read_text())
    assert saved["eval"]["knn"]["top1"] == summary["eval"]["knn"]["top1"]
    assert (run / "config.yaml").exists()
    assert any(f.startswith("events") for f in os.listdir(run / "tensorboard"))
    records = read_records(str(run))
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(0.0 <= r["online"]["knn_top1"] <= 1.0 for r in records)
    assert any(line.startswith("epoch 2/2") and "img/s" in line and "ETA" in line for line in lines)
    # rank 0's lines inside each epoch (9 steps), and the time to the first step
    inside = [line for line in lines if re.match(r"epoch \d/2  step \d/9 \(\d+%\)  loss [\d.]+  "
                                                 r"\d+ img/s  ETA \d+m\d\ds", line)]
    assert [line[:15] for line in inside] == ["epoch 1/2  step", "epoch 1/2  step",
                                              "epoch 2/2  step", "epoch 2/2  step"], lines
    assert "epoch 1/2  step 4/9 (44%)" in inside[0] and "epoch 2/2  step 7/9 (77%)" in inside[3]
    assert any(line.startswith("first step after ") for line in lines)
    assert summary["train"]["first_step_s"] > 0
    # checkpoints every 5 steps, inside epochs, agreed by both workers (steps 5, 10, 15), and the
    # last; keep_checkpoints=2 keeps the newest two
    kept = sorted((m["step"], m["epoch"], m["epoch_step"])
                  for m in map(read_meta, checkpoint_candidates(str(run))))
    assert kept == [(15, 1, 6), (18, 1, 0)]


def test_progress_lines_inside_an_epoch_at_its_end_and_at_the_first_step():
    record = {"epoch": 0, "epochs": 3, "step": 120, "loss": 4.1234, "images_per_s": 812.4,
              "eta_s": 750.0}
    assert progress_line({**record, "epoch_step": 120, "epoch_steps": 781}) == \
        "epoch 1/3  step 120/781 (15%)  loss 4.1234  812 img/s  ETA 12m30s"
    assert progress_line(record) == "epoch 1/3  loss 4.1234  812 img/s  ETA 12m30s"
    assert progress_line({"first_step_s": 21.34}) == "first step after 21.3 s"


def test_resume_command_is_the_same_command_with_the_run_name():
    from orchestrator.cli import resume_command
    assert resume_command(["run", "configs/simclr.yaml", "--set", "train.epochs=3"], "simclr-1") \
        == "selfsup run configs/simclr.yaml --set train.epochs=3 --name simclr-1"
    assert resume_command(["run", "c.yaml", "--name", "a", "--set", "x=a b", "--name=b"], "b") \
        == "selfsup run c.yaml --set 'x=a b' --name b"


def test_cadence_checkpoints_by_steps_inside_epochs_reports_progress_and_stops_at_a_check():
    import torch
    from methods.config import build
    from orchestrator.cadence import Cadence
    from pipelines.train_loop import TrainConfig, plan_run
    t = build(TrainConfig, {"batch_size": 8, "log_every": 4, "checkpoint_every_steps": 3,
                            "progress_every_steps": 2, "progress_every_s": 0,
                            "checkpoint_every_minutes": 0}, "train")
    plan = plan_run(6, t)  # 30 epochs of 6 steps
    saved, records, asked = [], [], []
    cadence = Cadence(t, plan, rank=0, device=torch.device("cpu"), save=saved.append,
                      progress=SimpleNamespace(put=records.append),
                      stop=SimpleNamespace(requested=lambda: bool(asked)), started=time.time() - 5)
    cadence.start_epoch(0, 0)
    assert not any(cadence(step, 0.1, torch.tensor(2.0), {}) for step in range(1, 7))
    # step 3 inside the epoch is saved at once; step 6 ends it, so the epoch's own report saves
    assert [(r["step"], r["epoch"], r["epoch_step"]) for r in saved] == [(3, 0, 3)]
    assert cadence.pending
    assert 5 <= records[0]["first_step_s"] < 60
    assert [(r["step"], r["epoch_step"], r["epoch_steps"]) for r in records[1:]] == [(2, 2, 6),
                                                                                   (4, 4, 6)]
    assert records[2]["loss"] == 2.0 and records[2]["images_per_s"] > 0
    assert records[2]["eta_s"] == pytest.approx((180 - 4) * records[2]["images_per_s"] ** -1 * 8,
                                                rel=1e-6)
    cadence.saved()
    asked.append("SIGTERM")
    cadence.start_epoch(1, 0)
    assert [cadence(step, 0.1, torch.tensor(2.0), {}) for step in (7, 8)] == [False, True]
    assert cadence.stopping and len(saved) == 1  # the caller saves the stop's checkpoint


class _Workers:
    """A trainer whose fit() returns only once the stop flag is set (or `release` is)."""

    def __init__(self):
        self.reasons, self.release = [], threading.Event()
        self.flag = SimpleNamespace(request=SimpleNamespace(remote=self._request))

    def _request(self, reason: str) -> None:
        self.reasons.append(reason)

    def fit(self):
        while not self.reasons and not self.release.wait(0.05):
            pass
        return "result"


def _signal_later(*delays_and_signals) -> None:
    for delay, signum in delays_and_signals:
        threading.Timer(delay, os.kill, (os.getpid(), signum)).start()


def test_sigterm_asks_the_workers_to_stop_then_raises_interrupted():
    from orchestrator.interrupt import Interrupted, raise_on_sigterm
    from orchestrator.train import _fit_interruptibly
    workers, lines, previous = _Workers(), [], signal.getsignal(signal.SIGTERM)
    raise_on_sigterm()
    try:
        _signal_later((0.3, signal.SIGTERM))
        with pytest.raises(Interrupted) as stopped:
            _fit_interruptibly(workers, workers.flag, lines.append)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.signum == signal.SIGTERM and workers.reasons == ["SIGTERM"]
    assert lines and "checkpoint at the current step" in lines[0]


def test_second_ctrl_c_quits_without_waiting_for_the_workers():
    from orchestrator.train import STOP_GRACE_S, _fit_interruptibly
    workers, lines = _Workers(), []
    workers.flag.request.remote = workers.reasons.append  # the workers never answer
    workers.fit = lambda: workers.release.wait(60)
    start = time.time()
    _signal_later((0.3, signal.SIGINT), (0.8, signal.SIGINT))
    try:
        with pytest.raises(KeyboardInterrupt):
            _fit_interruptibly(workers, workers.flag, lines.append)
    finally:
        workers.release.set()
    assert workers.reasons == ["SIGINT"] and "Ctrl-C again" in lines[0]
    assert time.time() - start < min(5, STOP_GRACE_S)


def _selfsup(tmp_path, *args) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "run", "configs/simclr.yaml",
            *sum((["--set", o] for o in TINY), []), "--set", f"output.dir={tmp_path}",
            "--set", "train.checkpoint_every=1", "--set", "eval.stages=[]",
            "--set", "eval.online_every=0", "--set", "cluster.num_cpus=2",
            "--set", "cluster.dashboard=false", "--name", "resumable", *args]


def _wait_for_checkpoint(run_dir: str, proc: subprocess.Popen, timeout: float = 300) -> dict:
    from orchestrator.train import latest_checkpoint
    from pipelines.checkpoint import read_meta
    deadline = time.time() + timeout
    while time.time() < deadline:
        if latest_checkpoint(run_dir):
            return read_meta(latest_checkpoint(run_dir))
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    raise AssertionError("no checkpoint within the time limit")


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_checkpoints_the_running_epoch_and_the_same_command_resumes_it(tmp_path):
    from orchestrator.train import latest_checkpoint
    from pipelines.checkpoint import read_meta
    run_dir, steps = str(tmp_path / "resumable"), 1257 // 4  # one epoch of 314 steps
    command = _selfsup(tmp_path, "--set", "train.epochs=1", "--set", "train.batch_size=4",
                       "--set", "train.checkpoint_every_minutes=0.05", "--set", "train.log_every=5")
    first = subprocess.Popen(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        before = _wait_for_checkpoint(run_dir, first)  # one by time, inside the epoch
        signalled = time.time()
        first.send_signal(signal.SIGTERM)
        out = first.communicate(timeout=60)[0]
        exited = time.time()
    finally:
        first.kill()
    assert first.returncode == 143, out
    assert exited - signalled < 30, out
    assert "Traceback" not in out and "SIGTERM received" not in out, out
    assert "resume with: selfsup run configs/simclr.yaml --set" in out and \
        out.rstrip().endswith("--name resumable"), out
    newest = latest_checkpoint(run_dir)
    saved = read_meta(newest)
    # written on SIGTERM, at the step the workers had reached, inside the epoch
    assert os.path.getmtime(os.path.join(newest, "meta.json")) >= signalled, (before, saved)
    assert before["step"] < saved["step"] < steps and saved["epoch"] == 0
    assert saved["epoch_step"] == saved["step"] and f"at step {saved['step']} " in out
    second = subprocess.run(command, text=True, capture_output=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert (f"resuming resumable from epoch 1, step {saved['step']} ({saved['step']} steps into it)"
            in second.stdout), second.stdout
    final = read_meta(latest_checkpoint(run_dir))
    # the interrupted epoch's remaining steps ran, and nothing more
    assert (final["step"], final["epoch"], final["epoch_step"]) == (steps, 0, 0)
    assert [(r["epoch"], r["step"]) for r in read_records(run_dir)] == [(0, steps)]


def test_every_worker_draws_its_own_random_numbers():
    """One seed for the weights, then each rank its own stream: with one stream for all, every
    worker drew the same MAE masks (and the same everything else random)."""
    import torch
    from methods.masking import random_masking
    from orchestrator.train import seed_worker
    masks = []
    for rank in (0, 1, 0):
        seed_worker(7, rank)
        masks.append(random_masking(4, 16, 0.75, torch.device("cpu"))[1])
    assert torch.equal(masks[0], masks[2]), "the same rank repeats its draws"
    assert not torch.equal(masks[0], masks[1]), "two ranks draw different masks"
