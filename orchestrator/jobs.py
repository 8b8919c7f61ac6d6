"""`selfsup submit` and `selfsup jobs list | status | logs | stop`, through the Ray Jobs API.

A submitted job runs the same CLI on the cluster, `python -m orchestrator.cli run
selfsup-job.yaml --name NAME` (or `sweep`). Everything it needs travels in the job's runtime_env:

- the resolved config: the YAML of the ExperimentConfig validated here (overrides applied, run
  name fixed), at the root of the job's `working_dir`. The job runs what was checked here,
  wherever the config file lived. `--working-dir DIR` ships the user's folder too; the job runs
  in it, so relative paths resolve there.
- selfsup itself (`--selfsup`): `local` ships this process's own packages (a source checkout or
  site-packages) as `py_modules`, so the job runs the submitter's version; `cluster` ships nothing
  (the cluster's Python has selfsup); `pip:SPEC` has Ray install a pinned spec for the job.

Syntax and ranges are checked here, before any cluster is contacted. Whether the data exists is
checked in the job (`selfsup run` names `data.source` and the path in the job's log), since the
data may exist only where the job runs. The run name is fixed here, so the job's output folder is
known before it starts and submitting the same name again resumes it. The client sends the
cluster's token (RAY_AUTH_MODE=token; Ray reads the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
or ~/.ray/auth_token) and never prints it.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from methods.config import ConfigError

PACKAGES = ("orchestrator", "methods", "pipelines")  # selfsup, as `--selfsup local` ships it
JOB_CONFIG = "selfsup-job.yaml"  # the resolved config, at the root of the job's working_dir
# Never uploaded: version control, environments, caches and run outputs (gitignore-style).
EXCLUDES = [".git", ".venv", "venv", "outputs", "__pycache__", ".pytest_cache", "*.egg-info",
            "build", ".cache", "benchmarks/results"]
LARGE_FILE_MB = 50
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
ENV_VARS = {"PYTHONUNBUFFERED": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


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


def stage(folder: Path, config_yaml: str, working_dir: Path | None) -> None:
    """Lay out the job's working_dir in the empty `folder`: the resolved config, and a link to
    each entry of `working_dir`.

    Links, not copies: Ray follows them when it packs the folder, and its `excludes` and the
    folder's `.gitignore` apply to the same relative paths as if `working_dir` itself were
    uploaded, so what they leave out is never read.
    """
    entries = sorted(os.listdir(working_dir)) if working_dir is not None else []
    if JOB_CONFIG in entries:
        raise ConfigError(f"--working-dir {working_dir}: holds a file named {JOB_CONFIG}, the "
                          f"name the submitted config takes in the job; rename it")
    for entry in entries:
        os.symlink(working_dir / entry, folder / entry)
    (folder / JOB_CONFIG).write_text(config_yaml)


def installed_packages() -> list[Path]:
    """Where this selfsup's packages are: a source checkout, or site-packages of a pip install."""
    return [Path(importlib.import_module(name).__file__).resolve().parent for name in PACKAGES]


def selfsup_env(mode: str, working_dir: Path | None) -> dict:
    """The runtime_env entries that put selfsup on the cluster, for `--selfsup MODE`.

    py_modules reach the job's driver, not only its workers (Ray 2.60's source): the JobManager
    starts the JobSupervisor actor with the job's runtime_env (dashboard/modules/job/
    job_manager.py, `_get_supervisor_runtime_env`); PyModulesPlugin.modify_context puts the
    unpacked packages first on that actor's PYTHONPATH (`set_pythonpath_in_context`); the
    supervisor starts the entrypoint with a copy of its own environment, in the unpacked
    working_dir (job_supervisor.py: `env = os.environ.copy()` → `Popen(entrypoint, env=env)`).
    The driver's `ray.init` then hands the same runtime_env to every worker. `python -m` puts the
    working directory before PYTHONPATH, so a working_dir holding another copy of selfsup would
    win in the driver: that is refused.
    """
    packages = installed_packages()
    held = [name for name in PACKAGES
            if working_dir is not None and (working_dir / name / "__init__.py").is_file()]
    if mode == "local" and held and all(p == working_dir / p.name for p in packages):
        return {}  # the folder is this selfsup's own checkout: it carries the packages
    if held and mode != "cluster":
        raise ConfigError(
            f"--working-dir {working_dir}: holds its own {', '.join(n + '/' for n in held)}, "
            f"which the job would import instead of the selfsup that --selfsup {mode} ships; "
            f"pass --selfsup cluster to run the folder's copy, or submit with that checkout's "
            f"own selfsup")
    if mode == "local":
        return {"py_modules": [str(p) for p in packages]}
    if mode.startswith("pip:"):
        return {"pip": [mode[len("pip:"):]]}
    return {}


def selfsup_mode(value: str) -> str:
    """`--selfsup`: local, cluster or pip:SPEC, the SPEC pinned so every node installs the same."""
    spec = value[len("pip:"):].strip() if value.startswith("pip:") else None
    if value not in ("local", "cluster") and not spec:
        raise argparse.ArgumentTypeError(
            f"{value!r}: choose local (ship this selfsup), cluster (use the cluster's own) or "
            f"pip:SPEC (e.g. pip:selfsup==0.1.0)")
    if spec and not ("==" in spec or "@" in spec or spec.endswith(".whl")):
        raise argparse.ArgumentTypeError(
            f"{value!r}: pin what every node installs, e.g. pip:selfsup==0.1.0 or "
            f"'pip:selfsup @ git+https://HOST/REPO@COMMIT'")
    return value


def runtime_env(staged: Path, excludes: list[str], mode: str, working_dir: Path | None) -> dict:
    return {"working_dir": str(staged), "excludes": excludes, "env_vars": dict(ENV_VARS),
            **selfsup_env(mode, working_dir)}


