"""Bad configs fail before Ray starts, naming the key and what would be valid."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

import methods
from methods.config import ConfigError
from orchestrator.cli import main
from orchestrator.config import apply_overrides, from_dict, load_config, to_dict

BASE = {"method": {"name": "simclr"}}


def cfg_with(*overrides):
    return from_dict(apply_overrides(BASE, list(overrides)))


@pytest.mark.parametrize("override, words", [
    ("method.temperature=0", ["method.temperature", "> 0"]),
    ("method.temperature=-0.1", ["method.temperature", "> 0"]),
    ("train.batch_size=1", ["train.batch_size", ">= 2"]),
    ("train.epochs=0", ["train.epochs", ">= 1"]),
    ("method.name=simclrr", ["method.name", "simclrr", "simclr"]),
    ("backbone.name=resnet7", ["backbone.name", "resnet7", "resnet18", "resnet50"]),
    ("train.optimizer=adam", ["train.optimizer", "adam", "sgd", "lars", "adamw"]),
    ("train.epochs=ten", ["train.epochs", "expected int", "ten"]),
    ("train.lr=[1]", ["train.lr", "expected float"]),
    ("train.tempo=1", ["unknown key train.tempo", "epochs", "batch_size"]),
    ("method.aug.flip=0.5", ["unknown key method.aug.flip", "flip_p"]),
    ("eval.stages=[knn,svm]", ["eval.stages", "svm", "knn", "linear"]),
    ("data.source=imagenet", ["data.source", "imagenet", "folder:LOCATION"]),
    ("data.source=folder:ftp://host/x", ["data.source", "ftp://", "s3://", "gs://"]),
    ("data.decode_size=16", ["data.decode_size", "smaller than", "data.image_size"]),
    ("data.test_fraction=1.5", ["data.test_fraction", "< 1"]),
    ("method.aug.crop_scale=[0.9,0.2]", ["method.aug.crop_scale", "low <= high"]),
    ("train.num_workers=3", ["train.batch_size", "not divisible", "num_workers"]),
    ("nonsense.key=1", ["unknown section", "nonsense", "method", "train"]),
])
def test_bad_value_names_key_and_choices(override, words):
    with pytest.raises(ConfigError) as e:
        cfg_with(override)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_missing_method_name_lists_methods():
    with pytest.raises(ConfigError, match="method.name: missing; registered methods: .*simclr"):
        from_dict({"train": {"epochs": 1}})


def test_overrides_parse_yaml_values():
    cfg = cfg_with("eval.stages=[knn]", "train.lr=0.05", "train.epochs=3", "method.aug.flip_p=0",
                   "cluster.address=null")
    assert cfg.eval.stages == ["knn"] and cfg.train.lr == 0.05 and cfg.train.epochs == 3
    assert cfg.method.aug.flip_p == 0.0 and cfg.cluster.address is None


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides(BASE, ["train.epochs"])


def test_round_trip_and_default_name(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "simclr", "temperature": 0.2}}))
    cfg = load_config(str(path), ["train.epochs=10"])
    assert cfg.output.name.startswith("simclr-") and cfg.output.dir == "outputs"
    again = from_dict(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg) and again.method.temperature == 0.2


def test_data_is_checked_where_the_job_runs_not_in_the_syntax_check(tmp_path):
    """`from_dict` (every worker, every sweep candidate, a laptop submitting to a cluster) never
    looks at the data; `load_config` checks it, naming the key, before Ray starts."""
    missing = f"data.source=folder:{tmp_path / 'nowhere'}"
    assert cfg_with(missing).data.source.endswith("nowhere")
    with pytest.raises(ConfigError, match=r"data.source: folder .*nowhere does not exist"):
        load_config(None, ["method.name=simclr", missing])
    assert load_config(None, ["method.name=simclr", missing], check_data=False)


def test_unlabeled_source_with_label_stages_fails_early(tmp_path):
    from PIL import Image
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    with pytest.raises(ConfigError, match="eval.stages.*unlabeled.*data.eval_source"):
        load_config(None, ["method.name=simclr", f"data.source=folder:{tmp_path}"])
    assert load_config(None, ["method.name=simclr", f"data.source=folder:{tmp_path}",
                              "eval.stages=[]"]).eval.stages == []


def test_every_shipped_config_is_valid():
    import glob
    paths = [p for p in glob.glob("configs/*.yaml")]
    assert paths
    for p in paths:
        load_config(p)


def test_cli_config_error_exit_code(capsys):
    assert main(["run", "configs/simclr.yaml", "--set", "method.temperature=0",
                 "--print-config"]) == 2
    assert "method.temperature" in capsys.readouterr().err


def test_cli_print_config_shows_overrides(capsys):
    assert main(["run", "configs/simclr.yaml", "--set", "train.epochs=7", "--name", "x",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 7 and printed["output"]["name"] == "x"
    assert printed["method"]["name"] == "simclr"


def test_cli_methods_lists_every_method_first_on_its_line():
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "methods"], check=True,
                         capture_output=True, text=True).stdout
    names = [line.split("\t")[0] for line in out.splitlines()]
    assert names == sorted(methods.METHODS)
    assert "temperature=0.5" in out.splitlines()[names.index("simclr")]


def test_cli_help_lists_every_command_without_importing_torch_or_ray():
    code = ("import sys\nfrom orchestrator.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\n"
            "print('imported:', sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    from orchestrator.cli import COMMANDS
    for name in ["run", "methods", *COMMANDS]:
        assert f"    {name} " in out, f"`selfsup --help` does not list {name}:\n{out}"
    assert out.splitlines()[-1] == "imported: []"
    sub = subprocess.run([sys.executable, "-m", "orchestrator.cli", "jobs", "--help"],
                         check=True, capture_output=True, text=True).stdout
    assert COMMANDS["jobs"][1] in sub and "{list,status,logs,stop}" in sub


def test_config_errors_do_not_start_ray():
    import ray
    was = ray.is_initialized()
    with pytest.raises(ConfigError):
        cfg_with("train.epochs=0")
    assert ray.is_initialized() == was


def test_numbers_in_scientific_notation_are_numbers_everywhere(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-3` as a string; a learning rate is typed that way."""
    assert cfg_with("train.lr=1e-3").train.lr == 0.001
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: simclr\ntrain:\n  lr: 3e-4\n  weight_decay: 1E-6\n"
                    "sweep:\n  space:\n    train.lr: {loguniform: [1e-4, 1e-2]}\n")
    cfg = load_config(str(path), ["train.epochs=10"])
    assert (cfg.train.lr, cfg.train.weight_decay) == (3e-4, 1e-6)
    assert cfg.sweep.space["train.lr"] == {"loguniform": [1e-4, 1e-2]}
