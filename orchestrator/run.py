"""One experiment from a validated config: data -> pretraining -> evaluation stages -> summary.

`run_experiment` is the whole chain; `selfsup run` calls it, and so does every sweep trial.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict
from typing import Callable

import ray

from orchestrator.config import ExperimentConfig, dump_yaml
from orchestrator.ray_env import init_ray, on_this_node, spilled_mb
from orchestrator.report import read_summary, write_report_logged
from orchestrator.tracking import progress_line
from orchestrator.train import TrainResult, fit, latest_checkpoint
from pipelines import checkpoint as ckpt
from pipelines.data import load_splits
from pipelines.stages import STAGES, StageContext, run_stages


def run_dir_of(cfg: ExperimentConfig) -> str:
    root = cfg.cluster.storage_path or cfg.output.dir
    return os.path.abspath(os.path.join(os.path.expanduser(root), cfg.output.name))


def _print_progress(queue, stop: threading.Event, log: Callable[[str], None]) -> None:
    while not stop.is_set():
        try:
            record = queue.get(timeout=0.5)
        except Exception:  # queue.Empty, or the actor going away at shutdown
            continue
        log(progress_line(record))


def _train(cfg: ExperimentConfig, splits, run_dir: str, log: Callable[[str], None],
           callbacks: list | None = None, started: float | None = None) -> TrainResult:
    previous = latest_checkpoint(run_dir)
    if previous:
        meta = ckpt.read_meta(previous)
        at = ckpt.resume_point(meta)
        t = cfg.train
        if at.epoch >= t.epochs or (t.max_steps and at.step >= t.max_steps):
            log(f"{cfg.output.name} already trained {at.epoch} epochs, {at.step} steps; "
                f"evaluating it")
            return TrainResult(previous, at.epoch, at.step, float("nan"), 0.0, 0.0, at.step)
        inside = f" ({at.epoch_step} steps into it)" if at.epoch_step else ""
        log(f"resuming {cfg.output.name} from epoch {meta['epoch'] + 1}, step {at.step}{inside}")
    from ray.util.queue import Queue
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": on_this_node()})
    stop = threading.Event()
    printer = threading.Thread(target=_print_progress, args=(queue, stop, log), daemon=True)
    printer.start()
    try:
        return fit(cfg, splits, run_dir, progress=queue, callbacks=callbacks, started=started,
                   log=log)
    finally:
        time.sleep(0.6)  # let the last epoch's line through
        stop.set()
        printer.join(timeout=2)
        ray.kill(queue.actor)


def run_experiment(cfg: ExperimentConfig, *, verbose: bool = False,
                   log: Callable[[str], None] = print, callbacks: list | None = None,
                   force: bool = False, listing_dir: str | None = None,
                   started: float | None = None) -> dict:
    """Train and evaluate; write config.yaml, summary.json, tensorboard/, checkpoints/, stages/.

    `callbacks` go to the TorchTrainer's RunConfig (a sweep trial passes its Tune report);
    `force` re-runs evaluation stages whose inputs did not change; `listing_dir` holds the
    listing of a file source (default `<run>/data`; a sweep's trials share the sweep's);
    `started` is the command's start (time.time(); default: now), from which the first
    training step is timed.
    """
    started = time.time() if started is None else started
    run_dir = run_dir_of(cfg)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(dump_yaml(cfg))
    init_ray(cfg.cluster, verbose)
    need_labels = any(STAGES[s].needs_labels for s in cfg.eval.stages)
    splits = load_splits(cfg.data, need_labels,
                         cache_dir=listing_dir or os.path.join(run_dir, "data"), log=log)
    log(f"data: {cfg.data.source}, {splits.counts}"
        + (", streamed from storage every epoch" if splits.streamed else ""))
    if splits.known_skipped:
        log(f"skipped {len(splits.known_skipped)} unreadable image(s), e.g. "
            f"{splits.known_skipped[:3]}")
    train = _train(cfg, splits, run_dir, log, callbacks, started)
    summary = {"run": cfg.output.name, "run_dir": run_dir, "method": cfg.method_name,
               "train": _train_figures(run_dir, train, splits), "eval": {}}
    if cfg.eval.stages:
        ctx = StageContext(run_dir=run_dir, checkpoint=train.checkpoint, splits=splits,
                           cfg=cfg.eval, seed=cfg.data.seed, train=summary["train"])
        summary["eval"] = run_stages(ctx, log=log, force=force)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    _log_eval_to_tensorboard(run_dir, summary["eval"], train.steps)
    write_report_logged(run_dir, log)
    return summary


def _train_figures(run_dir: str, train: TrainResult, splits) -> dict:
    """summary["train"]; a re-run that trained nothing keeps the figures of the run that did."""
    skipped = splits.skipped  # a streamed source finds its bad images while training
    figures = {**asdict(train), "skipped_images": len(skipped), "skipped": skipped[:100],
               "data": {**splits.counts, "skipped": len(skipped)},
               "streamed": splits.streamed, "object_store_spilled_mb": spilled_mb()}
    if train.resumed_from_step == train.steps:
        previous = read_summary(run_dir).get("train", {})
        if previous.get("steps") == train.steps:
            figures = {**previous, "checkpoint": train.checkpoint}
    return figures


def _log_eval_to_tensorboard(run_dir: str, results: dict, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(os.path.join(run_dir, "tensorboard")) as w:
        for stage, metrics in results.items():
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "seconds":
                    w.add_scalar(f"eval/{stage}/{k}", v, step)
