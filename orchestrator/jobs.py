"""`selfsup submit` and `selfsup jobs list | status | logs | stop`, through the Ray Jobs API.

A submitted job runs the same CLI on the cluster (`python -m orchestrator.cli run CONFIG --set
... --name NAME`) with this project as its `working_dir`, so local edits run without rebuilding an
image; the cluster's Python supplies the dependencies. The config is validated here first, and the
run name is fixed here, so the job's output folder is known before it starts and submitting the
same name again resumes it. The client sends the cluster's token (RAY_AUTH_MODE=token; Ray reads
the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and never prints it.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from methods.config import ConfigError

PROJECT = Path(__file__).resolve().parents[1]
# Never uploaded: version control, environments, caches and run outputs (gitignore-style).
EXCLUDES = [".git", ".venv", "venv", "outputs", "__pycache__", ".pytest_cache", "*.egg-info",
            "build", ".cache", "benchmarks/results"]
LARGE_FILE_MB = 50
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def dashboard_address(given: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else the dashboard `selfsup cluster up` started."""
    from orchestrator.cluster import read_state
    address = given or os.environ.get("RAY_API_SERVER_ADDRESS") or (read_state() or {}).get(
        "dashboard")
    if not address:
        raise ConfigError("--address: no cluster given; pass the dashboard URL "
                          "(--address http://HOST:8265) or start one with `selfsup cluster up`")
    return address


def client(address: str | None):
    from orchestrator.ray_env import quiet_logs, use_token_auth
    quiet_logs(verbose=False)
    use_token_auth()
    from ray.job_submission import JobSubmissionClient
    logging.getLogger("ray.dashboard.modules.dashboard_sdk").setLevel(logging.WARNING)
    return JobSubmissionClient(dashboard_address(address))


def upload_excludes(root: Path, storage_path: str | None) -> tuple[list[str], list[str]]:
    """(Ray `excludes` patterns, files left out for size): outputs, caches and big files stay."""
    excludes = list(EXCLUDES)
    if storage_path:
        rel = os.path.relpath(os.path.abspath(os.path.expanduser(storage_path)), root)
        if not rel.startswith(".."):
            excludes.append(f"/{rel}")
    skip_dirs = {".git", ".venv", "venv", "outputs", "__pycache__", ".pytest_cache", "build"}
    large = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip_dirs and not d.endswith(".egg-info")]
        for name in files:
            path = os.path.join(folder, name)
            if os.path.getsize(path) > LARGE_FILE_MB * 2**20:
                large.append(os.path.relpath(path, root))
    return excludes + [f"/{rel}" for rel in large], large


def entrypoint(command: str, config: str, overrides: list[str], name: str) -> str:
    sets = [word for o in overrides for word in ("--set", o)]
    return shlex.join(["python", "-m", "orchestrator.cli", command, config, *sets, "--name", name])


def _project_relative(config: str) -> str:
    if not (PROJECT / "pyproject.toml").is_file():
        raise ConfigError(f"selfsup submit uploads the project folder, but this selfsup runs from "
                          f"{PROJECT}, not a source checkout; use a clone (pip install -e .)")
    rel = os.path.relpath(os.path.abspath(config), PROJECT)
    if rel.startswith(".."):
        raise ConfigError(f"{config}: the job receives the project folder {PROJECT}, and this "
                          f"config is outside it; copy it under {PROJECT / 'configs'}")
    return Path(rel).as_posix()


