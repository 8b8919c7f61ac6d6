"""The one driver function that builds and fits the TorchTrainer; `run` and every sweep trial call it.

Workers (gloo on CPU, NCCL on GPU) get a shard of the streamed views, prepare the model, call the
plain loop in pipelines/train_loop.py once per epoch, report, and checkpoint every N epochs. A run
started again with the same storage path and name resumes from its latest checkpoint (Train V2
restores it through `ray.train.get_checkpoint()`).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

import methods
from methods.config import ConfigError
from orchestrator.config import ExperimentConfig, from_dict, to_dict
from orchestrator.tracking import RunLogger, read_records
from pipelines import checkpoint as ckpt
from pipelines.data import Splits
from pipelines.online import online_eval
from pipelines.train_loop import build_optimizer, prepare_module, train_epoch, unwrap
from pipelines.views import view_dataset


@dataclass
class TrainResult:
    checkpoint: str          # directory of the final checkpoint
    epochs: int
    steps: int
    final_loss: float
    images_per_s: float
    wall_s: float
    resumed_from_step: int


def build_info(cfg: ExperimentConfig) -> dict:
    d = to_dict(cfg)
    return {"method": d["method"], "backbone": d["backbone"], "image_size": cfg.data.image_size}


def _first_batch_tap(batches, fn):
    for i, batch in enumerate(batches):
        if i == 0:
            fn(batch)
        yield batch


def _restore(model, optimizer, device, candidates: list[str]) -> tuple[int, int]:
    """(step, first epoch to run) from the newest checkpoint, or (0, 0) for a fresh run.

    Ray restores the checkpoints its controller registered; a run killed between a checkpoint's
    upload and its registration leaves a newer complete directory that only `candidates` (a scan
    of the run folder as this worker group starts) knows about, so the newer of the two wins.
    """
    checkpoint = ray.train.get_checkpoint()
    with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext()) as ray_dir:
        dirs = sorted(([ray_dir] if ray_dir else []) + list(candidates),
                      key=lambda d: ckpt.read_meta(d)["step"], reverse=True)
        for d in dirs:
            try:
                step, epoch = ckpt.load_train_state(d, model, optimizer, map_location=device)
            except (OSError, RuntimeError, KeyError, EOFError):
                continue  # a partly written checkpoint: try the next older one
            return step, epoch + 1
    return 0, 0


def _report(record: dict, save: bool, model, optimizer, info: dict) -> None:
    """Every worker reports (it is a barrier); only rank 0 attaches the checkpoint."""
    if save and ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as d:
            ckpt.save(d, model, optimizer, step=record["step"], epoch=record["epoch"],
                      build_info=info)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(record)


def worker_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    cfg, run_dir = from_dict(config["cfg"]), config["run_dir"]
    t, world = cfg.train, ray.train.get_context().get_world_size()
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(t.seed)
    model = methods.get(cfg.method_name).model(cfg.method, cfg.backbone, cfg.data.image_size)
    if t.sync_batchnorm and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    optimizer = build_optimizer(model, t)
    # Scanned by the worker, not passed from the driver: a worker group that Train restarts
    # within the run (a lost node) must also see checkpoints uploaded since fit() began.
    step, start_epoch = _restore(model, optimizer, device, checkpoint_candidates(run_dir))
    model = prepare_module(model, t)
    steps_per_epoch, total = config["steps_per_epoch"], config["steps_per_epoch"] * t.epochs
    shard = ray.train.get_dataset_shard("train")
    log = RunLogger(run_dir, purge_step=step or None) if rank == 0 else None
    on_step = log.step if log else None
    for epoch in range(start_epoch, t.epochs):
        start = time.time()
        batches = shard.iter_torch_batches(batch_size=t.batch_size // world, drop_last=True,
                                           local_shuffle_buffer_size=t.shuffle_buffer or None,
                                           prefetch_batches=t.prefetch_batches,
                                           pin_memory=device.type == "cuda", device=device)
        if log and epoch == start_epoch:
            batches = _first_batch_tap(batches, lambda b: log.images(step, unwrap(model).log_images(b)))
        stats = train_epoch(model, optimizer, batches, t, step=step, total_steps=total,
                            steps_per_epoch=steps_per_epoch, device=device, on_step_end=on_step)
        step += stats.steps
        wall = time.time() - start
        record = {"epoch": epoch, "epochs": t.epochs, "step": step, "loss": stats.loss,
                  "images_per_s": stats.images * world / max(wall, 1e-9), "epoch_s": wall,
                  "eta_s": wall * (t.epochs - epoch - 1), "metrics": stats.metrics}
        if rank == 0 and _online_due(cfg, epoch):
            record["online"] = _online(cfg, model, device)
        save = (epoch + 1) % t.checkpoint_every == 0 or epoch + 1 == t.epochs
        _report(record, save, model, optimizer, config["build_info"])
        if log:
            log.epoch(record)
            if config.get("progress") is not None:
                config["progress"].put(record)
    if log:
        log.close()


def _online_due(cfg: ExperimentConfig, epoch: int) -> bool:
    every = cfg.eval.online_every
    return bool(every) and ((epoch + 1) % every == 0 or epoch + 1 == cfg.train.epochs)


def _online(cfg: ExperimentConfig, model, device) -> dict:
    """Rank 0's online kNN on the (unsplit) probe datasets; the others wait at the report barrier."""
    try:
        train = ray.train.get_dataset_shard("probe_train")
        test = ray.train.get_dataset_shard("probe_test")
    except KeyError:
        return {}
    size = cfg.eval.batch_size
    return online_eval(unwrap(model), train.iter_batches(batch_size=size),
                       test.iter_batches(batch_size=size), cfg.eval.knn.k[0],
                       cfg.eval.knn.temperature, device)


