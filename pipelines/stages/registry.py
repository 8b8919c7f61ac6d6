"""The stage registry, the evaluation config and the runner."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from methods.config import ConfigError, param


@dataclass
class Stage:
    name: str
    run: Callable[["StageContext"], dict]
    requires: tuple[str, ...] = ()
    needs_labels: bool = True


STAGES: dict[str, Stage] = {}


def register_stage(name: str, requires: tuple[str, ...] = (), needs_labels: bool = True):
    def deco(fn):
        STAGES[name] = Stage(name, fn, requires, needs_labels)
        return fn
    return deco


@dataclass
class KNNConfig:
    # Weighted kNN of Wu et al., 2018, arXiv:1805.01978: k = 200, temperature 0.07.
    k: list[int] = param([20, 200], help="neighbour counts; top1 is reported for the first")
    temperature: float = param(0.07, gt=0)

    def validate(self, prefix: str) -> None:
        if not self.k or min(self.k) < 1:
            raise ConfigError(f"{prefix}.k: {self.k} must be a non-empty list of integers >= 1")


@dataclass
class LinearConfig:
    epochs: int = param(100, ge=1, help="passes over the frozen training features")
    lrs: list[float] = param([0.1, 0.01, 0.001], help="grid; the best on a validation split wins")
    weight_decay: float = param(0.0, ge=0)
    batch_size: int = param(256, ge=1)
    val_fraction: float = param(0.1, gt=0, lt=1, help="validation split carved from train")

    def validate(self, prefix: str) -> None:
        if not self.lrs or min(self.lrs) <= 0:
            raise ConfigError(f"{prefix}.lrs: {self.lrs} must be a non-empty list of values > 0")


@dataclass
class EvalConfig:
    stages: list[str] = param(["knn", "linear"], choices=lambda: sorted(STAGES),
                              help="stages run after pretraining, in dependency order")
    batch_size: int = param(256, ge=1, help="images per embedding batch")
    online_every: int = param(5, ge=0, help="epochs between online kNN checks while pretraining "
                                            "(0: off); sweeps rank trials on it")
    knn: KNNConfig = param(default_factory=KNNConfig)
    linear: LinearConfig = param(default_factory=LinearConfig)


@dataclass
class StageContext:
    """What stages share: the run, the checkpoint, the data splits and earlier stages' outputs."""
    run_dir: str
    checkpoint: str
    splits: Any  # pipelines.data.Splits
    cfg: EvalConfig
    seed: int = 0
    outputs: dict = field(default_factory=dict)   # stage name -> in-memory result (features ...)

    def stage_dir(self, name: str) -> str:
        path = os.path.join(self.run_dir, "stages", name)
        os.makedirs(path, exist_ok=True)
        return path


def ordered(names: list[str]) -> list[str]:
    """`names` with their requirements, each after what it requires."""
    out: list[str] = []

    def visit(name: str) -> None:
        for dep in STAGES[name].requires:
            visit(dep)
        if name not in out:
            out.append(name)

    for name in names:
        visit(name)
    return out


def run_stages(ctx: StageContext, log: Callable[[str], None] = print) -> dict:
    """Run `ctx.cfg.stages` (and what they require); return {stage: metrics} of the requested ones."""
    results = {}
    for name in ordered(ctx.cfg.stages):
        start = time.perf_counter()
        metrics = STAGES[name].run(ctx) or {}
        metrics = {**metrics, "seconds": round(time.perf_counter() - start, 2)}
        with open(os.path.join(ctx.stage_dir(name), "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        if name in ctx.cfg.stages:
            results[name] = metrics
            shown = {k: v for k, v in metrics.items() if isinstance(v, float)}
            log(f"eval {name}: " + "  ".join(f"{k} {v:.4f}" if k != "seconds" else f"{v:.1f}s"
                                             for k, v in shown.items()))
    return results
