"""`selfsup eval` on a checkpoint: every stage through Ray, results in the run folder, and a re-run
that re-uses what did not change. Plus locating checkpoints and their config without Ray."""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch
from PIL import Image

import methods
from methods.config import ConfigError
from orchestrator.config import apply_overrides, dump_yaml, from_dict
from orchestrator.evaluate import eval_config, locate
from orchestrator.train import TrainResult, build_info
from pipelines import checkpoint as ckpt
from tests.conftest import TINY

ALL = "knn,linear,finetune,lowshot,cluster,tsne,robustness,efficiency"
FAST = ["eval.finetune.epochs=1", "eval.finetune.min_steps=2", "eval.tsne.projector_points=20",
        "eval.efficiency.batches=1", "eval.cluster.n_init=1"]


def make_run(root, *overrides, name="r") -> tuple[str, str]:
    """(run folder, checkpoint) of an untrained tiny SimCLR, as a finished `selfsup run` leaves it."""
    cfg = from_dict(apply_overrides({"method": {"name": "simclr"}},
                                    TINY + FAST + [f"output.name={name}", *overrides]))
    run = os.path.join(root, name)
    os.makedirs(run)
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(dump_yaml(cfg))
    torch.manual_seed(0)
    model = methods.get("simclr").model(cfg.method, cfg.backbone, cfg.data.image_size)
    checkpoint = os.path.join(run, "checkpoints", "checkpoint_000001")
    ckpt.save(checkpoint, model, torch.optim.SGD(model.parameters(), lr=0.1), step=9, epoch=1,
              build_info=build_info(cfg))
    return run, checkpoint


def eval_cli(capsys, *args) -> list[str]:
    from orchestrator.cli import main
    assert main(["eval", *args]) == 0
    return capsys.readouterr().out.splitlines()


def mtimes(run: str) -> dict:
    root = os.path.join(run, "stages")
    return {s: os.stat(os.path.join(root, s, "metrics.json")).st_mtime_ns for s in os.listdir(root)}


@pytest.mark.ray
def test_eval_runs_every_stage_then_reuses_unchanged_ones(ray_session, tmp_path, capsys):
    run, checkpoint = make_run(tmp_path)
    eval_cli(capsys, checkpoint, "--stages", ALL)
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert list(summary["eval"]) == ALL.split(",")
    assert all(0 <= summary["eval"][s]["top1"] <= 1 for s in ("knn", "linear", "finetune"))
    assert summary["eval"]["linear"]["top1"] > 0.3          # random conv features beat chance (0.1)
    stages = os.path.join(run, "stages")
    assert len(pd.read_parquet(os.path.join(stages, "embed", "test.parquet"))) == 540
    curves = json.load(open(os.path.join(stages, "robustness", "curves.json")))
    assert curves["severities"] == [0, 1, 2, 3] and len(curves["top1"]) == 4
    assert curves["top1"]["contrast"][3] < curves["top1"]["contrast"][0]
    model, _ = ckpt.load_model(checkpoint)
    assert summary["eval"]["efficiency"]["params"] == sum(p.numel() for p in model.parameters())
    with Image.open(os.path.join(stages, "tsne", "tsne.png")) as im:
        assert im.format == "PNG"
    assert os.path.exists(os.path.join(run, "tensorboard", "projector_config.pbtxt"))
    assert os.path.exists(os.path.join(run, "report.html"))
    subsets = json.load(open(os.path.join(stages, "lowshot", "subsets.json")))
    assert len(subsets["1pct"]) == summary["eval"]["lowshot"]["n_1pct"] >= 10

    before = mtimes(run)
    lines = eval_cli(capsys, run, "--stages", ALL)            # the run folder: latest checkpoint
    assert sum("unchanged" in line for line in lines) == 9     # and embed, which they require
    assert mtimes(run) == before
    assert json.load(open(os.path.join(run, "summary.json")))["eval"] == summary["eval"]

    lines = eval_cli(capsys, run, "--stages", "knn,cluster", "--set", "eval.knn.k=[5]")
    after = mtimes(run)
    assert after["knn"] > before["knn"] and after["embed"] == before["embed"]
    assert after["cluster"] == before["cluster"]
    merged = json.load(open(os.path.join(run, "summary.json")))["eval"]
    assert "top1_k5" in merged["knn"] and merged["tsne"] == summary["eval"]["tsne"]


def test_locate_finds_the_run_and_its_latest_checkpoint(tmp_path):
    run, checkpoint = make_run(tmp_path)
    model, meta = ckpt.load_model(checkpoint)
    ckpt.save(os.path.join(run, "checkpoints", "checkpoint_000000"), model, None, step=4, epoch=0,
              build_info=meta)
    assert locate(checkpoint) == (checkpoint, run)
    assert locate(run) == (checkpoint, run)
    with pytest.raises(ConfigError, match="neither a checkpoint"):
        locate(str(tmp_path))


def test_eval_config_comes_from_the_run_or_from_the_checkpoint(tmp_path):
    run, checkpoint = make_run(tmp_path, "data.test_fraction=0.25")
    cfg = eval_config(checkpoint, run, ["eval.stages=[knn]"])
    assert cfg.data.test_fraction == 0.25 and cfg.eval.stages == ["knn"]
    bare = eval_config(checkpoint, None, ["data.seed=3"])     # no config.yaml: defaults + --set
    assert bare.data.image_size == 16 and bare.data.test_fraction == 0.3 and bare.data.seed == 3
    assert bare.backbone.width == 8
    with pytest.raises(ConfigError, match="trained on 16 px"):
        eval_config(checkpoint, run, ["data.image_size=32"])


def test_a_rerun_that_trained_nothing_keeps_the_training_figures(tmp_path):
    from orchestrator.run import _train_figures
    from pipelines.data import Splits
    splits = Splits(None, None, None, [], counts={"pretrain": 10})
    trained = TrainResult("ck/2", 3, 12, 4.2, 350.0, 75.0, 0)
    with open(tmp_path / "summary.json", "w") as f:
        json.dump({"train": _train_figures(str(tmp_path), trained, splits)}, f)
    skipped = TrainResult("ck/2", 3, 12, float("nan"), 0.0, 0.0, 12)   # "already trained"
    kept = _train_figures(str(tmp_path), skipped, splits)
    assert kept["images_per_s"] == 350.0 and kept["wall_s"] == 75.0 and kept["final_loss"] == 4.2
    resumed = TrainResult("ck/3", 4, 16, 4.0, 300.0, 20.0, 12)          # trained further
    assert _train_figures(str(tmp_path), resumed, splits)["wall_s"] == 20.0
