"""`selfsup sweep`: Ray Tune over a config's `sweep.space`, each trial the whole `run_experiment`.

A trial is a Tune function (the driver-function pattern of Train V2) that builds its config from
the sampled values and calls `run_experiment`, the same chain as `selfsup run`; its TorchTrainer
reports every epoch to Tune through a `TuneReportCallback`, every E-th with an online kNN check.
ASHA (Li et al., 2018, arXiv:1810.05934) stops weak trials on that kNN top-1 (Wu et al., 2018,
arXiv:1805.01978); a stopper ends trials whose embeddings collapse (SimSiam's measure, Chen & He,
2021, arXiv:2011.10566). Layout of `<output>/<sweep>/`: `sweep.yaml` (the resolved config),
`<trial_id>/` (each trial's run folder), `tune/` (Tune's state, what `--resume` restores),
`tensorboard/<trial_id>/`, `leaderboard.{csv,parquet}` and `best.json`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass

import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from methods.config import ConfigError
from orchestrator.config import ExperimentConfig, dump_yaml, from_dict, to_dict
from orchestrator.ray_env import init_ray
from orchestrator.run import run_dir_of, run_experiment
from orchestrator.search_space import Dimension, check_space, count_trials, set_dotted
from orchestrator.sweep_results import (METRIC, CollapseRule, collect_rows, format_leaderboard,
                                        is_collapsed, method_metrics, trial_status, write_outputs)
from orchestrator.tracking import read_records
from pipelines.data import list_sources

TUNE_DIR = "tune"
EVAL_CPUS = 2.0            # the embed stage's Ray Data actor and a task beside it
DRIVER_MEMORY = 128 * 2**20  # what a trial's driver reserves when sweep.driver_cpus is 0


@dataclass
class TrialResources:
    concurrent: int          # trials running at once
    fits: int                # trials the cluster fits at once
    cpus_per_worker: float   # CPUs of each Train worker of a trial
    torch_threads: int       # intra-op threads of each Train worker


def trial_resources(cfg: ExperimentConfig, cluster: dict) -> TrialResources:
    """How many trials fit at once, and what each trial's workers get.

    While training, a trial holds its driver's share, `sweep.data_cpus` for its Ray Data tasks
    (each a whole CPU) and its Train workers (train.cpus_per_worker, or at least 0.5 each when
    that is 0); while evaluating, a Ray Data actor and its tasks: EVAL_CPUS whole CPUs.
    """
    t, s = cfg.train, cfg.sweep
    total = float(cluster.get("CPU", 1.0))
    fixed = s.driver_cpus + s.data_cpus
    evaluating = EVAL_CPUS if cfg.eval.stages else 0.0
    need = s.driver_cpus + max(evaluating, s.data_cpus + t.num_workers * (t.cpus_per_worker or 0.5))
    fits = int((total + 1e-9) // need)
    if t.use_gpu:
        fits = min(fits, int(cluster.get("GPU", 0) // t.num_workers))
    concurrent = s.max_concurrent_trials or max(1, fits)
    cpus = t.cpus_per_worker or max(0.5, math.floor(20 * (total / concurrent - fixed)
                                                     / t.num_workers) / 20)
    return TrialResources(concurrent, fits, cpus, t.torch_threads or max(1, int(cpus)))


def _absolute_source(spec: str | None) -> str | None:
    """Tune moves a trial into its own folder, so relative source paths are resolved here."""
    kind, sep, path = (spec or "").partition(":")
    if not sep or "://" in path or os.path.isabs(path):
        return spec
    return f"{kind}:{os.path.abspath(path)}"


def trial_config(base: dict, values: dict, sweep_dir: str, trial_id: str,
                 res: TrialResources) -> ExperimentConfig:
    """The experiment of one trial: `base` (no sweep section) with the sampled `values`, run in
    `<sweep_dir>/<trial_id>` with the trial's share of the cluster."""
    d = base
    for key, value in values.items():
        d = set_dotted(d, key, value)
    d = set_dotted(d, "output.dir", sweep_dir)
    d = set_dotted(d, "output.name", trial_id)
    d = set_dotted(d, "cluster.storage_path", None)
    d = set_dotted(d, "train.cpus_per_worker", res.cpus_per_worker)
    d = set_dotted(d, "train.torch_threads", res.torch_threads)
    for key in ("data.source", "data.eval_source"):
        section, name = key.split(".")
        d = set_dotted(d, key, _absolute_source(d.get(section, {}).get(name)))
    return from_dict(d)


