"""The sweep section: search-space parsing and validation, all before (and without) Ray."""
from __future__ import annotations

import os

import pytest
import yaml

import methods
from methods.config import ConfigError
from orchestrator.config import from_dict, load_config, to_dict
from orchestrator.search_space import Dimension, check_space, count_trials, set_dotted

BASE = {"method": {"name": "simclr"}, "eval": {"stages": ["knn"]}}
SWEEPS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "sweeps")


def sweep_cfg(space, **sweep):
    return from_dict({**BASE, "sweep": {"space": space, **sweep}})


@pytest.mark.parametrize("space, words", [
    ({"method.temperatur": {"grid": [0.1]}},
     ["sweep.space.method.temperatur", "unknown key method.temperatur", "temperature"]),
    ({"train.tempo": {"choice": [1, 2]}}, ["sweep.space.train.tempo", "unknown key"]),
    ({"methd.temperature": {"grid": [0.1]}}, ["sweep.space.methd.temperature", "unknown section"]),
    ({"method.temperature": {"choice": []}}, ["sweep.space.method.temperature", "choice is empty"]),
    ({"method.temperature": {"grid": []}}, ["sweep.space.method.temperature", "grid is empty"]),
    ({"method.temperature": {"uniform": [0.5, 0.1]}},
     ["sweep.space.method.temperature", "low 0.5 must be < high 0.1"]),
    ({"method.temperature": {"loguniform": [0.5, 0.5]}}, ["sweep.space.method.temperature", "<"]),
    ({"method.temperature": {"loguniform": [0, 1]}},
     ["sweep.space.method.temperature", "loguniform low 0 must be > 0"]),
    ({"method.temperature": {"loguniform": [-1, 1]}}, ["sweep.space.method.temperature", "> 0"]),
    ({"method.temperature": {"grid": 0.5}},
     ["sweep.space.method.temperature", "grid needs a list", "0.5"]),
    ({"method.temperature": [0.1, 0.5]}, ["sweep.space.method.temperature", "exactly one of"]),
    ({"method.temperature": {"grid": [0.1], "choice": [0.2]}}, ["exactly one of"]),
    ({"method.temperature": {"range": [0.1, 0.5]}}, ["'range' is not one of", "grid", "choice"]),
    ({"method.temperature": {"uniform": [0.1, 0.2, 0.3]}}, ["[low, high]"]),
    ({"method.temperature": {"uniform": ["a", 1]}}, ["[low, high]"]),
    ({"method.temperature": {"grid": [0.1, -1]}},
     ["sweep.space.method.temperature", "-1", "out of range", "> 0"]),
    ({"method.temperature": {"uniform": [-1.0, 0.5]}}, ["sweep.space.method.temperature", "> 0"]),
    ({"train.optimizer": {"choice": ["sgd", "adam"]}}, ["sweep.space.train.optimizer", "adam"]),
    ({"method.proj_dim": {"uniform": [16, 32.5]}},
     ["sweep.space.method.proj_dim", "integer", "integer bounds"]),
    ({"train.epochs": {"uniform": [1.5, 3.5]}}, ["sweep.space.train.epochs", "expected int"]),
    ({"output.name": {"grid": ["a", "b"]}}, ["sweep.space.output.name", "once per sweep"]),
    ({"cluster.num_cpus": {"grid": [1, 2]}}, ["sweep.space.cluster.num_cpus", "once per sweep"]),
    ({"method..temperature": {"grid": [0.1]}}, ["dotted config key"]),
    ({}, ["sweep.space: empty"]),
])
def test_bad_space_fails_naming_the_key(space, words):
    with pytest.raises(ConfigError) as e:
        sweep_cfg(space)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("sweep, extra, words", [
    ({"scheduler": "pbt"}, {}, ["sweep.scheduler", "PBT", "Train V2", "asha"]),
    ({"scheduler": "hyperband"}, {}, ["sweep.scheduler", "hyperband", "asha, none"]),
    ({"num_samples": 0}, {}, ["sweep.num_samples", ">= 1"]),
    ({"reduction_factor": 1}, {}, ["sweep.reduction_factor", "> 1"]),
    ({"grace_period": 50}, {"train": {"epochs": 10}}, ["sweep.grace_period", "train.epochs = 10"]),
    ({"max_concurrent_trials": 0}, {}, ["sweep.max_concurrent_trials", ">= 1"]),
    ({"spaces": {}}, {}, ["unknown key sweep.spaces", "space"]),
    ({}, {"eval": {"online_every": 0}}, ["eval.online_every", "online kNN"]),
    ({}, {"cluster": {"dashboard": False}}, ["cluster.dashboard", "hangs"]),
])
def test_bad_sweep_settings_fail_naming_the_key(sweep, extra, words):
    d = {**BASE, **extra, "sweep": {"space": {"method.temperature": {"grid": [0.1]}}, **sweep}}
    with pytest.raises(ConfigError) as e:
        from_dict(d)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_each_kind_parses_into_a_dimension():
    cfg = sweep_cfg({"method.temperature": {"grid": [0.1, 0.5]},
                     "train.lr": {"loguniform": [0.01, 1]},
                     "train.weight_decay": {"uniform": [0, 0.001]},
                     "method.aug.crop_scale": {"choice": [[0.2, 1.0], [0.5, 1.0]]},
                     "method.proj_dim": {"uniform": [16, 64]}}, num_samples=3)
    dims = {d.key: d for d in check_space(cfg.sweep, BASE, from_dict)}
    assert dims["method.temperature"] == Dimension("method.temperature", "grid", (0.1, 0.5))
    assert dims["train.lr"] == Dimension("train.lr", "loguniform", (0.01, 1))
    assert dims["method.aug.crop_scale"].values == ([0.2, 1.0], [0.5, 1.0])
    # an int field gets integer sampling; a float field with whole-number bounds does not
    assert dims["method.proj_dim"].integer and not dims["train.lr"].integer
    assert all(isinstance(v, int) for v in dims["method.proj_dim"].candidates())
    # 2 grid points x 3 samples; choices and ranges are drawn once per trial
    assert count_trials(list(dims.values()), cfg.sweep.num_samples) == 6


