"""`selfsup cluster up | down | status`: a local Ray head with the dashboard and token auth.

`up` runs `ray start --head` with the dashboard on 127.0.0.1 and `RAY_AUTH_MODE=token`. Ray
2.60's `ray start` does not create a token by itself, so `up` writes ~/.ray/auth_token (mode 0600)
when neither that file nor RAY_AUTH_TOKEN exists; the token is never read, printed or logged here.

`down` stops only what `up` started. `ray stop` is no use for that: it kills every Ray process of
the machine by name, other users' clusters and test sessions included. Instead `up` runs `ray
start` as the leader of a new process group; every daemon it spawns (GCS, raylet, dashboard,
agents, monitor) inherits that group. `up` records each one's pid and start time in
~/.selfsup/cluster.json. `down` signals a process only if it is one of those (same pid and start
time, so a reused pid is never hit), or a descendant of one (Ray workers, job drivers, which run
in sessions of their own), or still in the group. Linux does not reuse a pid while a group of
that id exists, and the group is not trusted once a newer process holds the `ray start`'s pid.
Processes get SIGTERM, then SIGKILL after a grace period.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import ray
import psutil  # bundled with Ray (ray/thirdparty_files is on sys.path once ray is imported)

from orchestrator.ray_env import quiet_logs, token_path, use_token_auth


class ClusterError(RuntimeError):
    """A Ray process could not be started or reached; the message says what to do."""


def state_path() -> Path:
    return Path.home() / ".selfsup" / "cluster.json"


def read_state() -> dict | None:
    try:
        return json.loads(state_path().read_text())
    except FileNotFoundError:
        return None


def ensure_token() -> str:
    """Where the cluster's token comes from; creates a private token file if there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN environment variable"
    path = token_path()
    if not path.is_file() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # 256 random bits, as `ray get-auth-token --generate`
        os.chmod(path, 0o600)
    elif stat.S_IMODE(path.stat().st_mode) & 0o077:
        print(f"warning: {path} is readable by other users; run chmod 600 {path}", file=sys.stderr)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(address: str) -> dict:
    """The environment of the Ray processes of the cluster at `address` (host:port).

    Token auth on; this Python first on PATH, so a job entrypoint's `python` is the interpreter
    that has selfsup's dependencies; and RAY_ADDRESS, without which Ray code that looks its own
    cluster up (Train's placement-group cleaner, the State API) fails on a machine that runs
    other Ray clusters too ("Found multiple active Ray instances").
    """
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_ADDRESS=address)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


def _record(p: psutil.Process) -> dict:
    return {"pid": p.pid, "create_time": p.create_time(), "name": p.name()}


def _records(procs: list[psutil.Process]) -> list[dict]:
    """Records of the processes still alive (one may exit while we look)."""
    found = []
    for p in procs:
        try:
            found.append(_record(p))
        except psutil.Error:
            continue
    return found