def _check_storage(storage_path: str | None) -> None:
    if storage_path is None or not (os.path.isabs(storage_path) or storage_path.startswith("~")):
        raise ConfigError(
            f"cluster.storage_path: {storage_path!r}; a submitted run needs an absolute path the "
            f"cluster writes to (a shared mount such as /mnt/shared/selfsup, or a local folder "
            f"for a cluster on this machine), else it lands in the job's temporary copy of the "
            f"project; add --set cluster.storage_path=PATH")


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    command = "sweep" if args.sweep else "run"
    if args.sweep and importlib.util.find_spec("orchestrator.sweep") is None:
        raise ConfigError("--sweep: this version of selfsup has no sweep command")
    config = _project_relative(args.config)
    overrides = list(args.overrides) + ([f"output.name={args.name}"] if args.name else [])
    cfg = load_config(args.config, overrides)  # config errors show here, not in the job's log
    storage = cfg.cluster.storage_path
    _check_storage(storage)
    excludes, large = upload_excludes(PROJECT, storage)
    if large:
        print(f"not uploaded (over {LARGE_FILE_MB} MiB): {', '.join(large)}")
    jobs = client(args.address)
    job_id = jobs.submit_job(
        entrypoint=entrypoint(command, config, list(args.overrides), cfg.output.name),
        runtime_env={"working_dir": str(PROJECT), "excludes": excludes,
                     "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}},
        metadata={"selfsup_run": cfg.output.name, "selfsup_config": config})
    address = f" --address {dashboard_address(args.address)}"
    run_dir = os.path.join(storage, cfg.output.name)
    events = os.path.join(run_dir, "tensorboard")
    print(f"submitted {job_id}: selfsup {command} {config} as run {cfg.output.name}")
    for name, text in (("status", f"selfsup jobs status {job_id} --wait{address}"),
                       ("logs", f"selfsup jobs logs {job_id} --follow{address}"),
                       ("stop", f"selfsup jobs stop {job_id}{address}"),
                       ("outputs", f"{run_dir} (on the cluster's storage)"),
                       ("tensorboard", f"tensorboard --logdir {events}")):
        print(f"  {name:<12} {text}")
    return follow(jobs, job_id) if args.follow else 0


def wait_until_done(jobs, job_id: str, timeout: float | None = None, show=None) -> str:
    """Poll until the job reaches a terminal status (or `timeout`); returns the last status."""
    deadline = None if timeout is None else time.time() + timeout
    last = None
    while True:
        status = jobs.get_job_status(job_id).value
        if status != last and show:
            show(status)
        last = status
        if status in TERMINAL or (deadline is not None and time.time() > deadline):
            return status
        time.sleep(1.0)


def _describe(jobs, job_id: str) -> str:
    info = jobs.get_job_info(job_id)
    return f"{job_id}: {info.status.value}" + (f" ({info.message})" if info.message else "")


def follow(jobs, job_id: str) -> int:
    """Print the job's log as it grows, until it ends; exit code 0 iff it succeeded."""
    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (selfsup jobs stop {job_id} stops it)",
              file=sys.stderr)
        return 130
    status = wait_until_done(jobs, job_id, timeout=30)
    print(_describe(jobs, job_id), file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def cmd_list(args: argparse.Namespace) -> int:
    submitted = [j for j in client(args.address).list_jobs() if j.submission_id]
    print(f"{'submission id':<30} {'status':<10} {'run':<32} {'started':<15} entrypoint")
    for j in sorted(submitted, key=lambda j: j.start_time or 0):
        started = time.strftime("%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000))
        run = (j.metadata or {}).get("selfsup_run", "")
        print(f"{j.submission_id:<30} {j.status.value:<10} {run:<32} {started:<15} "
              f"{j.entrypoint[:70]}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    jobs = client(args.address)
    if not args.wait:
        print(_describe(jobs, args.job_id))
        return 0
    status = wait_until_done(jobs, args.job_id, show=lambda s: print(f"{args.job_id}: {s}",
                                                                      flush=True))
    info = jobs.get_job_info(args.job_id)
    if info.message:
        print(info.message)
    return 0 if status == "SUCCEEDED" else 1


def cmd_logs(args: argparse.Namespace) -> int:
    jobs = client(args.address)
    if args.follow:
        return follow(jobs, args.job_id)
    print(jobs.get_job_logs(args.job_id), end="")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    jobs = client(args.address)
    jobs.stop_job(args.job_id)
    status = wait_until_done(jobs, args.job_id, timeout=args.timeout)
    print(_describe(jobs, args.job_id))
    return 0 if status in TERMINAL else 1


def _reported(handler):
    """Connection and Jobs API errors as one line on stderr and exit code 1, not a traceback."""
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ConnectionError, RuntimeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            print(f"selfsup: {e}", file=sys.stderr)
            return 1
    return run


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the cluster's dashboard, http://HOST:8265 (default: "
                                     "RAY_API_SERVER_ADDRESS, else the one `cluster up` started)")


def add_parser(sub) -> None:
    s = sub.add_parser("submit", help="run a config on a Ray cluster through the Jobs API")
    s.add_argument("config", help="YAML config inside this project (see configs/)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key, as for `selfsup run` (repeatable)")
    s.add_argument("--name", help="run name; submitting the same name again resumes the run")
    s.add_argument("--sweep", action="store_true", help="run `selfsup sweep` instead of `run`")
    s.add_argument("--follow", action="store_true", help="print the job's log until it ends")
    _address_arg(s)
    s.set_defaults(handler=_reported(cmd_submit))
    p = sub.add_parser("jobs", help="list, follow and stop submitted jobs")
    verbs = p.add_subparsers(dest="verb", required=True)
    for verb, handler, text in (("list", cmd_list, "submitted jobs and their status"),
                                ("status", cmd_status, "one job's status"),
                                ("logs", cmd_logs, "one job's log"),
                                ("stop", cmd_stop, "stop a job and wait until it has stopped")):
        v = verbs.add_parser(verb, help=text)
        if verb != "list":
            v.add_argument("job_id", help="submission id, as printed by `selfsup submit`")
        _address_arg(v)
        v.set_defaults(handler=_reported(handler))
    verbs.choices["status"].add_argument("--wait", action="store_true",
                                         help="print each change until the job ends; exit code "
                                              "0 iff it succeeded")
    verbs.choices["logs"].add_argument("--follow", action="store_true",
                                       help="keep printing until the job ends")
    verbs.choices["stop"].add_argument("--timeout", type=float, default=60,
                                       help="seconds to wait for the job to stop")
