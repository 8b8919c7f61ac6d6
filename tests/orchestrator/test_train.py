"""Pretraining through Ray Train: two workers, outputs, and resume after an interruption."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from orchestrator.config import apply_overrides, from_dict
from orchestrator.tracking import read_records
from tests.conftest import TINY

pytestmark = pytest.mark.ray


def tiny_cfg(tmp_path, *extra):
    d = apply_overrides({"method": {"name": "simclr"}},
                        TINY + [f"output.dir={tmp_path}", "output.name=r"] + list(extra))
    return from_dict(d)


def test_two_worker_run_writes_every_output(ray_session, tmp_path):
    from orchestrator.run import run_experiment
    cfg = tiny_cfg(tmp_path, "train.num_workers=2", "train.epochs=2", "eval.online_every=1",
                   "eval.stages=[knn,linear]")
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


def _selfsup(tmp_path, *args) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "run", "configs/simclr.yaml",
            *sum((["--set", o] for o in TINY), []), "--set", f"output.dir={tmp_path}",
            "--set", "train.checkpoint_every=1", "--set", "eval.stages=[]",
            "--set", "eval.online_every=0", "--set", "cluster.num_cpus=2",
            "--set", "cluster.dashboard=false", "--name", "resumable", *args]


def _wait_for_checkpoint(run_dir: str, proc: subprocess.Popen, timeout: float = 150) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if read_records(run_dir):
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.5)
    raise AssertionError("no checkpoint within the time limit")


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    from orchestrator.train import latest_checkpoint
    from pipelines.checkpoint import read_meta
    run_dir = str(tmp_path / "resumable")
    first = subprocess.Popen(_selfsup(tmp_path, "--set", "train.epochs=40"), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for_checkpoint(run_dir, first)
    first.send_signal(signal.SIGINT)  # Ctrl-C
    out = first.communicate(timeout=60)[0]
    assert "interrupted" in out and "resume" in out
    saved = read_meta(latest_checkpoint(run_dir))
    assert saved["epoch"] < 39, "the first run was meant to be cut short"
    n_before = len(read_records(run_dir))
    second = subprocess.run(_selfsup(tmp_path, "--set", f"train.epochs={saved['epoch'] + 3}"),
                            text=True, capture_output=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming resumable from epoch {saved['epoch'] + 1}, step {saved['step']}" in second.stdout
    resumed = read_records(run_dir)[n_before:]
    steps_per_epoch = saved["step"] // (saved["epoch"] + 1)
    # continues after the saved epoch and step instead of starting again at epoch 0
    assert [r["epoch"] for r in resumed] == [saved["epoch"] + 1, saved["epoch"] + 2]
    assert [r["step"] for r in resumed] == [saved["step"] + steps_per_epoch,
                                            saved["step"] + 2 * steps_per_epoch]
    assert read_meta(latest_checkpoint(run_dir))["step"] == saved["step"] + 2 * steps_per_epoch
