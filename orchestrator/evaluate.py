"""`selfsup eval CHECKPOINT`: the evaluation stages on any checkpoint, outside `selfsup run`.

selfsup eval CHECKPOINT [--stages knn,linear,...] [--set KEY=VALUE ...] [--force] [--output DIR]
selfsup baseline CONFIG [--set KEY=VALUE ...] [--name NAME] [--force]

CHECKPOINT is a checkpoint directory (model.pt, meta.json) or a run folder (its latest checkpoint).
The model comes from the checkpoint's meta.json. The data and eval config come from the run's
config.yaml when the checkpoint sits in a run (`<run>/checkpoints/checkpoint_x/`), else from the
defaults at the checkpoint's image size; `--set` overrides either. Results go into the run's
stages/ and summary.json (or --output) and report.html is rewritten. Stages whose inputs did not
change are re-used; --force runs them again.

`selfsup baseline CONFIG` evaluates the config's method and backbone at random init, untrained —
the network `selfsup run CONFIG` starts from (same seed) — with the config's stages: the number a
pretrained run has to beat. It writes a run folder `<output.dir>/<method>-random-init` (or --name).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable

from methods.config import ConfigError
from orchestrator.config import ExperimentConfig, apply_overrides, dump_yaml, from_dict, read_yaml
from orchestrator.report import read_summary, write_report_logged
from pipelines import checkpoint as ckpt


def locate(path: str) -> tuple[str, str | None]:
    """(checkpoint directory, run folder or None) of a checkpoint or run path."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(os.path.join(path, ckpt.META)):
        found = ckpt.run_checkpoints(path, resumable=False)
        if not found:
            raise ConfigError(f"{path} is neither a checkpoint (no {ckpt.META}) nor a run folder "
                              f"with checkpoints/")
        return found[0], path
    run = os.path.dirname(os.path.dirname(path))
    return path, run if os.path.exists(os.path.join(run, "config.yaml")) else None


def eval_config(checkpoint: str, run_dir: str | None, overrides: list[str]) -> ExperimentConfig:
    """The run's config (or the checkpoint's model with default data/eval), with overrides."""
    meta = ckpt.read_meta(checkpoint)
    if run_dir is not None:
        base = read_yaml(os.path.join(run_dir, "config.yaml"))
    else:
        base = {"method": meta["method"], "backbone": meta["backbone"],
                "data": {"image_size": meta["image_size"]}}
    cfg = from_dict(apply_overrides(base, overrides))
    if cfg.data.image_size != meta["image_size"]:
        raise ConfigError(f"data.image_size: {cfg.data.image_size}, but the checkpoint was trained "
                          f"on {meta['image_size']} px images")
    return cfg


def evaluate(checkpoint: str, cfg: ExperimentConfig, out_dir: str, run_dir: str | None = None, *,
             force: bool = False, verbose: bool = False,
             log: Callable[[str], None] = print) -> dict:
    """Run cfg.eval.stages on `checkpoint`; merge results into out_dir/summary.json; report."""
    from orchestrator.ray_env import init_ray
    from pipelines.data import load_splits
    from pipelines.stages import STAGES, StageContext, run_stages
    os.makedirs(out_dir, exist_ok=True)
    summary = read_summary(out_dir) or {"run": os.path.basename(run_dir or out_dir),
                                        "run_dir": run_dir or out_dir,
                                        "method": cfg.method_name, "train": {}}
    summary.setdefault("train", {}).update(read_summary(run_dir).get("train", {}) if run_dir else {})
    if not os.path.exists(os.path.join(out_dir, "config.yaml")):
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            f.write(dump_yaml(cfg))
    init_ray(cfg.cluster, verbose)
    splits = load_splits(cfg.data, any(STAGES[s].needs_labels for s in cfg.eval.stages),
                         cache_dir=os.path.join(run_dir or out_dir, "data"))
    ctx = StageContext(run_dir=out_dir, checkpoint=checkpoint, splits=splits, cfg=cfg.eval,
                       seed=cfg.data.seed, train=summary["train"])
    results = run_stages(ctx, log=log, force=force)
    summary.update(checkpoint=checkpoint, eval={**summary.get("eval", {}), **results})
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    write_report_logged(out_dir, log)
    return summary


