"""The experiment config: every layer's typed section composed into one, validated before Ray.

YAML is only its serialised form. `load_config(path, overrides)` reads the YAML safely (a
`SafeLoader` that reads `1e-3` as a number, as YAML 1.2 does),
applies `--set dotted.key=value` overrides (values parsed as YAML, so `[knn,linear]` is a list),
and builds the typed sections; any unknown key, wrong type or out-of-range value raises
`ConfigError` naming the dotted key. Dicts cross process boundaries through `to_dict` /
`from_dict` only.

Checks come in two kinds. `from_dict` checks syntax and ranges only, so it is cheap wherever it
runs (a Ray worker, every sweep candidate, a laptop submitting to a cluster whose data it cannot
see). `check_data_sources` asks whether the data sources exist and carry what the stages need; it runs
where the job runs (`load_config(..., check_data=True)`, the default), before Ray starts.
"""
from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

import methods
from methods.backbones import BackboneConfig
from methods.config import ConfigError, build, param, to_dict as dataclass_to_dict
from orchestrator.search_space import SweepConfig, check_space, set_dotted
from orchestrator.storage import check_storage_path
from pipelines.data import DataConfig
from pipelines.sources import inspect_source
from pipelines.stages import STAGES, EvalConfig
from pipelines.train_loop import TrainConfig


@dataclass
class ClusterConfig:
    address: str | None = param(None, help="existing Ray cluster (auto, ray://..., host:port); "
                                           "None starts Ray in this process")
    num_cpus: int | None = param(None, ge=1, help="logical CPUs of an in-process Ray (None: all)")
    object_store_mb: int | None = param(None, ge=64, help="object store of an in-process Ray")
    storage_path: str | None = param(None, help="where runs are written: a path, shared by "
                                                "every node on a multi-machine cluster; "
                                                "default output.dir")
    dashboard: bool = param(True, help="start the dashboard (127.0.0.1) with an in-process Ray")
    shared_storage: bool | None = param(None, help="storage_path is mounted at the same place on "
                                                   "every node (NFS, Lustre, a PVC); None: tell "
                                                   "from its filesystem type")

    def validate(self, prefix: str) -> None:
        check_storage_path(self.storage_path, prefix)


@dataclass
class OutputConfig:
    dir: str = param("outputs", help="folder holding one sub-folder per run")
    name: str | None = param(None, help="run name; default <method>-<date>-<time>. "
                                        "Reusing a name resumes that run")


SECTIONS = ("method", "backbone", "data", "train", "eval", "cluster", "output", "sweep")


@dataclass
class ExperimentConfig:
    method_name: str
    method: Any
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sweep: SweepConfig | None = None


def from_dict(d: dict) -> ExperimentConfig:
    """Build and validate an ExperimentConfig from nested dicts (parsed YAML)."""
    if not isinstance(d, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {d!r}")
    unknown = sorted(set(d) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}; valid sections: {', '.join(SECTIONS)}")
    method = dict(d.get("method") or {})
    name = method.pop("name", None)
    if name is None:
        raise ConfigError(f"method.name: missing; registered methods: "
                          f"{', '.join(sorted(methods.METHODS))}")
    spec = methods.get(name)
    cfg = ExperimentConfig(
        method_name=name,
        method=build(spec.config, method, "method"),
        backbone=build(BackboneConfig, d.get("backbone"), "backbone"),
        data=build(DataConfig, d.get("data"), "data"),
        train=build(TrainConfig, d.get("train"), "train"),
        eval=build(EvalConfig, d.get("eval"), "eval"),
        cluster=build(ClusterConfig, d.get("cluster"), "cluster"),
        output=build(OutputConfig, d.get("output"), "output"),
        sweep=None if d.get("sweep") is None else build(SweepConfig, d["sweep"], "sweep"),
    )
    _check_across_sections(cfg)
    if cfg.sweep is not None:
        check_space(cfg.sweep, {k: v for k, v in d.items() if k != "sweep"}, from_dict)
    return cfg


def _check_across_sections(cfg: ExperimentConfig) -> None:
    # Building the views checks the geometry that depends on the image size (patch grids,
    # tiles, crops) now rather than in the first Ray Data task.
    methods.get(cfg.method_name).views(cfg.method, cfg.data.image_size)
    t = cfg.train
    if t.batch_size % t.num_workers:
        raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by train.num_workers "
                          f"= {t.num_workers}; every worker needs the same local batch")
    if t.batch_size // t.num_workers < 2:
        raise ConfigError(f"train.batch_size: {t.batch_size} gives each of {t.num_workers} workers "
                          f"fewer than 2 images; contrastive losses need 2 or more per worker")


def check_data_sources(cfg: ExperimentConfig) -> None:
    """The data sources exist, and are labeled where the evaluation stages need labels.

    Cheap (a top-level listing or a Parquet schema, never the full listing); raises ConfigError
    naming `data.source` / `data.eval_source` and the path.
    """
    infos = {key: inspect_source(spec, f"data.{key}", cfg.data)
             for key, spec in (("source", cfg.data.source), ("eval_source", cfg.data.eval_source))
             if spec is not None}
    if cfg.sweep is not None and cfg.data.eval_source is None and not infos["source"].labeled:
        raise ConfigError(f"data.source: {cfg.data.source} is unlabeled and a sweep ranks trials "
                          f"on an online kNN; set data.eval_source to a labeled source")
    if any(STAGES[s].needs_labels for s in cfg.eval.stages) and cfg.data.eval_source is None \
            and not infos["source"].labeled:
        raise ConfigError(f"eval.stages: {cfg.eval.stages} need labels but data.source "
                          f"{cfg.data.source} is unlabeled; set data.eval_source to a labeled "
                          f"source or eval.stages=[]")


def to_dict(cfg: ExperimentConfig) -> dict:
    out = {"method": {"name": cfg.method_name, **dataclass_to_dict(cfg.method)}}
    for section in SECTIONS[1:]:
        value = getattr(cfg, section)
        if value is not None:
            out[section] = dataclass_to_dict(value)
    return out


class YAMLLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that reads numbers as YAML 1.2 does: PyYAML follows YAML 1.1, where an
    exponent without a dot (`1e-3`, what users type for a learning rate) is a string."""


YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str):
    """YAML text -> Python values, safely (no tags, no code), numbers as YAML 1.2."""
    return yaml.load(text, Loader=YAMLLoader)  # noqa: S506 - a SafeLoader subclass


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """`["train.epochs=3", "eval.stages=[knn]"]` applied to a copy of `d`; values parsed as YAML."""
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. train.epochs=10")
        try:
            d = set_dotted(d, key.strip(), parse_yaml(raw) if raw.strip() else None)
        except ConfigError as e:
            raise ConfigError(f"--set {e}") from None
    return copy.deepcopy(d)


def read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            d = parse_yaml(f.read())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    return d or {}


def load_config(path: str | None, overrides: list[str] = (), *,
                check_data: bool = True) -> ExperimentConfig:
    """Read, override, validate; also fix the run name so the resolved config names its run.

    `check_data=False` leaves the data sources' existence to where the job runs (`submit`).
    """
    cfg = from_dict(apply_overrides(read_yaml(path) if path else {}, list(overrides)))
    if check_data:
        check_data_sources(cfg)
    if cfg.output.name is None:
        cfg.output.name = f"{cfg.method_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
