"""The one driver function that builds and fits the TorchTrainer; `run` and every sweep trial call it.

Workers (gloo on CPU, NCCL on GPU) get a shard of the streamed views, prepare the model, call the
plain loop in pipelines/train_loop.py once per epoch, report, and checkpoint every N epochs, and
inside epochs every M minutes or K steps (orchestrator/cadence.py). A run started again with the
same storage path and name resumes from its latest checkpoint (Train V2 restores it through
`ray.train.get_checkpoint()`), mid-epoch ones included. SIGTERM or Ctrl-C while `fit` waits makes
the workers save a checkpoint at their current step and return (orchestrator/interrupt.py).
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

import methods
from methods.config import ConfigError
from orchestrator.cadence import Cadence
from orchestrator.config import ExperimentConfig, from_dict, to_dict
from orchestrator.interrupt import Interrupted, StopFlag, StopPoll, Terminated, handling_signals
from orchestrator.ray_env import on_this_node
from orchestrator.tracking import RunLogger, read_records
from pipelines import checkpoint as ckpt
from pipelines.data import Splits
from pipelines.online import online_eval
from pipelines.train_loop import (Plan, build_optimizer, plan_run, prepare_module, train_epoch,
                                  unwrap)
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
    first_step_s: float | None = None  # from the command's start to the first step of this run


# After SIGTERM or a first Ctrl-C, how long the driver waits for the workers' checkpoint before
# it gives up and exits anyway (within the 30 s grace period that Kubernetes gives by default).
STOP_GRACE_S = 20.0


def build_info(cfg: ExperimentConfig) -> dict:
    d = to_dict(cfg)
    return {"method": d["method"], "backbone": d["backbone"], "image_size": cfg.data.image_size}


def _first_batch_tap(batches, fn):
    for i, batch in enumerate(batches):
        if i == 0:
            fn(batch)
        yield batch


def _restore(model, optimizer, device, candidates: list[str]) -> ckpt.ResumePoint:
    """Where to go on from, after the newest checkpoint; (0, 0, 0) for a fresh run.

    Ray restores the checkpoints its controller registered; a run killed between a checkpoint's
    upload and its registration leaves a newer complete directory that only `candidates` (a scan
    of the run folder as this worker group starts) knows about, so the newer of the two wins.
    """
    checkpoint = ray.train.get_checkpoint()
    with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext()) as ray_dir:
        dirs = sorted(([ray_dir] if ray_dir else []) + list(candidates),
                      key=lambda d: -1 if ckpt.step_of(d) is None else ckpt.step_of(d),
                      reverse=True)
        for d in dirs:
            try:
                return ckpt.load_train_state(d, model, optimizer, map_location=device)
            except (OSError, RuntimeError, KeyError, EOFError):
                continue  # a partly written checkpoint: try the next older one
    return ckpt.ResumePoint(0, 0, 0)


def _report(record: dict, save: bool, model, optimizer, info: dict) -> None:
    """Every worker reports (it is a barrier); only rank 0 attaches the checkpoint. A record
    with `epoch_step` was taken inside its epoch."""
    if save and ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as d:
            ckpt.save(d, model, optimizer, step=record["step"], epoch=record["epoch"],
                      epoch_step=record.get("epoch_step", 0), build_info=info)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(record)


def seed_worker(seed: int, rank: int) -> None:
    """Each worker's own random stream, from the run's seed and its rank. Called after the model
    is built from the one seed (DDP then broadcasts rank 0's weights anyway): with the one seed
    on every worker, every worker drew the same random numbers, e.g. MAE's masks."""
    torch.manual_seed(seed * 1_000_003 + rank)


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
    seed_worker(t.seed, rank)
    device = ray.train.torch.get_device()
    optimizer = build_optimizer(model, t)
    # Scanned by the worker, not passed from the driver: a worker group that Train restarts
    # within the run (a lost node) must also see checkpoints uploaded since fit() began.
    at = _restore(model, optimizer, device, checkpoint_candidates(run_dir))
    model = prepare_module(model, t)
    plan = plan_run(config["steps_per_epoch"], t)
    shard = ray.train.get_dataset_shard("train")
    log = RunLogger(run_dir, purge_step=at.step or None) if rank == 0 else None

    def save(record: dict) -> None:
        _report(record, True, model, optimizer, config["build_info"])

    cadence = Cadence(t, plan, rank=rank, device=device, save=save, log=log,
                      progress=config.get("progress") if rank == 0 else None,
                      stop=StopPoll(config.get("stop")) if rank == 0 else None,
                      started=config.get("started"))
    step = at.step
    for epoch in range(at.epoch, plan.epochs):
        # A resumed epoch runs only the steps it had left, on freshly drawn data: a Ray Data
        # stream cannot be resumed mid-epoch, so which images the first part saw is not known.
        done = at.epoch_step if epoch == at.epoch else 0
        if plan.epoch_steps(epoch) <= done:
            break  # a checkpoint past a shorter plan (max_steps lowered): nothing left to run
        cadence.start_epoch(epoch, done)
        start = time.time()
        batches = shard.iter_torch_batches(batch_size=t.batch_size // world, drop_last=True,
                                           local_shuffle_buffer_size=t.shuffle_buffer or None,
                                           prefetch_batches=t.prefetch_batches,
                                           pin_memory=device.type == "cuda", device=device)
        if log and epoch == at.epoch:
            batches = _first_batch_tap(batches, lambda b: log.images(step, unwrap(model).log_images(b)))
        stats = train_epoch(model, optimizer, batches, t, step=step, total_steps=plan.total,
                            steps_per_epoch=plan.warmup_epoch, steps=plan.epoch_steps(epoch) - done,
                            device=device, on_step_end=cadence)
        step, epoch_step = step + stats.steps, done + stats.steps
        stopped_inside = cadence.stopping and epoch_step < plan.epoch_steps(epoch)
        cut = stopped_inside or plan.epoch_steps(epoch) < plan.steps_per_epoch  # or max_steps
        record = _epoch_record(plan, epoch, step, stats, world, time.time() - start,
                               epoch_step if cut else None)
        if stopped_inside:
            save(record)  # a checkpoint at the current step; the epoch's line never came
            break
        if rank == 0 and _online_due(cfg, epoch, plan):
            record["online"] = _online(cfg, model, device)
        if log and cadence.first_step_s is not None and epoch == at.epoch:
            record["first_step_s"] = cadence.first_step_s
        due = epoch + 1 == plan.epochs or (epoch + 1) % t.checkpoint_every == 0
        _report(record, due or cadence.pending or cadence.stopping, model, optimizer,
                config["build_info"])
        if due or cadence.pending:
            cadence.saved()
        if log:
            log.epoch(record)
            if config.get("progress") is not None:
                config["progress"].put(record)
        if cadence.stopping:
            break
    if log:
        log.close()


def _epoch_record(plan: Plan, epoch: int, step: int, stats, world: int, wall: float,
                  epoch_step: int | None) -> dict:
    """What an epoch's pass reports; one that ended before its epoch (a stop, or `max_steps`)
    has `epoch_step`, the epoch's steps done, and `epoch_steps`, the steps it had to run."""
    record = {"epoch": epoch, "epochs": plan.epochs, "step": step, "loss": stats.loss,
              "images_per_s": stats.images * world / max(wall, 1e-9), "epoch_s": wall,
              "eta_s": wall / max(stats.steps, 1) * (plan.total - step), "metrics": stats.metrics}
    if epoch_step is not None:
        record.update(epoch_step=epoch_step, epoch_steps=plan.epoch_steps(epoch))
    return record


def _online_due(cfg: ExperimentConfig, epoch: int, plan: Plan) -> bool:
    every = cfg.eval.online_every
    return bool(every) and ((epoch + 1) % every == 0 or epoch + 1 == plan.epochs)


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
        callbacks: list | None = None, started: float | None = None,
        log: Callable[[str], None] = print) -> TrainResult:
    """Pretrain `cfg`'s method on `splits.pretrain`; resumes if `run_dir` holds a checkpoint.

    `callbacks` are Train `UserCallback`s, e.g. a sweep trial's report to Tune; `started` is the
    command's start (time.time()), for the first-step line. Where the CLI turned SIGTERM into
    an exception (orchestrator/interrupt.py), SIGTERM or a first Ctrl-C stops the workers at a
    checkpoint of their current step and raises `Interrupted`.
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
    stop = StopFlag.options(scheduling_strategy=on_this_node()).remote() \
        if handling_signals() else None
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"cfg": to_dict(cfg), "run_dir": run_dir, "threads": threads,
                           "steps_per_epoch": steps_per_epoch, "build_info": build_info(cfg),
                           "progress": progress, "stop": stop, "started": started},
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
    try:
        result = _fit_interruptibly(trainer, stop, log)
    except Interrupted as e:
        e.checkpoint = latest_checkpoint(run_dir)
        raise
    finally:
        if stop is not None:
            ray.kill(stop)
    wall = time.time() - start
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint in {run_dir}/checkpoints")
    return _summarise(result.checkpoint.path, run_dir, wall, resumed_from)


def _fit_interruptibly(trainer: TorchTrainer, stop=None, log: Callable[[str], None] = print):
    """`trainer.fit()` in a helper thread, so signals reach this (main) thread as exceptions.

    In the main thread Train installs its own SIGINT handler that aborts the run and exits the
    process. Here, with a `stop` flag, SIGTERM or a first Ctrl-C sets it and waits (at most
    STOP_GRACE_S) for the workers to checkpoint and return, then raises `Interrupted`; a second
    Ctrl-C, or any without a flag, is re-raised at once. Checkpoints already written stay.
    """
    box: dict = {}
    done = threading.Event()  # waited on, not the thread: a join cut short by a signal can
    # leave the thread marked as ended (CPython 3.11)

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the calling thread
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name="selfsup-fit", daemon=True).start()
    # Ctrl-C as KeyboardInterrupt here, whatever handler an earlier library left (Tune's)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler) \
        if threading.current_thread() is threading.main_thread() else None
    signum, deadline = None, float("inf")
    try:
        while time.monotonic() < deadline:
            try:
                if done.wait(0.5):
                    break
            except (KeyboardInterrupt, Terminated) as e:
                ctrl_c = isinstance(e, KeyboardInterrupt)
                if stop is None or (signum is not None and ctrl_c):
                    raise
                if signum is None:  # a repeated SIGTERM changes nothing
                    signum = signal.SIGINT if ctrl_c else signal.SIGTERM
                    stop.request.remote(signum.name)
                    deadline = time.monotonic() + STOP_GRACE_S
                    log(f"{signum.name}: saving a checkpoint at the current step, then stopping"
                        + (" (Ctrl-C again to quit at once)" if ctrl_c else ""))
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if signum is not None:
        raise Interrupted(signum, None)
    if "error" in box:
        raise box["error"]
    return box["result"]


def checkpoint_candidates(run_dir: str) -> list[str]:
    """Complete checkpoint directories of a run a restart can resume from, newest first."""
    return ckpt.run_checkpoints(run_dir, resumable=True)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint directory of a run (the one a restart resumes from)."""
    return next(iter(checkpoint_candidates(run_dir)), None)


def _summarise(checkpoint_dir: str, run_dir: str, wall: float, resumed_from: int) -> TrainResult:
    records = read_records(run_dir)
    at = ckpt.resume_point(ckpt.read_meta(checkpoint_dir))
    # The first epoch of a fresh start includes warm-up costs; steady state is the rest.
    ips = [r["images_per_s"] for r in records[1:]] or [r["images_per_s"] for r in records] or [0.0]
    first = [r["first_step_s"] for r in records if "first_step_s" in r]
    return TrainResult(checkpoint=checkpoint_dir, epochs=at.epoch, steps=at.step,
                       final_loss=records[-1]["loss"] if records else float("nan"),
                       images_per_s=sum(ips) / len(ips), wall_s=wall,
                       resumed_from_step=resumed_from, first_step_s=first[-1] if first else None)
