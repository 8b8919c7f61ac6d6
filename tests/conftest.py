"""Shared fixtures. Ray tests share one bounded local Ray (4 logical CPUs, small object store)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Credentials for the S3 server the object-storage tests start on loopback (moto accepts any).
# Set before Ray starts, so every Ray worker reads them from its environment as in production.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "selfsup-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "selfsup-test")

TINY = ["backbone.width=8", "data.image_size=16", "train.batch_size=128", "train.epochs=1",
        "train.warmup_epochs=0", "eval.linear.epochs=5", "eval.linear.lrs=[0.01]",
        "eval.linear.weight_decays=[0.0]", "eval.linear.folds=2",
        "method.proj_hidden_dim=32", "method.proj_dim=16"]


@pytest.fixture(scope="session")
def ray_session():
    """One in-process Ray for the session's Ray tests; shut down at the end."""
    import ray
    from orchestrator.ray_env import quiet_logs
    quiet_logs(verbose=False)
    if not ray.is_initialized():
        ray.init(num_cpus=4, object_store_memory=300 * 2**20, include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