def tune_result(record: dict) -> dict:
    """A Train epoch record as the flat result Tune sees; only epochs with an online check
    carry the kNN top-1 that ASHA, the collapse stopper and the ranking use. The method's own
    epoch means come as `method/<name>` (DINO's teacher entropy is a collapse signal)."""
    method = {f"method/{k}": v for k, v in record.get("metrics", {}).items()}
    return {"epochs_done": record["epoch"] + 1, "epochs": record["epochs"],
            "loss": record["loss"], **method, **record.get("online", {})}


class EpochReportCallback(TuneReportCallback):
    """Every epoch to Tune, so a trial Tune stops ends at its next epoch: the trial's function
    is only told to stop when it hands Tune a result."""

    def after_report(self, run_context, metrics, checkpoint):
        if "epoch_step" in metrics[0]:
            return  # a checkpoint inside an epoch (time, steps, a stop): Tune counts epochs
        record = next((m for m in metrics if m.get("online")), metrics[0])  # rank 0's check
        super().after_report(run_context, [tune_result(record)], checkpoint)


def _final_result(summary: dict, run_dir: str) -> dict:
    online = [r for r in read_records(run_dir) if r.get("online")]
    last = tune_result(online[-1]) if online else {METRIC: float("nan")}
    return {**last, "epochs_done": summary["train"]["epochs"], "completed": True}


def _file_log(path: str):
    def log(line: str) -> None:
        with open(path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {line}\n")
    return log


def listing_dir(sweep_dir: str) -> str:
    return os.path.join(sweep_dir, "data")


@ray.remote(num_cpus=0)
def _run_chain(cfg: ExperimentConfig, callbacks: list) -> dict:
    run_dir = run_dir_of(cfg)
    return run_experiment(cfg, log=_file_log(os.path.join(run_dir, "run.log")),
                          callbacks=callbacks, listing_dir=listing_dir(os.path.dirname(run_dir)))


def run_trial(config: dict, base: dict, sweep_dir: str, resources: TrialResources) -> None:
    """The Tune function of one trial: the whole chain through `run_experiment`.

    The chain runs in a task on this node whose RAY_ADDRESS names this cluster. When Tune stops
    a trial it kills this process, and with it the Train controller; the worker group's
    placement group is then freed by Train's PlacementGroupCleaner, a detached actor that finds
    the State API through RAY_ADDRESS, else through the machine's only Ray: with several Ray
    instances on one machine it found none, and stopped trials held their CPUs for good.
    """
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, config, sweep_dir, trial_id, resources)
    run_dir = run_dir_of(cfg)
    os.makedirs(run_dir, exist_ok=True)
    log = _file_log(os.path.join(run_dir, "run.log"))
    summary = _finished_summary(run_dir, cfg.train.epochs)
    if summary is None:
        log(f"trial {trial_id} started: {config}")
        here = ray.get_runtime_context()
        chain = _run_chain.options(
            runtime_env={"env_vars": {"RAY_ADDRESS": here.gcs_address}},
            scheduling_strategy=NodeAffinitySchedulingStrategy(here.get_node_id(), soft=False))
        summary = ray.get(chain.remote(cfg, [EpochReportCallback()]))
    else:  # interrupted after its chain ended but before Tune saw it end
        log(f"trial {trial_id} had finished; reporting its summary.json again")
    tune.report(_final_result(summary, run_dir))
    log(f"trial {trial_id} completed")