def random_init_checkpoint(cfg: ExperimentConfig, run_dir: str) -> str:
    """Save the untrained model `selfsup run` would start from as a checkpoint at step 0."""
    import torch

    import methods
    from orchestrator.train import build_info
    torch.manual_seed(cfg.train.seed)  # as in orchestrator.train.worker_loop
    model = methods.get(cfg.method_name).model(cfg.method, cfg.backbone, cfg.data.image_size)
    path = os.path.join(run_dir, "checkpoints", "checkpoint_random_init")
    ckpt.save(path, model, None, step=0, epoch=-1, build_info=build_info(cfg))
    return path


def add_parser(sub) -> None:
    p = sub.add_parser("eval")
    p.add_argument("checkpoint", help="checkpoint directory, or a run folder (latest checkpoint)")
    p.add_argument("--stages", help="comma-separated stages, e.g. knn,linear,tsne "
                                    "(default: the config's eval.stages)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key of the config, e.g. data.eval_source=... (repeatable)")
    p.add_argument("--force", action="store_true", help="re-run stages even if unchanged")
    p.add_argument("--output", help="write stages/, summary.json and report.html here "
                                    "(default: the checkpoint's run folder)")
    p.add_argument("--address", help="existing Ray cluster (same as --set cluster.address=...)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs and progress bars")
    p.set_defaults(handler=cmd_eval)

    b = sub.add_parser("baseline")
    b.add_argument("config", help="YAML config (see configs/)")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key, value parsed as YAML (repeatable)")
    b.add_argument("--name", help="output folder name (default: <method>-random-init)")
    b.add_argument("--force", action="store_true", help="re-run stages even if unchanged")
    b.add_argument("--address", help="existing Ray cluster (same as --set cluster.address=...)")
    b.add_argument("--verbose", action="store_true", help="show Ray's own logs and progress bars")
    b.set_defaults(handler=cmd_baseline)


def cmd_eval(args: argparse.Namespace) -> int:
    checkpoint, run_dir = locate(args.checkpoint)
    overrides = list(args.overrides)
    if args.stages:
        overrides.append(f"eval.stages=[{args.stages}]")
    if args.address:
        overrides.append(f"cluster.address={args.address}")
    cfg = eval_config(checkpoint, run_dir, overrides)
    out_dir = os.path.abspath(args.output) if args.output else run_dir
    if out_dir is None:
        raise ConfigError(f"{checkpoint} is not inside a run folder; give --output DIR")
    start = time.time()
    summary = evaluate(checkpoint, cfg, out_dir, run_dir, force=args.force, verbose=args.verbose,
                       log=lambda s: print(s, flush=True))
    print(f"\n{len(summary['eval'])} stage(s) in {out_dir}/summary.json, {time.time() - start:.0f} s")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.run import run_dir_of
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"cluster.address={args.address}")
    cfg = load_config(args.config, overrides)
    cfg.output.name = args.name or f"{cfg.method_name}-random-init"
    run_dir = run_dir_of(cfg)
    os.makedirs(run_dir, exist_ok=True)
    start = time.time()
    checkpoint = random_init_checkpoint(cfg, run_dir)
    summary = evaluate(checkpoint, cfg, run_dir, run_dir, force=args.force, verbose=args.verbose,
                       log=lambda s: print(s, flush=True))
    print(f"\n{cfg.method_name} at random init ({cfg.backbone.name}), {time.time() - start:.0f} s")
    for stage, metrics in summary["eval"].items():
        if "top1" in metrics:
            print(f"  {stage:<10} top-1 {metrics['top1']:.4f}")
    print(f"outputs:     {run_dir}")
    return 0
