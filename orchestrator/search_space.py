"""The `sweep` section: a search space over dotted config keys, checked before any trial starts.

A sweep runs the whole experiment once per point of the space with Ray Tune (Liaw et al., 2018,
arXiv:1807.05118) and stops weak trials early with ASHA (Li et al., 2018, arXiv:1810.05934),
ranking them on the online kNN top-1 (Wu et al., 2018, arXiv:1805.01978), never on the loss:

    sweep:
      space:
        method.temperature: {grid: [0.1, 0.2, 0.5, 1.0]}   # every value, num_samples times each
        method.queue_size: {choice: [256, 1024]}           # one value drawn per sample
        train.lr: {loguniform: [0.05, 1.0]}                # log-uniform in [low, high]
        method.mask_ratio: {uniform: [0.5, 0.9]}           # uniform in [low, high]
      num_samples: 1

Every value a trial can get is built into a full config here, so an unknown key or an
out-of-range value fails before Ray starts, naming `sweep.space.<key>`. No Ray at import time:
config.py imports this module; `Dimension.to_tune` imports Ray Tune when called.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from methods.config import ConfigError, param

KINDS = ("grid", "choice", "uniform", "loguniform")
SCHEDULERS = ("asha", "none")
# Sections a sweep sets once for all trials: they cannot vary per trial.
FIXED_SECTIONS = ("sweep", "output", "cluster")
PBT_WHY = ("PBT is not supported with Ray Train V2: its exploit step restarts a trial from "
           "another trial's Tune checkpoint, but a trial here is a driver function whose "
           "checkpoints are Train's own (reported to Tune only as a path), so there is nothing "
           "for Tune to clone; use asha or none")


@dataclass(frozen=True)
class Dimension:
    """One swept key: `values` are the grid/choice values, or (low, high) of a range."""
    key: str
    kind: str
    values: tuple
    integer: bool = False  # a range over an int field samples ints

    def candidates(self) -> list:
        """Values validation builds a config with: every listed value, or both bounds and a
        point inside (not a whole number for a float range, so an int field is caught)."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        low, high = self.values
        if self.integer:
            return [low, (low + high) // 2, high]
        inside = math.sqrt(low * high) if self.kind == "loguniform" else (low + high) / 2
        if float(inside).is_integer():
            inside = low + (high - low) * 0.37
        return [low, inside, high]

    def to_tune(self):
        """This dimension as a Ray Tune domain (ranges include `high`)."""
        from ray import tune
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        if self.integer:
            sample = tune.lograndint if self.kind == "loguniform" else tune.randint
            return sample(low, high + 1)
        return (tune.loguniform if self.kind == "loguniform" else tune.uniform)(low, high)


@dataclass
class SweepConfig:
    space: dict[str, Any] = param(default_factory=dict, help="dotted key -> {grid: [..]}, "
                                  "{choice: [..]}, {uniform: [low, high]} or "
                                  "{loguniform: [low, high]}")
    num_samples: int = param(1, ge=1, help="samples of the space; a grid runs this many times")
    scheduler: str = param("asha", help="asha (early-stops on the online kNN) or none; "
                                        "pbt is not supported with Train V2")
    grace_period: int | None = param(None, ge=1, help="ASHA: epochs before a trial may be "
                                                      "stopped (None: eval.online_every)")
    reduction_factor: float = param(2.0, gt=1, help="ASHA: 1/fraction of trials kept per rung")
    max_concurrent_trials: int | None = param(None, ge=1, help="None: as many as the cluster's "
                                              "CPUs/GPUs fit, given each trial's needs")
    driver_cpus: float = param(0.0, ge=0, help="CPU share of each trial's driver function; 0 "
                               "reserves memory only: any CPU share would leave a 2-CPU machine "
                               "less than the 2 whole CPUs an evaluation's Ray Data needs")
    data_cpus: float = param(1.0, ge=0, help="CPUs each trial keeps free for its Ray Data tasks")
    collapse_std_ratio: float = param(0.05, ge=0, help="collapsed when the online "
                                      "embed_std_ratio (~1 healthy, 0 collapsed) falls below")
    collapse_knn_margin: float | None = param(0.02, ge=0, help="also collapsed when the online "
                                              "kNN top-1 <= 1/classes + margin (None: off)")

    def validate(self, prefix: str) -> None:
        if self.scheduler == "pbt":
            raise ConfigError(f"{prefix}.scheduler: {PBT_WHY}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"{prefix}.scheduler: {self.scheduler!r} is not one of "
                              f"{', '.join(SCHEDULERS)}")
        self.dimensions(prefix)

    def dimensions(self, prefix: str = "sweep") -> list[Dimension]:
        if not self.space:
            raise ConfigError(f"{prefix}.space: empty; give at least one dotted key, e.g. "
                              f"method.temperature: {{grid: [0.1, 0.5]}}")
        return [parse_dimension(f"{prefix}.space", k, v) for k, v in self.space.items()]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_dimension(prefix: str, key: Any, spec: Any) -> Dimension:
    """`{grid: [...]}` etc. for `key`, or ConfigError naming `<prefix>.<key>`."""
    where = f"{prefix}.{key}"
    if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"{where}: expected a dotted config key such as method.temperature")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected exactly one of {', '.join(KINDS)}, e.g. "
                          f"{{grid: [0.1, 0.5]}} or {{uniform: [0.1, 0.5]}}; got {spec!r}")
    (kind, values), = spec.items()
    if kind not in KINDS:
        raise ConfigError(f"{where}: {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(values, list):
        raise ConfigError(f"{where}: {kind} needs a list, got {values!r}")
    if kind in ("grid", "choice"):
        if not values:
            raise ConfigError(f"{where}: {kind} is empty; list at least one value")
        return Dimension(key, kind, tuple(values))
    if len(values) != 2 or not all(_is_number(v) for v in values):
        raise ConfigError(f"{where}: {kind} needs [low, high] (two numbers), got {values!r}")
    low, high = values
    if low >= high:
        raise ConfigError(f"{where}: {kind} low {low} must be < high {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform low {low} must be > 0")
    return Dimension(key, kind, (low, high))


def set_dotted(d: dict, key: str, value: Any) -> dict:
    """A copy of nested dict `d` with `key` (a.b.c) set to `value`."""
    d = copy.deepcopy(d)
    node = d
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value
    return d


def _is_int_field(cfg: Any, key: str) -> bool:
    """Whether dotted `key` of the built config `cfg` is declared int (not float)."""
    *path, name = key.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    if not dataclasses.is_dataclass(obj):
        return False
    tp = typing.get_type_hints(type(obj)).get(name)
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    args = typing.get_args(tp) if union else (tp,)
    return int in args and float not in args


def check_space(sweep: SweepConfig, experiment: dict, build: Callable[[dict], Any]
                ) -> list[Dimension]:
    """The dimensions of `sweep`, each value built into `experiment` (the config dict without
    its sweep section) with `build`; raises ConfigError naming `sweep.space.<key>`."""
    _check_experiment(sweep, build(experiment))
    dims = []
    for dim in sweep.dimensions():
        where = f"sweep.space.{dim.key}"
        if dim.key.split(".")[0] in FIXED_SECTIONS:
            raise ConfigError(f"{where}: {', '.join(FIXED_SECTIONS)} are set once per sweep, "
                              f"not per trial")
        cfg = _build_with(build, experiment, dim.key, dim.candidates()[0], where)
        if dim.kind in ("uniform", "loguniform") and _is_int_field(cfg, dim.key):
            if not all(float(v).is_integer() for v in dim.values):
                raise ConfigError(f"{where}: {dim.key} is an integer; give integer bounds, "
                                  f"got {list(dim.values)}")
            dim = Dimension(dim.key, dim.kind, tuple(int(v) for v in dim.values), integer=True)
        for value in dim.candidates()[1:]:
            _build_with(build, experiment, dim.key, value, where)
        dims.append(dim)
    return dims


def _check_experiment(sweep: SweepConfig, cfg: Any) -> None:
    """What every trial needs: the online kNN on a labeled probe, and ASHA rungs inside training."""
    if not cfg.eval.online_every:
        raise ConfigError("eval.online_every: 0 turns off the online kNN that a sweep ranks and "
                          "early-stops trials on; set it to 1 or more epochs")
    if cfg.cluster.address is None and not cfg.cluster.dashboard:
        raise ConfigError("cluster.dashboard: a sweep needs the dashboard: without it Ray "
                          "Train never releases the resources of stopped trials and the sweep "
                          "hangs; set it to true")
    grace = sweep.grace_period or cfg.eval.online_every
    if sweep.scheduler == "asha" and grace > cfg.train.epochs:
        raise ConfigError(f"sweep.grace_period: {grace} epochs is more than train.epochs = "
                          f"{cfg.train.epochs}; ASHA could never stop a trial")


def _build_with(build: Callable[[dict], Any], experiment: dict, key: str, value: Any,
                where: str) -> Any:
    try:
        return build(set_dotted(experiment, key, value))
    except ConfigError as e:
        raise ConfigError(f"{where}: the value {value!r} gives: {e}") from None


def count_trials(dims: list[Dimension], num_samples: int) -> int:
    """Trials Tune will run: the product of the grids, times num_samples."""
    return math.prod(len(d.values) for d in dims if d.kind == "grid") * num_samples
