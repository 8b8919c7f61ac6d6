"""The stage registry, the evaluation config, and the runner that chains stages as a small graph.

A stage declares what it requires (run first), which EvalConfig sections it reads (part of its
fingerprint), and optionally how to `load` its output back from its artifacts, so a later stage
can use it after the stage itself was skipped as unchanged.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from methods.config import param, to_dict
from pipelines.stages import fingerprint as fp
from pipelines.stages.arrays import labeled_arrays
from pipelines.stages.config import (EfficiencyConfig, FinetuneConfig, KMeansConfig, KNNConfig,
                                     LinearConfig, LowShotConfig, RobustnessConfig, TSNEConfig)

__all__ = ["Stage", "STAGES", "register_stage", "EvalConfig", "KNNConfig", "LinearConfig",
           "StageContext", "ordered", "run_stages"]


@dataclass
class Stage:
    name: str
    run: Callable[["StageContext"], dict]
    requires: tuple[str, ...] = ()
    needs_labels: bool = True
    config: tuple[str, ...] = ()   # EvalConfig sections the stage reads
    load: Callable[["StageContext"], Any] | None = None   # its output, from its artifacts
    extra: Callable[["StageContext"], Any] | None = None  # further inputs for the fingerprint


STAGES: dict[str, Stage] = {}


def register_stage(name: str, requires: tuple[str, ...] = (), needs_labels: bool = True, *,
                   config: tuple[str, ...] = (), load: Callable | None = None,
                   extra: Callable | None = None):
    def deco(fn):
        STAGES[name] = Stage(name, fn, tuple(requires), needs_labels, tuple(config), load, extra)
        return fn
    return deco


@dataclass
class EvalConfig:
    stages: list[str] = param(["knn", "linear"], choices=lambda: sorted(STAGES),
                              help="stages run after pretraining, in dependency order")
    batch_size: int = param(256, ge=1, help="images per embedding batch")
    online_every: int = param(5, ge=0, help="epochs between online kNN checks while pretraining "
                                            "(0: off); sweeps rank trials on it")
    torch_threads: int = param(1, ge=0, help="torch threads of stages run in the driver (0: "
                                             "torch's default); 1 matches Ray's one-CPU tasks")
    knn: KNNConfig = param(default_factory=KNNConfig)
    linear: LinearConfig = param(default_factory=LinearConfig)
    finetune: FinetuneConfig = param(default_factory=FinetuneConfig)
    lowshot: LowShotConfig = param(default_factory=LowShotConfig)
    cluster: KMeansConfig = param(default_factory=KMeansConfig)
    tsne: TSNEConfig = param(default_factory=TSNEConfig)
    robustness: RobustnessConfig = param(default_factory=RobustnessConfig)
    efficiency: EfficiencyConfig = param(default_factory=EfficiencyConfig)


@dataclass
class StageContext:
    """What stages share: the run, the checkpoint, the data splits and earlier stages' outputs."""
    run_dir: str                   # where stages/<name>/ are written
    checkpoint: str
    splits: Any                    # pipelines.data.Splits
    cfg: EvalConfig
    seed: int = 0
    outputs: dict = field(default_factory=dict)   # stage name -> in-memory result (features ...)
    train: dict = field(default_factory=dict)     # the run's summary["train"] figures
    data_id: str | None = None     # digest of the labeled splits; computed from `splits` if None
    skipped: list[str] = field(default_factory=list)   # stages re-used as unchanged
    arrays: dict = field(default_factory=dict)    # split -> (images, labels, keys)

    def stage_dir(self, name: str) -> str:
        path = os.path.join(self.run_dir, "stages", name)
        os.makedirs(path, exist_ok=True)
        return path

    def output(self, name: str) -> Any:
        """Stage `name`'s output: in memory, else loaded from its artifacts, else run again."""
        if name not in self.outputs:
            stage = STAGES[name]
            try:
                self.outputs[name] = stage.load(self) if stage.load else None
            except (OSError, KeyError, ValueError):
                self.outputs.pop(name, None)
            if self.outputs.get(name) is None:
                stage.run(self)
        return self.outputs.get(name)

    def images(self, split: str) -> tuple:
        """(images uint8 (N, S, S, 3), labels (N,), keys (N,)) of probe_<split>, sorted by key."""
        if split not in self.arrays:
            self.arrays[split] = labeled_arrays(getattr(self.splits, f"probe_{split}"))
        return self.arrays[split]

    def common_inputs(self) -> dict:
        """The inputs every stage shares: the checkpoint, the labeled data, the seed."""
        if self.data_id is None:
            self.data_id = self.splits.data_id if self.splits is not None else "none"
        return {"checkpoint": fp.checkpoint_digest(self.checkpoint), "data": self.data_id,
                "seed": self.seed}


def stage_inputs(ctx: StageContext, stage: Stage, common: dict, upstream: dict[str, str]) -> dict:
    """What `stage`'s result depends on; its digest is the stage's fingerprint."""
    return {"stage": stage.name, **common,
            "config": {s: to_dict(getattr(ctx.cfg, s)) for s in stage.config},
            "extra": stage.extra(ctx) if stage.extra else None,
            "requires": {r: upstream[r] for r in stage.requires}}


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


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_one(ctx: StageContext, stage: Stage, fingerprint: str, inputs: dict) -> dict:
    stage_dir = ctx.stage_dir(stage.name)
    fp.forget(stage_dir)
    start = time.perf_counter()
    metrics = stage.run(ctx) or {}
    metrics = {**metrics, "seconds": round(time.perf_counter() - start, 2)}
    fp.save(stage_dir, metrics, fingerprint, inputs)
    return metrics


def _log_line(name: str, metrics: dict, reused: bool) -> str:
    shown = {k: v for k, v in metrics.items() if isinstance(v, (float, str))}
    text = "  ".join(f"{v:.1f}s" if k == "seconds" else f"{k} {v:.4f}" if isinstance(v, float)
                     else f"{k}: {v}" for k, v in shown.items())
    return f"eval {name}: " + ("unchanged, re-used  " if reused else "") + text


def run_stages(ctx: StageContext, log: Callable[[str], None] = print, force: bool = False) -> dict:
    """Run `ctx.cfg.stages` and what they require, skipping stages whose inputs did not change
    (unless `force`); return {stage: metrics} of the requested ones."""
    results, fingerprints, common = {}, {}, ctx.common_inputs()
    with torch_threads(ctx.cfg.torch_threads):
        for name in ordered(ctx.cfg.stages):
            stage = STAGES[name]
            inputs = stage_inputs(ctx, stage, common, fingerprints)
            fingerprints[name] = fp.digest(inputs)
            metrics = None if force else fp.stored_metrics(ctx.stage_dir(name), fingerprints[name])
            reused = metrics is not None
            if reused:
                ctx.skipped.append(name)
            else:
                metrics = _run_one(ctx, stage, fingerprints[name], inputs)
            log(_log_line(name, metrics, reused))
            if name in ctx.cfg.stages:
                results[name] = metrics
    return results