def _finished_summary(run_dir: str, epochs: int) -> dict | None:
    """The summary.json of a trial whose whole chain already ran, else None."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    return summary if summary.get("train", {}).get("epochs", 0) >= epochs else None


class CollapseStopper(tune.Stopper):
    """Stops a trial whose run collapsed (see sweep_results.CollapseRule)."""

    def __init__(self, rule: CollapseRule):
        self.rule = rule

    def __call__(self, trial_id: str, result: dict) -> bool:
        return not result.get("completed") and is_collapsed(result, self.rule)

    def stop_all(self) -> bool:
        return False


class ProgressPrinter(tune.Callback):
    """One line per trial result, and one when a trial ends, with its status."""

    def __init__(self, keys: list[str], rule: CollapseRule):
        self.keys, self.rule = keys, rule

    def _label(self, trial) -> str:
        values = "  ".join(f"{k}={trial.config.get(k)}" for k in self.keys)
        return f"{trial.trial_id}  {values}"

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if METRIC in result and not result.get("completed"):
            reason = self.rule.reason(result)
            own = "  ".join(f"{k} {v:.3f}" for k, v in method_metrics(result).items())
            print(f"{self._label(trial)}  epoch {result.get('epochs_done')}/{result.get('epochs')}"
                  f"  {METRIC} {result.get(METRIC, float('nan')):.4f}  embed_std_ratio "
                  f"{result.get('embed_std_ratio', float('nan')):.3f}" + (f"  {own}" if own else "")
                  + (f"  collapsed: {reason}" if reason else ""), flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        status = trial_status("TERMINATED", last, self.rule)
        print(f"{self._label(trial)}  {status}  {METRIC} {last.get(METRIC, float('nan')):.4f}",
              flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        print(f"{self._label(trial)}  error (see {trial.path})", flush=True)


def _driver_resources(cpus: float) -> dict:
    """A trial driver's reservation: a CPU share, or memory only (Tune refuses an empty one)."""
    return {"cpu": cpus} if cpus else {"cpu": 0, "memory": DRIVER_MEMORY}


def _trial_dirname(trial) -> str:
    return trial.trial_id


def collapse_rule(cfg: ExperimentConfig, classes: list[str]) -> CollapseRule:
    """The sweep's collapse checks; a kNN top-1 of 1/classes + sweep.collapse_knn_margin or less
    means collapsed features."""
    margin = cfg.sweep.collapse_knn_margin
    chance = None if margin is None or not classes else 1 / len(classes) + margin
    return CollapseRule(cfg.sweep.collapse_std_ratio, chance, cfg.method_name)


def _tuner(cfg: ExperimentConfig, dims: list[Dimension], trainable, sweep_dir: str,
           res: TrialResources, rule: CollapseRule):
    s = cfg.sweep
    scheduler = FIFOScheduler() if s.scheduler == "none" else ASHAScheduler(
        time_attr="epochs_done", max_t=cfg.train.epochs, reduction_factor=s.reduction_factor,
        grace_period=s.grace_period or cfg.eval.online_every, stop_last_trials=False)
    return tune.Tuner(
        trainable, param_space={d.key: d.to_tune() for d in dims},
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler,
                                    num_samples=s.num_samples, max_concurrent_trials=res.concurrent,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=sweep_dir, verbose=0,
            stop=CollapseStopper(rule),
            callbacks=[ProgressPrinter([d.key for d in dims], rule)]))


def experiment_dict(cfg: ExperimentConfig) -> dict:
    """The config without its sweep section: what each trial starts from."""
    return {k: v for k, v in to_dict(cfg).items() if k != "sweep"}


def _prepare(cfg: ExperimentConfig, sweep_dir: str, resume: bool) -> None:
    """Save the sweep's config, or on --resume check it is the one the sweep started with."""
    saved_path = os.path.join(sweep_dir, "sweep.yaml")
    can_resume = os.path.exists(os.path.join(sweep_dir, TUNE_DIR, "tuner.pkl"))
    if resume and not can_resume:
        raise ConfigError(f"output.name: no sweep to resume in {sweep_dir}; run it without "
                          f"--resume first")
    if not resume and can_resume:
        raise ConfigError(f"output.name: {sweep_dir} already holds a sweep; add --resume to "
                          f"continue it, or give another --name")
    if resume:
        with open(saved_path) as f:
            saved = {k: v for k, v in yaml.safe_load(f).items() if k != "cluster"}
        current = {k: v for k, v in to_dict(cfg).items() if k != "cluster"}
        if saved != current:
            raise ConfigError(f"--resume: the config differs from the one {sweep_dir} started "
                              f"with ({saved_path}); resume with the same config and --set")
        return
    os.makedirs(sweep_dir, exist_ok=True)
    with open(saved_path, "w") as f:
        f.write(dump_yaml(cfg))