def test_float_range_candidates_catch_an_int_field_and_stay_inside():
    dim = Dimension("train.lr", "uniform", (1, 3))
    low, inside, high = dim.candidates()
    assert (low, high) == (1, 3) and 1 < inside < 3 and not float(inside).is_integer()
    low, inside, high = Dimension("train.lr", "loguniform", (0.01, 1.0)).candidates()
    assert 0.01 < inside < 1.0


def test_tune_domains_sample_inside_the_range():
    lr = Dimension("train.lr", "loguniform", (0.01, 1.0)).to_tune()
    dim = Dimension("method.proj_dim", "uniform", (16, 18), integer=True).to_tune()
    lrs = [lr.sample() for _ in range(200)]
    dims = {dim.sample() for _ in range(200)}
    assert all(0.01 <= v <= 1.0 for v in lrs)
    assert dims == {16, 17, 18}  # high is included


def test_set_dotted_copies_and_creates_sections():
    d = {"method": {"name": "simclr"}, "data": None}
    out = set_dotted(set_dotted(d, "method.aug.flip_p", 0.5), "data.image_size", 16)
    assert out == {"method": {"name": "simclr", "aug": {"flip_p": 0.5}}, "data": {"image_size": 16}}
    assert d == {"method": {"name": "simclr"}, "data": None}
    with pytest.raises(ConfigError, match="method.name.x: name is a value"):
        set_dotted(d, "method.name.x", 1)


def test_sweep_section_round_trips_through_to_dict():
    cfg = sweep_cfg({"method.temperature": {"grid": [0.1, 0.5]}}, scheduler="none")
    again = from_dict(to_dict(cfg))
    assert again.sweep == cfg.sweep and again.sweep.scheduler == "none"
    assert from_dict(BASE).sweep is None


@pytest.mark.parametrize("name, method, keys", [
    ("simclr_temperature.yaml", "simclr", ["method.temperature"]),
    ("mae_mask_ratio.yaml", "mae", ["method.mask_ratio"]),
    ("moco_queue_momentum.yaml", "moco_v2", ["method.queue_size", "method.momentum"]),
])
def test_example_sweeps_are_valid(name, method, keys):
    if method not in methods.METHODS:
        pytest.skip(f"method {method} is not registered yet")
    cfg = load_config(os.path.join(SWEEPS, name))
    assert cfg.method_name == method and list(cfg.sweep.space) == keys
    assert cfg.eval.online_every >= 1 and cfg.sweep.scheduler == "asha"
    with open(os.path.join(SWEEPS, name)) as f:
        assert yaml.safe_load(f)["sweep"]["space"] == cfg.sweep.space