def worker_resources(cfg: ExperimentConfig) -> tuple[float, int]:
    """(CPUs reserved per worker, torch threads per worker), leaving Ray Data a CPU to decode."""
    t = cfg.train
    total = ray.cluster_resources().get("CPU", os.cpu_count() or 1)
    cpus = t.cpus_per_worker or max(0.5, min(4.0, (total - 1) / t.num_workers))
    local_cpus = os.cpu_count() or 1
    threads = t.torch_threads or max(1, local_cpus // t.num_workers)
    return cpus, threads


def fit(cfg: ExperimentConfig, splits: Splits, run_dir: str, progress=None,
        callbacks: list | None = None) -> TrainResult:
    """Pretrain `cfg`'s method on `splits.pretrain`; resumes if `run_dir` holds a checkpoint.

    `callbacks` are Train `UserCallback`s, e.g. a sweep trial's report to Tune.
    """
    t = cfg.train
    spec = methods.get(cfg.method_name)
    n = splits.counts["pretrain"]
    steps_per_epoch = (n // t.num_workers) // (t.batch_size // t.num_workers)
    if steps_per_epoch < 1:
        raise ConfigError(f"train.batch_size: {t.batch_size} is larger than the {n} pretraining "
                          f"images; lower it to at most {n // t.num_workers * t.num_workers}")
    views = spec.views(cfg.method, cfg.data.image_size)
    datasets = {"train": view_dataset(splits.pretrain, views, cfg.data.view_batch_size,
                                      cfg.data.remote_args(), streamed=splits.streamed)}
    if cfg.eval.online_every and splits.probe_test is not None:
        datasets.update(probe_train=splits.probe_train, probe_test=splits.probe_test)
    cpus, threads = worker_resources(cfg)
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"cfg": to_dict(cfg), "run_dir": run_dir, "threads": threads,
                           "steps_per_epoch": steps_per_epoch, "build_info": build_info(cfg),
                           "progress": progress},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name="checkpoints", storage_path=run_dir, callbacks=callbacks,
            failure_config=FailureConfig(max_failures=t.max_failures,
                                         controller_failure_limit=t.controller_failure_limit),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    previous = latest_checkpoint(run_dir)
    resumed_from = ckpt.read_meta(previous)["step"] if previous else 0
    start = time.time()
    result = _fit_interruptibly(trainer)
    wall = time.time() - start
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint in {run_dir}/checkpoints")
    return _summarise(result.checkpoint.path, run_dir, wall, resumed_from)


def _fit_interruptibly(trainer: TorchTrainer):
    """`trainer.fit()` in a helper thread, so Ctrl-C reaches us as KeyboardInterrupt.

    In the main thread Train installs its own SIGINT handler that aborts the run and exits the
    process; here the CLI can say how to resume instead. The checkpoints already written stay.
    """
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the calling thread
            box["error"] = e

    thread = threading.Thread(target=target, name="selfsup-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in box:
        raise box["error"]
    return box["result"]


def checkpoint_candidates(run_dir: str) -> list[str]:
    """Complete checkpoint directories of a run, newest (highest step) first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [os.path.join(root, d) for d in os.listdir(root) if d.startswith("checkpoint_")]
    complete = [d for d in found if all(os.path.exists(os.path.join(d, f))
                                        for f in (ckpt.MODEL, ckpt.TRAIN_STATE, ckpt.META))]
    return sorted(complete, key=lambda d: ckpt.read_meta(d)["step"], reverse=True)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint directory of a run (the one a restart resumes from)."""
    return next(iter(checkpoint_candidates(run_dir)), None)


def _summarise(checkpoint_dir: str, run_dir: str, wall: float, resumed_from: int) -> TrainResult:
    records = read_records(run_dir)
    meta = ckpt.read_meta(checkpoint_dir)
    # The first epoch of a fresh start includes warm-up costs; steady state is the rest.
    ips = [r["images_per_s"] for r in records[1:]] or [r["images_per_s"] for r in records] or [0.0]
    return TrainResult(checkpoint=checkpoint_dir, epochs=meta["epoch"] + 1, steps=meta["step"],
                       final_loss=records[-1]["loss"] if records else float("nan"),
                       images_per_s=sum(ips) / len(ips), wall_s=wall,
                       resumed_from_step=resumed_from)
