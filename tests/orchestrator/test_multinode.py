"""Several Ray nodes on this machine: workers spread over nodes, augmentation kept on a data
node, and a node killed mid-run.

The cluster is `ray start` raylets on this machine (a 0-CPU head with the dashboard, two 3-CPU
worker nodes and a 1-CPU data node that advertises `data_cpu`), started with token auth,
non-default ports and a private temp dir, and torn down by process group whatever happens.
`selfsup run --address` drives it from a subprocess, as a user would; the dashboard's Train and
State APIs tell which node each worker and each task ran on.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.cluster import free_port, ray_env, ray_start, stop_processes
from orchestrator.tracking import read_records
from pipelines.checkpoint import read_meta
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = (1257 // 2) // 64  # digits pretraining split, 2 workers, batch 128
# A worker takes 2 of a node's 3 CPUs: two never fit on one node, and Ray Data keeps a CPU each.
# The head's log monitor already reads every node's logs on this machine (one per machine).
NODE = ["--num-cpus=3", f"--object-store-memory={150 * 2**20}", "--include-log-monitor=false"]
# A CPU-only data node: too small for a training worker, the only one with `data_cpu`.
DATA_NODE = ["--num-cpus=1", '--resources={"data_cpu": 1}', "--labels=selfsup/role=data",
             f"--object-store-memory={100 * 2**20}", "--include-log-monitor=false"]
# A lost node is declared dead after ~4 s instead of Ray's default ~15 s, with room for a loaded
# machine's slow answers (a healthy node must miss 4 checks in a row).
FAST_FAILURE_DETECTION = {"RAY_health_check_period_ms": "1000",
                          "RAY_health_check_timeout_ms": "3000",
                          "RAY_health_check_failure_threshold": "4"}


class LocalCluster:
    """Raylets started with `ray start` on loopback; each node is its process-group record."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="ssmn-", dir="/tmp")  # short: Ray's socket paths
        self.token_file = os.path.join(self.tmp, "auth_token")
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        import ray
        port = free_port()
        self.address = f"{ray.util.get_node_ip_address()}:{port}"
        self.env = {**ray_env(self.address), "RAY_AUTH_TOKEN_PATH": self.token_file,
                    **FAST_FAILURE_DETECTION}
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.nodes: list[dict] = []
        self.head = self._start(["--head", f"--port={port}", "--num-cpus=0",
                                 "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
                                 f"--ray-client-server-port={free_port()}",
                                 f"--object-store-memory={200 * 2**20}"])

    def _start(self, args: list[str]) -> dict:
        node = ray_start([*args, f"--temp-dir={self.tmp}/ray",
                          f"--dashboard-agent-listen-port={free_port()}"], env=self.env)
        self.nodes.append(node)
        return node

    def add_workers(self, n: int, args: list[str] = NODE) -> list[dict]:
        # one at a time: raylets starting together in one temp dir race for socket names
        return [self._start([f"--address={self.address}", *args]) for _ in range(n)]

    def kill(self, node: dict) -> None:
        """The node dies at once (SIGKILL), as when a machine is lost."""
        stop_processes(node["processes"], node["leader"], graceful=False)
        self.nodes.remove(node)

    def api(self, path: str):
        with open(self.token_file) as f:
            headers = {"Authorization": f"Bearer {f.read()}"}
        request = urllib.request.Request(self.dashboard + path, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.load(r)

    def alive_node_ids(self) -> set[str]:
        nodes = self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return {n["node_id"] for n in nodes if n["state"] == "ALIVE"}

    def wait_for(self, node_ids: set[str], timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not node_ids <= self.alive_node_ids():
            assert time.time() < deadline, "Ray nodes did not register"
            time.sleep(0.5)

    def train_run(self, run_dir: str) -> dict | None:
        """The dashboard Train view's record of the run writing to `run_dir`."""
        for run in self.api("/api/train/v2/runs/v1")["train_runs"]:
            if run["run_settings"]["run_config"]["storage_path"] == run_dir:
                return run
        return None

    def shutdown(self) -> None:
        for node in reversed(self.nodes):
            stop_processes(node["processes"], node["leader"], graceful=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.add_workers(2)
        c.data_node = c.add_workers(1, DATA_NODE)[0]
        c.wait_for({n["node_id"] for n in c.nodes})
        yield c
    finally:
        c.shutdown()


def selfsup_run(c: LocalCluster, storage: Path, name: str, *overrides: str) -> list[str]:
    sets = [*TINY, "train.num_workers=2", "train.cpus_per_worker=2", "eval.stages=[]",
            "eval.online_every=0", f"cluster.storage_path={storage}", *overrides]
    return [sys.executable, "-m", "orchestrator.cli", "run", "configs/simclr.yaml",
            "--address", c.address, *[w for s in sets for w in ("--set", s)], "--name", name]


def driver_env(c: LocalCluster) -> dict:
    """The user's shell: the token file, but no RAY_AUTH_MODE (selfsup must turn it on)."""
    env = {**os.environ, "RAY_AUTH_TOKEN_PATH": c.token_file}
    env.pop("RAY_AUTH_MODE", None)
    return env


@pytest.mark.ray
@pytest.mark.slow
def test_workers_spread_over_nodes_and_augmentation_stays_on_the_data_node(cluster, tmp_path):
    worker_nodes = {n["node_id"] for n in cluster.nodes
                    if n is not cluster.head and n is not cluster.data_node}
    command = selfsup_run(cluster, tmp_path, "spread", "data.task_resources.data_cpu=1")
    result = subprocess.run(command, cwd=ROOT, env=driver_env(cluster), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = str(tmp_path / "spread")
    assert [r["step"] for r in read_records(run_dir)] == [STEPS_PER_EPOCH]
    run = cluster.train_run(run_dir)
    assert run is not None and run["status"] == "FINISHED", "the run is missing from the Train view"
    workers = run["attempts"][-1]["workers"]
    assert sorted(w["world_rank"] for w in workers) == [0, 1]
    assert {w["node_id"] for w in workers} == worker_nodes  # one worker on each worker node
    datasets = cluster.api(f"/api/data/datasets/{run['job_id']}")["datasets"]
    assert any(d["dataset"].startswith("train_") for d in datasets), "no dataset in the Data view"
    # data.task_resources kept every augmentation task on the data node
    tasks = cluster.api("/api/v0/tasks?detail=1&limit=10000")["data"]["result"]["result"]
    views = [t for t in tasks if t["job_id"] == run["job_id"] and "ViewsUDF" in t["name"]]
    assert views and {t["node_id"] for t in views} == {cluster.data_node["node_id"]}
    # the progress queue sits on the driver's node (the head: Ray connects a driver to the head
    # raylet of its machine), never on a worker node whose loss would fail every restart with it
    actors = cluster.api("/api/v0/actors?detail=1&limit=10000")["data"]["result"]["result"]
    queues = [a for a in actors
              if a["job_id"] == run["job_id"] and a["class_name"].endswith("_QueueActor")]
    assert queues and {a["node_id"] for a in queues} == {cluster.head["node_id"]}, queues


def _wait_for_first_checkpoint(run_dir: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not read_records(run_dir):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "no checkpoint within the time limit"
        time.sleep(0.2)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_worker_node_resumes_from_the_last_checkpoint(cluster, tmp_path):
    epochs = 5
    run_dir = str(tmp_path / "fault")
    command = selfsup_run(cluster, tmp_path, "fault", f"train.epochs={epochs}",
                          "train.checkpoint_every=1", f"train.keep_checkpoints={epochs}",
                          "train.max_failures=3")
    proc = subprocess.Popen(command, cwd=ROOT, env=driver_env(cluster), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # a spare node joins while the run starts, so the restart need not wait for one to boot
    spare = threading.Thread(target=cluster.add_workers, args=(1,))
    spare.start()
    try:
        _wait_for_first_checkpoint(run_dir, proc)
        first = cluster.train_run(run_dir)["attempts"][-1]["workers"]
        victim = next(n for n in cluster.nodes if n["node_id"] == first[1]["node_id"])
        saved_at_kill = max(read_meta(d)["epoch"] for d in _checkpoints(run_dir))
        cluster.kill(victim)  # rank 1's node, mid-run
        out = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
        spare.join()
    assert proc.returncode == 0, out
    assert saved_at_kill < epochs - 1, "the run ended before the node was killed"
    run = cluster.train_run(run_dir)
    assert run["status"] == "FINISHED" and len(run["attempts"]) >= 2, "no restart happened"
    assert victim["node_id"] not in {w["node_id"] for w in run["attempts"][-1]["workers"]}
    # no epoch trained twice: the restart resumed after the newest checkpoint, not from epoch 0,
    # and the step count went on from there
    logged = [r["epoch"] for r in read_records(run_dir)]
    assert logged == sorted(set(logged)) and logged[-1] == epochs - 1, logged
    assert all(r["step"] == (r["epoch"] + 1) * STEPS_PER_EPOCH for r in read_records(run_dir))
    # no checkpoint lost: one per epoch, each with the step count of its epoch
    metas = sorted((read_meta(d)["epoch"], read_meta(d)["step"]) for d in _checkpoints(run_dir))
    assert metas == [(e, (e + 1) * STEPS_PER_EPOCH) for e in range(epochs)]


def _checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "checkpoints")
    return [os.path.join(root, d) for d in os.listdir(root) if d.startswith("checkpoint_")
            and os.path.exists(os.path.join(root, d, "meta.json"))]
