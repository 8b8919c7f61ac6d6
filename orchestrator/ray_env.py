"""Starting or joining Ray, with Ray's own log noise out of the user's way unless --verbose."""
from __future__ import annotations

import logging
import os
import warnings

import ray

from orchestrator.config import ClusterConfig

# Train V2 is the default since Ray 2.51; the environment variable makes that explicit.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def quiet_logs(verbose: bool) -> None:
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0" if verbose else "1")
    level = logging.INFO if verbose else logging.ERROR
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        warnings.filterwarnings("ignore", module="ray")
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def init_ray(cluster: ClusterConfig, verbose: bool = False) -> None:
    """Join `cluster.address`, or start Ray in this process bound to 127.0.0.1."""
    quiet_logs(verbose)
    if ray.is_initialized():
        return
    common = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR,
                  configure_logging=True)
    if cluster.address:
        ray.init(address=cluster.address, **common)
    else:
        ray.init(num_cpus=cluster.num_cpus,
                 object_store_memory=cluster.object_store_mb * 2**20 if cluster.object_store_mb else None,
                 include_dashboard=cluster.dashboard, dashboard_host="127.0.0.1", **common)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
