"""`selfsup sweep`: trial sizing and configs, statuses, the leaderboard, and Tune runs that
are interrupted and resumed or stopped for collapse."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import threading
import time
from types import SimpleNamespace

import pytest

from orchestrator.cli import main
from orchestrator.config import apply_overrides, from_dict
from orchestrator.sweep import (CollapseStopper, experiment_dict, run_sweep, trial_config,
                                trial_resources, tune_result)
from orchestrator.sweep_results import (CollapseRule, collect_rows, format_leaderboard,
                                        is_collapsed, trial_status, write_outputs)

RULE = CollapseRule(0.05, None, "simclr")
from orchestrator.tracking import read_records
from tests.conftest import TINY

SPACE = "sweep.space={method.temperature: {grid: [0.2, 0.5]}}"
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "sweeps",
                       "simclr_temperature.yaml")


def sweep_cfg(tmp_path, *extra):
    d = apply_overrides({"method": {"name": "simclr"}},
                        TINY + [f"output.dir={tmp_path}", "output.name=s", SPACE,
                                "eval.stages=[knn]", "eval.online_every=1"] + list(extra))
    return from_dict(d)


@pytest.mark.parametrize("cpus, extra, expected", [
    (2, [], (1, 1.0, 1)),        # one trial: a CPU for the worker, one for Ray Data
    (4, [], (2, 1.0, 1)),
    (16, ["train.num_workers=2"], (8, 0.5, 1)),
    (8, ["train.cpus_per_worker=3", "train.torch_threads=2"], (2, 3.0, 2)),
    (2, ["sweep.max_concurrent_trials=3"], (3, 0.5, 1)),
    (4, ["sweep.driver_cpus=0.5"], (1, 2.5, 2)),
    (3, [], (1, 2.0, 2)),                  # evaluating takes 2 whole CPUs (embed actor + task)
    (3, ["eval.stages=[]"], (2, 0.5, 1)),  # no evaluation: a CPU for data, half for the worker
])
def test_trial_resources_fit_the_cluster(tmp_path, cpus, extra, expected):
    res = trial_resources(sweep_cfg(tmp_path, *extra), {"CPU": cpus})
    assert (res.concurrent, res.cpus_per_worker, res.torch_threads) == expected


def test_gpu_trials_are_bounded_by_gpus(tmp_path):
    cfg = sweep_cfg(tmp_path, "train.use_gpu=true", "train.num_workers=2")
    assert trial_resources(cfg, {"CPU": 32, "GPU": 4}).concurrent == 2


@pytest.mark.parametrize("result, status", [
    ({"knn_top1": 0.9, "embed_std_ratio": 0.4}, "early-stopped"),
    ({"knn_top1": 0.9, "embed_std_ratio": 0.01}, "collapsed"),      # no spread left
    ({"knn_top1": 0.11, "embed_std_ratio": 0.4}, "collapsed"),      # at chance (0.1 + 0.02)
    ({"knn_top1": 0.13, "embed_std_ratio": 0.4}, "early-stopped"),
    ({"knn_top1": float("nan"), "embed_std_ratio": 0.4}, "early-stopped"),
    ({"knn_top1": 0.9, "embed_std_ratio": 0.4, "completed": True}, "completed"),
    # DINO's uniform teacher: the features keep their spread and kNN, the teacher says nothing
    ({"knn_top1": 0.9, "embed_std_ratio": 0.4, "method/teacher_entropy_ratio": 0.999},
     "collapsed"),
    ({"knn_top1": 0.9, "embed_std_ratio": 0.4, "method/teacher_entropy_ratio": 0.90},
     "early-stopped"),
])
def test_status_of_a_terminated_trial(result, status):
    rule = CollapseRule(0.05, 0.12, "dino")  # DINO's own hook reads its teacher entropy
    assert trial_status("TERMINATED", result, rule) == status
    assert CollapseStopper(rule)("t", result) == (status == "collapsed")
    # a method without a collapse hook is judged on the embedding checks alone
    plain = trial_status("TERMINATED", result, CollapseRule(0.05, 0.12, "simclr"))
    assert plain == ("early-stopped" if "method/teacher_entropy_ratio" in result else status)


def test_status_of_errored_and_interrupted_trials():
    rule = CollapseRule(0.05, None, "simclr")
    assert trial_status("ERROR", {"completed": True}, rule) == "error"
    assert trial_status("RUNNING", {}, rule) == "unfinished"
    assert trial_status("PENDING", {}, rule) == "unfinished"
    assert not is_collapsed({"knn_top1": 0.1}, rule)  # chance check off


def test_trial_config_applies_values_and_pins_the_trial_folder(tmp_path, monkeypatch):
    from PIL import Image
    (tmp_path / "images" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a" / "x.png")
    monkeypatch.chdir(tmp_path)
    cfg = sweep_cfg(tmp_path, "data.source=folder:images", "eval.stages=[]")
    res = trial_resources(cfg, {"CPU": 4})
    base = experiment_dict(cfg)
    trial = trial_config(base, {"method.temperature": 0.2, "train.lr": 0.01}, "/sw", "ab_1", res)
    assert trial.method.temperature == 0.2 and trial.train.lr == 0.01
    assert (trial.output.dir, trial.output.name, trial.sweep) == ("/sw", "ab_1", None)
    assert trial.data.source == f"folder:{tmp_path / 'images'}"  # Tune moves trials elsewhere
    assert trial.train.cpus_per_worker == res.cpus_per_worker
    assert base["method"]["temperature"] == cfg.method.temperature  # the base is not changed


def test_tune_result_flattens_the_online_check():
    record = {"epoch": 3, "epochs": 10, "loss": 4.2, "step": 40, "metrics": {"pos_sim": 0.5},
              "online": {"knn_top1": 0.8, "embed_std": 0.1, "embed_std_ratio": 0.9}}
    assert tune_result(record) == {"epochs_done": 4, "epochs": 10, "loss": 4.2, "knn_top1": 0.8,
                                   "embed_std": 0.1, "embed_std_ratio": 0.9,
                                   "method/pos_sim": 0.5}
    del record["online"]  # an epoch between checks: progress only, nothing to rank on
    assert tune_result(record) == {"epochs_done": 4, "epochs": 10, "loss": 4.2,
                                   "method/pos_sim": 0.5}


def _fake_trial(sweep_dir, trial_id, status, last, temperature, eval_top1=None):
    run = sweep_dir / trial_id
    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for e in range(last.get("epochs_done", 0)):
            f.write(json.dumps({"epoch": e, "loss": 5.0 - e, "online": {"knn_top1": 0.5}}) + "\n")
    if eval_top1 is not None:
        (run / "summary.json").write_text(json.dumps(
            {"eval": {"knn": {"top1": eval_top1, "seconds": 3.0}, "embed": {"dim": 8}}}))
    error = None
    if status == "ERROR":
        error = run / "error.txt"
        error.write_text("Traceback ...\nRuntimeError: worker died\n")
    return SimpleNamespace(trial_id=trial_id, status=status,
                           config={"method.temperature": temperature},
                           last_result={**last, "time_total_s": 12.0},
                           error_file=error and str(error),
                           local_path=str(sweep_dir / "tune" / trial_id))


def test_leaderboard_ranks_on_online_knn_and_records_every_trial(tmp_path):
    trials = [
        _fake_trial(tmp_path, "t_0", "TERMINATED", {"epochs_done": 4, "epochs": 4, "knn_top1": 0.80,
                    "embed_std_ratio": 0.5, "completed": True}, 0.1, eval_top1=0.81),
        _fake_trial(tmp_path, "t_1", "TERMINATED", {"epochs_done": 2, "epochs": 4, "knn_top1": 0.85,
                    "embed_std_ratio": 0.5}, 0.2),
        _fake_trial(tmp_path, "t_2", "TERMINATED", {"epochs_done": 1, "epochs": 4, "knn_top1": 0.3,
                    "embed_std_ratio": 0.001}, 0.5),
        _fake_trial(tmp_path, "t_3", "ERROR", {}, 1.0),
        _fake_trial(tmp_path, "t_4", "TERMINATED", {"epochs_done": 4, "epochs": 4, "knn_top1": 0.9,
                    "embed_std_ratio": 0.6, "completed": True}, 0.05, eval_top1=0.92),
    ]
    keys = ["method.temperature"]
    rows = collect_rows(trials, str(tmp_path), keys, CollapseRule(0.05, 0.12, "simclr"))
    write_outputs(str(tmp_path), rows, keys)
    with open(tmp_path / "leaderboard.csv") as f:
        table = list(csv.DictReader(f))
    # kNN top-1 among trials that trained as far; the one ASHA stopped after 2 epochs ranks
    # below the completed ones although its earlier kNN is higher; collapsed and failed last
    assert [r["trial"] for r in table] == ["t_4", "t_0", "t_1", "t_2", "t_3"]
    assert [r["status"] for r in table] == ["completed", "completed", "early-stopped",
                                            "collapsed", "error"]
    assert [r["method.temperature"] for r in table] == ["0.05", "0.1", "0.2", "0.5", "1.0"]
    assert table[0]["knn/top1"] == "0.92" and table[2]["knn/top1"] == ""
    assert [r["epochs"] for r in table] == ["4", "4", "2", "1", ""] and "_epochs" not in table[0]
    assert "knn/seconds" not in table[0] and "embed/dim" in table[0]
    assert table[4]["error"] == "RuntimeError: worker died" and table[0]["wall_s"] == "12.0"
    import pyarrow.parquet as pq
    frame = pq.read_table(tmp_path / "leaderboard.parquet").to_pandas()
    assert list(frame["trial"]) == [r["trial"] for r in table]
    assert list(frame.columns) == list(table[0].keys())
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["trial"] == "t_4" and best["params"] == {"method.temperature": 0.05}
    assert best["metrics"] == {"online/knn_top1": 0.9, "online/embed_std_ratio": 0.6,
                               "knn/top1": 0.92, "embed/dim": 8}
    text = format_leaderboard(rows, keys).splitlines()
    assert text[1].split()[:3] == ["1", "t_4", "completed"] and len(text) == 6


def test_interrupted_trial_row_takes_its_last_online_check_from_its_records(tmp_path):
    trial = _fake_trial(tmp_path, "t_0", "RUNNING", {"epochs_done": 3, "epochs": 4}, 0.1)
    row = collect_rows([trial], str(tmp_path), ["method.temperature"], RULE)[0]
    assert row["status"] == "unfinished" and row["online/knn_top1"] == 0.5


def test_wall_time_adds_up_every_attempt_of_a_trial(tmp_path):
    trial = _fake_trial(tmp_path, "t_0", "TERMINATED", {"epochs_done": 3, "completed": True}, 0.1)
    os.makedirs(trial.local_path)
    with open(os.path.join(trial.local_path, "result.json"), "w") as f:
        for iteration, seconds in ((1, 10.0), (2, 20.0), (1, 5.0), (2, 7.5)):  # resumed once
            f.write(json.dumps({"training_iteration": iteration, "time_total_s": seconds}) + "\n")
    row = collect_rows([trial], str(tmp_path), ["method.temperature"], RULE)[0]
    assert row["wall_s"] == 27.5


def test_best_is_the_top_completed_trial_and_tensorboard_has_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    trials = [
        _fake_trial(tmp_path, "t_0", "TERMINATED", {"epochs_done": 3, "epochs": 3, "knn_top1": 0.7,
                    "embed_std_ratio": 0.5, "completed": True}, 0.1, eval_top1=0.7),
        _fake_trial(tmp_path, "t_1", "TERMINATED", {"epochs_done": 2, "epochs": 3, "knn_top1": 0.9,
                    "embed_std_ratio": 0.5}, 0.2),
    ]
    rows = collect_rows(trials, str(tmp_path), ["method.temperature"], RULE)
    write_outputs(str(tmp_path), rows, ["method.temperature"])
    assert json.loads((tmp_path / "best.json").read_text())["trial"] == "t_0"
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path / "tensorboard"))
    mux.Reload()
    assert set(mux.Runs()) == {"t_0", "t_1"}
    assert [e.step for e in mux.Scalars("t_0", "online/knn_top1")] == [1, 2, 3]
    hparams = mux.PluginRunToTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams["t_0"]
    assert "hparam/knn/top1" in mux.Runs()["t_0"]["scalars"]


@pytest.mark.parametrize("key, spec, words", [
    ("method.temperatur", "{grid: [0.1]}", "unknown key method.temperatur"),
    ("method.temperature", "{choice: []}", "choice is empty"),
    ("method.temperature", "{uniform: [0.5, 0.1]}", "low 0.5 must be < high 0.1"),
    ("train.lr", "{loguniform: [0, 0.1]}", "loguniform low 0 must be > 0"),
    ("method.temperature", "{grid: 0.5}", "grid needs a list"),
])
def test_bad_sweep_fails_before_ray_and_names_the_key(tmp_path, capsys, monkeypatch, key, spec,
                                                      words):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a sweep that cannot run")
    monkeypatch.setattr("orchestrator.sweep.init_ray", no_ray)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"method: {{name: simclr}}\nsweep:\n  space:\n    {key}: {spec}\n")
    assert main(["sweep", str(bad), "--set", f"output.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"sweep.space.{key}" in err and words in err, err
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml"]  # no sweep folder, no trial


def test_resume_without_a_sweep_fails_before_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("orchestrator.sweep.init_ray", None)
    assert main(["sweep", EXAMPLE, "--set", f"output.dir={tmp_path}", "--resume"]) == 2
    assert "no sweep to resume" in capsys.readouterr().err and os.listdir(tmp_path) == []


def _interrupt_when(condition, timeout: float = 240) -> threading.Thread:
    """SIGUSR1 to this process once `condition()` holds. Tune's handler for it is its Ctrl-C
    handler; unlike SIGINT, Tune leaves it installed after the sweep, so a late signal cannot
    reach pytest as a KeyboardInterrupt."""
    def watch() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and not condition():
            time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGUSR1)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _starts(run_dir) -> int:
    with open(run_dir / "run.log") as f:
        return sum(" started: " in line for line in f)


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_session, tmp_path):
    # two trials side by side: the short one finishes while the long one is mid-training
    cfg = sweep_cfg(tmp_path, "sweep.space={train.epochs: {grid: [1, 10]}}", "eval.stages=[]",
                    "train.checkpoint_every=1", "sweep.scheduler=none",
                    "sweep.max_concurrent_trials=2")
    sweep_dir = tmp_path / "s"

    def one_done_other_checkpointed() -> bool:
        runs = [p for p in sweep_dir.glob("*_0000*") if p.is_dir()]
        return (any((p / "summary.json").exists() for p in runs)
                and any(read_records(str(p)) and not (p / "summary.json").exists() for p in runs))

    watcher = _interrupt_when(one_done_other_checkpointed)
    rows = run_sweep(cfg, log=lambda s: None)
    watcher.join()
    status = {r["trial"]: r["status"] for r in rows}
    done = next(t for t in status if (sweep_dir / t / "summary.json").exists())
    cut = next(t for t in status if t != done)
    # Tune may not have seen the finished trial end before the interrupt
    assert status[cut] == "unfinished" and status[done] in ("completed", "unfinished"), status
    summary_mtime = os.path.getmtime(sweep_dir / done / "summary.json")
    saved_epochs = [r["epoch"] for r in read_records(str(sweep_dir / cut))]
    rows = run_sweep(cfg, resume=True, log=lambda s: None)
    assert {r["trial"]: r["status"] for r in rows} == {done: "completed", cut: "completed"}
    # the finished trial was not run again
    assert _starts(sweep_dir / done) == 1
    assert len(read_records(str(sweep_dir / done))) == 1
    assert os.path.getmtime(sweep_dir / done / "summary.json") == summary_mtime
    # the cut trial continued from its checkpoint: no epoch trained twice, and all of them
    assert _starts(sweep_dir / cut) == 2
    log = (sweep_dir / cut / "run.log").read_text()
    resumed = re.search(r"resuming \S+ from epoch (\d+)|already trained (\d+) epochs", log)
    assert resumed and int(resumed.group(1) or resumed.group(2)) >= len(saved_epochs) >= 1, log
    epochs = [r["epoch"] for r in read_records(str(sweep_dir / cut))]
    assert epochs == sorted(set(epochs)) and epochs[:len(saved_epochs)] == saved_epochs
    assert json.loads((sweep_dir / cut / "summary.json").read_text())["train"]["epochs"] == 10
    with open(sweep_dir / "leaderboard.csv") as f:
        table = list(csv.DictReader(f))
    assert sorted(r["train.epochs"] for r in table) == ["1", "10"]
    assert all(r["checkpoint"] and r["status"] == "completed" for r in table)
    assert float(table[0]["online/knn_top1"]) >= float(table[1]["online/knn_top1"])


@pytest.mark.ray
def test_collapsed_trial_is_stopped_early_and_marked(ray_session, tmp_path):
    cfg = sweep_cfg(tmp_path, "train.epochs=4", "sweep.collapse_std_ratio=100",
                    "sweep.space={method.temperature: {grid: [0.5]}}")
    rows = run_sweep(cfg, log=lambda s: None)
    assert [(r["status"], r["epochs"]) for r in rows] == [("collapsed", 1)]
    assert len(read_records(rows[0]["run_dir"])) <= 2  # stopped within an epoch, not after 4
    assert not os.path.exists(os.path.join(rows[0]["run_dir"], "summary.json"))
