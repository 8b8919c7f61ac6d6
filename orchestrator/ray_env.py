"""Starting or joining Ray, with Ray's own log noise out of the user's way unless --verbose.

Joining a cluster that uses token authentication (Ray 2.60's default for local clusters) needs
`RAY_AUTH_MODE=token` in the client; Ray turns it on by itself only for `address="auto"`, so
`use_token_auth` does it for every explicit address when a token is at hand. The token itself is
read by Ray from `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`, never by selfsup.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from orchestrator.storage import alive_hosts, check_shared

if TYPE_CHECKING:  # the config module imports torch; `selfsup cluster` and `jobs` need neither
    from orchestrator.config import ClusterConfig

# Train V2 is the default since Ray 2.51; the environment variable makes that explicit.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Runs, their workers and their datasets show in the dashboard's Train view (read by the driver).
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")


def token_path() -> Path:
    """The token file Ray reads: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (HOME honoured)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def token_available() -> bool:
    path = token_path()
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or (path.is_file() and path.stat().st_size > 0)


def use_token_auth() -> None:
    """Send the cluster token with every request of this process and of its children.

    Ray caches the mode on first use, so the cached config is re-read (as Ray's own
    `ray start` does); call it before `ray.init`. An explicit RAY_AUTH_MODE is respected.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config
    Config.initialize("")


def on_this_node():
    """Scheduling for the driver's helper actors (progress queue, stop flag): on the driver's
    node. Left to the scheduler one may land on a worker node, and when that node dies every
    restarted attempt fails on the dead actor instead of resuming."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def quiet_logs(verbose: bool) -> None:
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0" if verbose else "1")
    level = logging.INFO if verbose else logging.ERROR
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        warnings.filterwarnings("ignore", module="ray")
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def init_ray(cluster: ClusterConfig, verbose: bool = False) -> None:
    """Join `cluster.address` (or RAY_ADDRESS), or start a Ray of this run's own on 127.0.0.1."""
    quiet_logs(verbose)
    if ray.is_initialized():
        return
    common = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR,
                  configure_logging=True)
    # A Ray job's driver gets its cluster in RAY_ADDRESS.
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        if token_available():
            use_token_auth()
        ray.init(address=address, **common)
        check_shared(cluster.storage_path, cluster.shared_storage, alive_hosts())
    else:
        # "local": a Ray of this run's own. A bare `ray.init()` would join the latest cluster
        # started on this machine (named in <temp>/ray_current_cluster), and when that head has
        # been stopped it retries the dead GCS for minutes instead of starting.
        ray.init(address="local", num_cpus=cluster.num_cpus,
                 object_store_memory=cluster.object_store_mb * 2**20 if cluster.object_store_mb else None,
                 include_dashboard=cluster.dashboard, dashboard_host="127.0.0.1", **common)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose


def spilled_mb() -> float | None:
    """MiB the object store has spilled to disk since Ray started (None where Ray cannot say).

    Spilling means the data did not fit in memory; a streamed dataset should never cause it.
    Read through Ray's internal memory API (what `ray memory --stats-only` prints).
    """
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address
        reply = get_memory_info_reply(get_state_from_address())
        return round(reply.store_stats.spilled_bytes_total / 2**20, 1)
    except Exception:  # a private API: its absence must not fail a run
        return None