def run_sweep(cfg: ExperimentConfig, *, resume: bool = False, verbose: bool = False,
              log=print) -> list[dict]:
    """Run (or resume) the sweep of `cfg`; write the leaderboard; return its rows, best first."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1" if verbose else "0")  # 0: our lines only
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # epochs without an online check
    if cfg.sweep is None:
        raise ConfigError("sweep: this config has no sweep section (see configs/sweeps/)")
    sweep_dir = run_dir_of(cfg)
    dims = check_space(cfg.sweep, experiment_dict(cfg), from_dict)
    _prepare(cfg, sweep_dir, resume)
    init_ray(cfg.cluster, verbose)
    # listed once here, in Ray tasks, and read back by every trial
    rule = collapse_rule(cfg, list_sources(cfg.data, listing_dir(sweep_dir)))
    res = trial_resources(cfg, ray.cluster_resources())
    if res.concurrent > max(res.fits, 1):
        log(f"warning: sweep.max_concurrent_trials={res.concurrent} but the cluster fits "
            f"{res.fits} trial(s) at once; trials will wait for CPUs")
    log(f"sweep {cfg.output.name}: {count_trials(dims, cfg.sweep.num_samples)} trial(s) of "
        f"{cfg.method_name} over {', '.join(d.key for d in dims)}; {cfg.sweep.scheduler} on "
        f"online {METRIC} every {cfg.eval.online_every} epoch(s); {res.concurrent} at once, "
        f"{res.cpus_per_worker:g} CPU(s) per Train worker; outputs in {sweep_dir}")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=experiment_dict(cfg), sweep_dir=sweep_dir,
                             resources=res), _driver_resources(cfg.sweep.driver_cpus))
    tune_dir = os.path.join(sweep_dir, TUNE_DIR)
    tuner = (tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, resume_errored=True)
             if resume else _tuner(cfg, dims, trainable, sweep_dir, res, rule))
    tuner.fit()
    rows = collect_rows(tune.ExperimentAnalysis(tune_dir).trials, sweep_dir,
                        [d.key for d in dims], rule)
    write_outputs(sweep_dir, rows, [d.key for d in dims])
    return rows


def add_parser(sub) -> None:
    from orchestrator.cli import add_config_args
    p = sub.add_parser("sweep")
    add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: finished trials are kept, unfinished "
                        "ones continue from their checkpoints")
    p.set_defaults(handler=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    """The sweep folder is --name, else the config's output.name, else the config file's stem."""
    from orchestrator.cli import resolve
    from orchestrator.config import read_yaml
    if args.config is None:
        raise ConfigError("sweep: give a config with a sweep section, e.g. "
                          "configs/sweeps/simclr_temperature.yaml")
    if not args.name and not (read_yaml(args.config).get("output") or {}).get("name"):
        args.name = os.path.splitext(os.path.basename(args.config))[0]
    cfg = resolve(args)
    start = time.time()
    rows = run_sweep(cfg, resume=args.resume, verbose=args.verbose,
                     log=lambda s: print(s, flush=True))
    keys = [d.key for d in cfg.sweep.dimensions()]
    sweep_dir = run_dir_of(cfg)
    print(f"\nleaderboard ({len(rows)} trials, ranked by online {METRIC}, "
          f"{time.time() - start:.0f} s):\n{format_leaderboard(rows, keys)}")
    print(f"outputs:     {sweep_dir}/leaderboard.csv, leaderboard.parquet, best.json")
    print(f"tensorboard: tensorboard --logdir {os.path.join(sweep_dir, 'tensorboard')}")
    if any(r["status"] == "unfinished" for r in rows):
        again = [a for a in sys.argv[1:] if a != "--resume"] + ["--resume"]
        print(f"selfsup: sweep interrupted; continue it with: selfsup {shlex.join(again)}",
              flush=True)
        return 130
    return 0