def group_members(pgid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                found.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def ray_start(args: list[str], env: dict, timeout: float = 120) -> dict:
    """Run `ray start ARGS` (environment `env`) as the leader of a new process group; the
    daemons it spawns stay in that group.

    Returns {"leader": the `ray start` process's record (its pid is the group id), "processes":
    [{pid, create_time, name}] of the group, "node_id", "session_dir"}.
    """
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    # worker ports from the OS: Ray's default range (10002-19999) is shared by every Ray here
    cmd = [ray_cli, "start", "--disable-usage-stats", "--min-worker-port=0",
           "--max-worker-port=0", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    leader = _record(psutil.Process(proc.pid))
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
    members = group_members(proc.pid)
    if proc.returncode != 0:
        stop_processes(_records(members), leader)
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise ClusterError(f"`ray start {' '.join(args)}` failed:\n{tail}")
    started = {"leader": leader, "processes": _records(members)}
    started.update(_raylet_flags(members))
    return started


def _raylet_flags(members: list[psutil.Process]) -> dict:
    """The node id and session folder of the raylet among `members`."""
    for p in members:
        try:
            if p.name() != "raylet":
                continue
            args = [a[2:] for a in p.cmdline() if a.startswith("--") and "=" in a]
            flags = dict(a.split("=", 1) for a in args)
        except psutil.Error:
            continue
        return {"node_id": flags.get("node_id"), "session_dir": flags.get("session_dir")}
    return {"node_id": None, "session_dir": None}


def _verified(record: dict) -> psutil.Process | None:
    """The process of `record` if it is still that process (same pid and start time)."""
    try:
        p = psutil.Process(record["pid"])
        return p if abs(p.create_time() - record["create_time"]) < 0.01 else None
    except psutil.Error:
        return None


def ours(records: list[dict], leader: dict | None) -> list[psutil.Process]:
    """The recorded processes still alive, their descendants, and the members of the process
    group `leader` created, unless a newer process now holds the leader's pid (and so its
    group id could be another group's)."""
    procs = {p.pid: p for p in filter(None, map(_verified, records))}
    if leader is not None and (_verified(leader) or not psutil.pid_exists(leader["pid"])):
        procs.update({p.pid: p for p in group_members(leader["pid"])})
    for p in list(procs.values()):
        try:
            procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    procs.pop(os.getpid(), None)
    return list(procs.values())


def stop_processes(records: list[dict], leader: dict | None, grace: float = 5.0,
                   graceful: bool = True) -> int:
    """Stop the processes of `ours(records, leader)`; returns how many there were."""
    procs = ours(records, leader)
    for p in procs:
        try:
            p.terminate() if graceful else p.kill()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace if graceful else 2.0)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=5.0)
    return len(procs)