def entrypoint(command: str, name: str) -> str:
    """The job's command: the same CLI on the resolved config, which holds every override."""
    return shlex.join(["python", "-m", "orchestrator.cli", command, JOB_CONFIG, "--name", name])


def _working_dir(value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"--working-dir {value}: no such folder; give the folder the job "
                          f"should run in (its files travel with the job)")
    return path


def _check_storage(storage_path: str | None) -> None:
    if storage_path is None or not (os.path.isabs(storage_path) or storage_path.startswith("~")):
        raise ConfigError(
            f"cluster.storage_path: {storage_path!r}; a submitted run needs an absolute path the "
            f"cluster writes to (a shared mount such as /mnt/shared/selfsup, or a local folder "
            f"for a cluster on this machine), else it lands in the job's temporary working "
            f"directory; add --set cluster.storage_path=PATH")


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.config import dump_yaml, load_config
    command = "sweep" if args.sweep else "run"
    if args.sweep and importlib.util.find_spec("orchestrator.sweep") is None:
        raise ConfigError("--sweep: this version of selfsup has no sweep command")
    working_dir = _working_dir(args.working_dir)
    overrides = list(args.overrides) + ([f"output.name={args.name}"] if args.name else [])
    # Syntax and ranges here, before any cluster is contacted; the data where the job runs.
    cfg = load_config(args.config, overrides, check_data=False)
    # The job joins the cluster it runs on (RAY_ADDRESS), never an address written for a laptop.
    cfg.cluster.address = None
    storage = cfg.cluster.storage_path
    _check_storage(storage)
    excludes, large = (upload_excludes(working_dir, storage) if working_dir
                       else (list(EXCLUDES), []))
    if large:
        print(f"not uploaded (over {LARGE_FILE_MB} MiB): {', '.join(large)}")
    with tempfile.TemporaryDirectory(prefix="selfsup-submit-") as staged:
        stage(Path(staged), dump_yaml(cfg), working_dir)
        env = runtime_env(Path(staged), excludes, args.selfsup, working_dir)
        jobs = client(args.address)
        job_id = jobs.submit_job(  # uploads the staged folder and the packages before returning
            entrypoint=entrypoint(command, cfg.output.name), runtime_env=env,
            metadata={"selfsup_run": cfg.output.name, "selfsup_config": args.config})
    print(f"submitted {job_id}: selfsup {command} {args.config} as run {cfg.output.name}")
    _print_followups(job_id, args, env, os.path.join(storage, cfg.output.name))
    return follow(jobs, job_id) if args.follow else 0


def _print_followups(job_id: str, args: argparse.Namespace, env: dict, run_dir: str) -> None:
    address = f" --address {dashboard_address(args.address)}"
    if "py_modules" in env:
        selfsup = f"this one, shipped from {os.path.dirname(env['py_modules'][0])}"
    elif "pip" in env:
        selfsup = f"{env['pip'][0]}, installed by Ray for the job"
    else:
        selfsup = "the working dir's" if args.selfsup == "local" else "the cluster's own"
    events = os.path.join(run_dir, "tensorboard")
    for name, text in (("selfsup", selfsup),
                       ("working dir", Path(args.working_dir).expanduser().resolve()
                        if args.working_dir else "none (only the resolved config)"),
                       ("status", f"selfsup jobs status {job_id} --wait{address}"),
                       ("logs", f"selfsup jobs logs {job_id} --follow{address}"),
                       ("stop", f"selfsup jobs stop {job_id}{address}"),
                       ("outputs", f"{run_dir} (on the cluster's storage)"),
                       ("tensorboard", f"tensorboard --logdir {events}")):
        print(f"  {name:<12} {text}")


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
        from ray.exceptions import RayError  # e.g. RuntimeEnvSetupError while uploading
        try:
            return handler(args)
        except (ConnectionError, RuntimeError, ValueError, RayError) as e:
            if isinstance(e, ConfigError):
                raise
            print(f"selfsup: {e}", file=sys.stderr)
            return 1
    return run


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the cluster's dashboard, http://HOST:8265 (default: "
                                     "RAY_API_SERVER_ADDRESS, else the one `cluster up` started)")


def add_parser(sub) -> None:
    s = sub.add_parser("submit")
    s.add_argument("config", help="YAML config, anywhere on this machine; the job runs its "
                                  "resolved form (overrides applied, run name fixed). Its data "
                                  "paths are checked in the job, where the data is")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key, as for `selfsup run` (repeatable)")
    s.add_argument("--name", help="run name; submitting the same name again resumes the run")
    s.add_argument("--sweep", action="store_true", help="run `selfsup sweep` instead of `run`")
    s.add_argument("--follow", action="store_true", help="print the job's log until it ends")
    s.add_argument("--working-dir", metavar="DIR",
                   help="a folder the job runs in, shipped with it (relative paths in the config "
                        "resolve there; a selfsup checkout works too). Left out: .git, "
                        "environments, outputs, caches, what its .gitignore lists and files over "
                        f"{LARGE_FILE_MB} MiB. Default: none, the job gets only the config")
    s.add_argument("--selfsup", type=selfsup_mode, default="local",
                   metavar="{local,cluster,pip:SPEC}",
                   help="how selfsup reaches the job: local (default) ships this installation's "
                        "packages, so the job runs this version; cluster uses the selfsup "
                        "installed in the cluster's Python; pip:SPEC has Ray install a pinned "
                        "spec for the job (pip:selfsup==0.1.0)")
    _address_arg(s)
    s.set_defaults(handler=_reported(cmd_submit))
    p = sub.add_parser("jobs")
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
