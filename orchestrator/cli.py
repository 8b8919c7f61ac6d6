"""`selfsup` — the command line.

selfsup run CONFIG [--set key=value ...] [--print-config] [--verbose]
selfsup methods

Each further command lives in its own module under orchestrator/ and is listed in COMMANDS: the
module has `add_parser(subparsers)` (which sets `handler=` with `set_defaults`) and the handler
returns the exit code.

`selfsup run` stops cleanly on SIGTERM (`timeout`, SLURM, Kubernetes) and on a first Ctrl-C: the
workers save a checkpoint at their current step (orchestrator/interrupt.py), the command prints
how to resume and exits with 143 or 130. A second Ctrl-C exits at once.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import signal
import sys
import time

from methods.config import ConfigError

# The subcommands other modules add: name -> (module, one-line help). Only the module of the
# command being run is imported, so e.g. `selfsup jobs list` never imports torch, and
# `selfsup --help` lists them from here, importing none of them.
COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("orchestrator.evaluate", "run evaluation stages on a checkpoint or run folder"),
    "baseline": ("orchestrator.evaluate",
                 "evaluate a config's method at random init (no training)"),
    "report": ("orchestrator.report",
               "compare runs and sweeps in one leaderboard (report.html, leaderboard.csv)"),
    "cluster": ("orchestrator.cluster", "a local Ray head with the dashboard and token auth"),
    "submit": ("orchestrator.jobs", "run a config on a Ray cluster through the Jobs API"),
    "jobs": ("orchestrator.jobs", "list, follow and stop submitted jobs"),
    "sweep": ("orchestrator.sweep",
              "run a config's sweep section with Ray Tune, each trial the whole chain; "
              "writes a leaderboard"),
}


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key, value parsed as YAML (repeatable)")
    p.add_argument("--name", help="run name (same as --set output.name=...); reuse it to resume")
    p.add_argument("--address", help="existing Ray cluster (same as --set cluster.address=...)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs and progress bars")


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. Given the `command` to run, only that command's module is imported (none
    for `run`, `methods`, the listing of `--help` and typos); `None` builds every command."""
    p = argparse.ArgumentParser(prog="selfsup", description="Self-supervised learning on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="pretrain a method and run its evaluation stages")
    add_config_args(run)
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    run.add_argument("--force", action="store_true",
                     help="re-run evaluation stages even when their inputs did not change")
    run.set_defaults(handler=cmd_run)
    sub.add_parser("methods", help="list registered methods and their tunable hyperparameters"
                   ).set_defaults(handler=cmd_methods)
    wanted = COMMANDS[command][0] if command in COMMANDS else None
    for name, (module, text) in COMMANDS.items():
        if name not in sub.choices and (command is None or module == wanted):
            importlib.import_module(module).add_parser(sub)  # adds every subcommand it holds
        if name in sub.choices:
            sub.choices[name].description = text  # shown by `selfsup NAME --help`
        else:  # listed by `--help` with its help line only, its module not imported
            sub.add_parser(name, help=text, add_help=False)
    return p


def resolve(args: argparse.Namespace):
    from orchestrator.config import load_config
    overrides = list(args.overrides)
    if args.name:
        overrides.append(f"output.name={args.name}")
    if args.address:
        overrides.append(f"cluster.address={args.address}")
    return load_config(args.config, overrides)


def cmd_methods(args: argparse.Namespace) -> int:
    import methods
    from methods.config import tunables
    for name in sorted(methods.METHODS):
        spec = methods.METHODS[name]
        params = ", ".join(f"{k}={v}" for k, v in tunables(spec.config).items())
        print(f"{name}\t{params}\t# {spec.paper}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.config import dump_yaml
    cfg = resolve(args)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    import ray
    from orchestrator.interrupt import Interrupted, Terminated, raise_on_sigterm
    from orchestrator.ray_env import init_ray
    from orchestrator.run import run_dir_of, run_experiment
    from orchestrator.train import latest_checkpoint
    init_ray(cfg.cluster, args.verbose)
    raise_on_sigterm()  # after ray.init, which installs Ray's own (a native stack dump, abort)
    try:
        summary = run_experiment(cfg, verbose=args.verbose, log=lambda s: print(s, flush=True),
                                 force=args.force, started=args.started)
    except (Interrupted, Terminated, KeyboardInterrupt) as e:
        # Interrupted: training stopped at a checkpoint; the others came outside training (data,
        # evaluation) or were a second Ctrl-C
        signum = e.signum if isinstance(e, Interrupted) else \
            signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
        checkpoint = e.checkpoint if isinstance(e, Interrupted) else \
            latest_checkpoint(run_dir_of(cfg))
        _print_stopped(signum, checkpoint, resume_command(args.argv, cfg.output.name))
        ray.shutdown()  # Ray's processes end quietly, before the interpreter exits
        return 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for Ctrl-C
    _print_summary(summary, time.time() - args.started)
    return 0


def resume_command(argv: list[str], name: str) -> str:
    """The command line that resumes this run: the same one, with the run's name."""
    rest, skip = [], False
    for a in argv:
        if skip or a == "--name" or a.startswith("--name="):
            skip = a == "--name"
            continue
        rest.append(a)
    return shlex.join(["selfsup", *rest, "--name", name])


def _print_stopped(signum: int, checkpoint: str | None, command: str) -> None:
    from pipelines.checkpoint import read_meta
    if checkpoint:
        meta = read_meta(checkpoint)
        inside = f", {meta['epoch_step']} steps into it" if meta.get("epoch_step") else ""
        saved = (f"the newest checkpoint is at step {meta['step']} "
                 f"(epoch {meta['epoch'] + 1}{inside})")
    else:
        saved = "no checkpoint was saved yet"
    print(f"\nselfsup: interrupted by {signal.Signals(signum).name}; {saved}\n"
          f"resume with: {command}", file=sys.stderr, flush=True)


def _print_summary(summary: dict, seconds: float) -> None:
    t = summary["train"]
    print(f"\n{summary['method']}: {t['epochs']} epochs, {t['steps']} steps, "
          f"final loss {t['final_loss']:.4f}, {t['images_per_s']:.0f} img/s, "
          f"{t['skipped_images']} skipped image(s), {seconds:.0f} s in all")
    for stage, metrics in summary["eval"].items():
        if "top1" in metrics:
            print(f"  {stage:<10} top-1 {metrics['top1']:.4f}")
    run_dir = summary["run_dir"]
    print(f"outputs:     {run_dir}")
    print(f"tensorboard: tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}")


def main(argv: list[str] | None = None) -> int:
    started = _process_start()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = parser(command or "").parse_args(argv)  # "": no command given, import none
    args.argv, args.started = argv, started
    try:
        return args.handler(args)
    except ConfigError as e:
        print(f"selfsup: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nselfsup: interrupted; run the same command with the same --name to resume",
              file=sys.stderr)
        return 130


def _process_start() -> float:
    """When this command started (time.time()): its process's creation, imports included."""
    try:
        import psutil
        return psutil.Process().create_time()
    except Exception:  # no psutil, or no /proc: from now
        return time.time()


if __name__ == "__main__":
    sys.exit(main())