def wait_for_dashboard(url: str, timeout: float = 90) -> None:
    """Until the dashboard answers HTTP (401 counts: it is up and asks for the token)."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=5).close()
            return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as e:
            if time.time() > deadline:
                raise ClusterError(f"the dashboard at {url} did not answer within "
                                   f"{timeout:.0f} s: {e}") from None
            time.sleep(0.5)


def start_head(num_cpus: int | None = None, port: int = 6379, dashboard_port: int = 8265,
               client_port: int = 10001, temp_dir: str | None = None,
               object_store_mb: int | None = None) -> dict:
    """Start a Ray head on this machine; returns the state `down` needs (no token in it)."""
    args = ["--head", f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={client_port}",
            # the agent's default port (52365) clashes with any other Ray head on the machine
            f"--dashboard-agent-listen-port={free_port()}"]
    args += [f"--num-cpus={num_cpus}"] if num_cpus is not None else []
    args += [f"--temp-dir={os.path.abspath(temp_dir)}"] if temp_dir else []
    args += [f"--object-store-memory={object_store_mb * 2**20}"] if object_store_mb else []
    token_source = ensure_token()
    started_at = time.time()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    head = ray_start(args, ray_env(address))
    state = {"address": address,
             "dashboard": f"http://127.0.0.1:{dashboard_port}", "token_source": token_source,
             "started_at": started_at, "temp_dir": temp_dir, **head}
    state_path().parent.mkdir(parents=True, exist_ok=True)
    state_path().write_text(json.dumps(state, indent=2))
    try:
        wait_for_dashboard(state["dashboard"])
    except ClusterError:
        stop_cluster(state)
        raise
    return state


def alive(state: dict) -> list[psutil.Process]:
    return ours(state["processes"], state["leader"])


def stop_cluster(state: dict, grace: float = 5.0) -> int:
    """Stop what `start_head` started (see the module docstring) and forget it."""
    n = stop_processes(state["processes"], state["leader"], grace)
    forget_address(state["address"], state.get("temp_dir"))
    if read_state() == state:
        state_path().unlink()
    return n


def forget_address(address: str, temp_dir: str | None) -> None:
    """Remove Ray's pointer to the latest local cluster if it names the head just stopped.

    `ray start` writes <temp>/ray_current_cluster; a later bare `ray.init()` or `ray status`
    would join that address and retry the dead GCS for minutes. A pointer to another head is
    left alone.
    """
    from ray._common.utils import get_ray_address_file  # where `ray start` wrote it
    pointer = Path(get_ray_address_file(os.path.abspath(temp_dir) if temp_dir else None))
    try:
        if pointer.read_text().strip() == address:
            pointer.unlink()
    except OSError:  # absent, or not ours to remove
        pass


def cmd_up(args: argparse.Namespace) -> int:
    previous = read_state()
    if previous and alive(previous):
        print(f"selfsup: a cluster started by `selfsup cluster up` is running at "
              f"{previous['address']} (dashboard {previous['dashboard']}); run "
              f"`selfsup cluster down` first", file=sys.stderr)
        return 1
    try:
        state = start_head(args.num_cpus, args.port, args.dashboard_port,
                           args.ray_client_server_port, args.temp_dir, args.object_store_mb)
    except ClusterError as e:
        print(f"selfsup: {e}", file=sys.stderr)
        return 1
    outputs = os.path.abspath("outputs")
    cpus = f"{args.num_cpus} CPUs" if args.num_cpus else "all CPUs"
    print(f"Ray head up at {state['address']} ({cpus}), session {state['session_dir']}")
    rows = [("dashboard", f"{state['dashboard']}  (it asks for the token: paste the contents "
                          f"of the token file)"),
            ("token", f"{state['token_source']} (private, never printed; selfsup's clients send "
                      f"it, plain Ray tools need RAY_AUTH_MODE=token)"),
            ("run", f"selfsup run CONFIG --address {state['address']}"),
            ("submit", f"selfsup submit CONFIG --address {state['dashboard']} "
                       f"--set cluster.storage_path={outputs}"),
            ("tensorboard", f"tensorboard --logdir {outputs}  (or your cluster.storage_path)"),
            ("stop", "selfsup cluster down")]
    for name, text in rows:
        print(f"  {name:<12} {text}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    state = read_state()
    if state is None:
        print(f"no cluster started by `selfsup cluster up` ({state_path()} does not exist)")
        return 0
    n = stop_cluster(state, grace=args.grace)
    print(f"stopped the Ray head at {state['address']}: {n} process(es) of session "
          f"{state['session_dir']}; other Ray processes on this machine were left alone")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from ray.util.state import list_nodes
    state = read_state()
    address = args.address or (state or {}).get("dashboard")
    if address is None:
        print("no cluster: run `selfsup cluster up`, or pass --address http://HOST:8265",
              file=sys.stderr)
        return 1
    if state and not args.address:
        print(f"started by `selfsup cluster up`: {state['address']}, "
              f"{len(alive(state))} process(es) alive")
    quiet_logs(verbose=False)
    use_token_auth()
    try:
        nodes = list_nodes(address=address, detail=True, raise_on_missing_output=False)
    except Exception as e:  # Ray raises several types for an unreachable or refusing dashboard
        print(f"selfsup: cannot read the cluster's nodes from {address}: {e}", file=sys.stderr)
        return 1
    print(f"{'node':<10} {'ip':<15} {'role':<5} {'state':<6} resources / labels")
    for n in sorted(nodes, key=lambda n: (not n.is_head_node, n.node_id)):
        resources = {k: v for k, v in n.resources_total.items()
                     if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
        labels = {k: v for k, v in (n.labels or {}).items() if not k.startswith("ray.io/")}
        print(f"{n.node_id[:8]:<10} {n.node_ip:<15} {'head' if n.is_head_node else '':<5} "
              f"{n.state:<6} {resources} {labels or ''}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("cluster")
    verbs = p.add_subparsers(dest="verb", required=True)
    up = verbs.add_parser("up", help="start a Ray head on this machine")
    up.add_argument("--num-cpus", type=int, help="logical CPUs Ray hands out (default: all)")
    up.add_argument("--port", type=int, default=6379, help="GCS port (default 6379)")
    up.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and Jobs API port")
    up.add_argument("--ray-client-server-port", type=int, default=10001)
    up.add_argument("--temp-dir", help="Ray's session and log folder (default /tmp/ray; keep it "
                                       "short: Ray's socket paths must fit in 107 characters)")
    up.add_argument("--object-store-mb", type=int, help="object store size (default: Ray's)")
    up.set_defaults(handler=cmd_up)
    down = verbs.add_parser("down", help="stop the Ray processes `cluster up` started, no others")
    down.add_argument("--grace", type=float, default=5.0,
                      help="seconds between SIGTERM and SIGKILL")
    down.set_defaults(handler=cmd_down)
    status = verbs.add_parser("status", help="nodes and their resources")
    status.add_argument("--address", help="dashboard URL (default: the cluster `up` started)")
    status.set_defaults(handler=cmd_status)
