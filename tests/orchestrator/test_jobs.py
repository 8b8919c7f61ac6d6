"""`selfsup submit` and `selfsup jobs`: what is uploaded, the job's command line, and a real
token-authenticated local cluster driven through the CLI from start to `cluster down`."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from methods.config import ConfigError
from orchestrator.cluster import free_port
from orchestrator.jobs import _check_storage, _project_relative, entrypoint, upload_excludes
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]


def test_upload_leaves_out_outputs_environments_storage_and_large_files(tmp_path):
    from ray._private.runtime_env.packaging import _get_excludes
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "simclr.py").write_text("x = 1\n")
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "big.bin", "wb") as f:
        f.truncate(51 * 2**20)  # sparse: no disk used
    for folder in (".git", ".venv", "outputs", "runs", "pkg.egg-info"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "file").write_text("x")
    excludes, large = upload_excludes(tmp_path, str(tmp_path / "runs"))
    assert large == ["data/big.bin"]
    excluded = _get_excludes(tmp_path, excludes)  # Ray's own matcher for `excludes`
    for path in (".git", ".venv", "outputs", "runs", "pkg.egg-info", "data/big.bin"):
        assert excluded(tmp_path / path), path
    assert not excluded(tmp_path / "methods" / "simclr.py")
    assert not excluded(tmp_path / "data")


def test_entrypoint_runs_the_same_cli_with_the_overrides_intact():
    overrides = ["eval.stages=[knn, linear]", "data.label_selector.selfsup/role=data"]
    command = entrypoint("run", "configs/simclr.yaml", overrides, "my run")
    assert shlex.split(command) == [
        "python", "-m", "orchestrator.cli", "run", "configs/simclr.yaml",
        "--set", "eval.stages=[knn, linear]", "--set", "data.label_selector.selfsup/role=data",
        "--name", "my run"]


def test_submit_needs_a_config_inside_the_project_and_an_absolute_storage_path(tmp_path):
    assert _project_relative(str(ROOT / "configs" / "simclr.yaml")) == "configs/simclr.yaml"
    with pytest.raises(ConfigError, match="outside"):
        _project_relative(str(tmp_path / "simclr.yaml"))
    for storage in (None, "outputs", "runs/x"):
        with pytest.raises(ConfigError, match="absolute path"):
            _check_storage(storage)
    _check_storage("/mnt/shared/selfsup")


def test_submit_rejects_a_bad_config_before_contacting_any_cluster():
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "submit", "configs/simclr.yaml",
         "--address", f"http://127.0.0.1:{free_port()}", "--set", "train.epochs=-1",
         "--set", "cluster.storage_path=/tmp/x"], cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2
    assert "train.epochs" in result.stderr and "Traceback" not in result.stderr


class Session:
    """The CLI as a user runs it, in a private HOME (so ~/.ray and ~/.selfsup are the test's)."""

    def __init__(self, tmp_path: Path):
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.storage = tmp_path / "runs"
        self.ray_tmp = tempfile.mkdtemp(prefix="ssjob-", dir="/tmp")  # short: Ray's socket paths
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                                 "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        self.env.update(HOME=str(self.home),
                        MPLCONFIGDIR=os.path.expanduser("~/.cache/matplotlib"))
        self.outputs: list[str] = []
        self.dashboard = f"http://127.0.0.1:{free_port()}"

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT,
                                env=self.env, capture_output=True, text=True, timeout=timeout)
        self.outputs += [result.stdout, result.stderr]
        return result

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT,
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def submit(self, name: str, *overrides: str) -> str:
        sets = [*TINY, "eval.stages=[]", "eval.online_every=0", "train.epochs=1",
                f"cluster.storage_path={self.storage}", *overrides]
        result = self.cli("submit", "configs/simclr.yaml", "--address", self.dashboard,
                          "--name", name, *[w for s in sets for w in ("--set", s)])
        assert result.returncode == 0, result.stdout + result.stderr
        return re.search(r"^submitted (\S+):", result.stdout, re.M).group(1)

    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text()

    def job_status(self, job_id: str) -> str:
        request = urllib.request.Request(f"{self.dashboard}/api/jobs/{job_id}",
                                         headers={"Authorization": f"Bearer {self.token()}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.load(r)["status"]

    def state(self) -> dict | None:
        path = self.home / ".selfsup" / "cluster.json"
        return json.loads(path.read_text()) if path.exists() else None

    def tear_down(self) -> None:
        """Whatever happened, stop what `cluster up` started (the CLI first, then directly)."""
        if self.state():
            self.cli("cluster", "down", "--grace", "2", timeout=120)
        if self.state():
            from orchestrator.cluster import stop_processes
            state = self.state()
            stop_processes(state["processes"], state["leader"], graceful=False)

    def files_text(self) -> str:
        """Everything Ray and selfsup wrote: session logs, run folders, ~/.selfsup."""
        texts = []
        for root in (self.ray_tmp, self.storage, self.home / ".selfsup"):
            for folder, _, files in os.walk(root):
                for name in files:
                    path = os.path.join(folder, name)
                    if os.path.isfile(path) and not os.path.islink(path):
                        with open(path, "rb") as f:
                            texts.append(f.read().decode("utf-8", "replace"))
        return "\n".join(texts)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture
def session(tmp_path):
    s = Session(tmp_path)
    try:
        yield s
    finally:
        s.tear_down()
        shutil.rmtree(s.ray_tmp, ignore_errors=True)


@pytest.mark.ray
def test_token_cluster_submit_follow_stop_and_down(session):
    s = session
    processes = _cluster_up(s)
    status = s.popen("cluster", "status")
    long_job, short_job = s.submit("long", "train.epochs=1000"), s.submit("short")
    _stop(s, long_job)
    _wait_for_success_and_read_logs(s, short_job, long_job)
    nodes = status.communicate(timeout=60)[0]
    s.outputs.append(nodes)
    assert status.returncode == 0 and re.search(r"head\s+ALIVE\s+\{'CPU': 2.0\}", nodes)
    down = s.cli("cluster", "down", "--grace", "2")
    assert down.returncode == 0 and "stopped the Ray head" in down.stdout, down.stderr
    assert s.state() is None
    assert not [p for p in processes if _same_process_alive(p)], "cluster down left processes"
    token = s.token()
    assert token not in "\n".join(s.outputs), "the token was printed"
    assert token not in s.files_text(), "the token was written to a log or output file"


def _same_process_alive(record: dict) -> bool:
    import ray  # noqa: F401  (Ray's bundled psutil)
    import psutil
    try:
        return abs(psutil.Process(record["pid"]).create_time() - record["create_time"]) < 0.01
    except psutil.Error:
        return False


def _cluster_up(s: Session) -> list[dict]:
    up = s.cli("cluster", "up", "--num-cpus", "2", "--port", str(free_port()),
               "--dashboard-port", s.dashboard.rsplit(":", 1)[1],
               "--ray-client-server-port", str(free_port()), "--temp-dir", s.ray_tmp,
               "--object-store-mb", "300")
    assert up.returncode == 0, up.stdout + up.stderr
    assert s.dashboard in up.stdout and "tensorboard --logdir" in up.stdout
    token_file = s.home / ".ray" / "auth_token"
    assert str(token_file) in up.stdout
    assert re.fullmatch(r"[0-9a-f]{64}", s.token()) and token_file.stat().st_mode & 0o777 == 0o600
    with pytest.raises(urllib.error.HTTPError) as refused:  # no token, no entry
        urllib.request.urlopen(f"{s.dashboard}/api/jobs/", timeout=30)
    assert refused.value.code == 401
    return s.state()["processes"]


def _stop(s: Session, job: str) -> None:
    """`jobs stop` a running job; a `jobs logs --follow` of it ends with it."""
    follower = s.popen("jobs", "logs", job, "--follow")  # address: the cluster `up` started
    try:
        _wait_for(lambda: s.job_status(job) == "RUNNING", 120, "the long job to run")
        stop = s.cli("jobs", "stop", job)
        assert stop.returncode == 0 and f"{job}: STOPPED" in stop.stdout, stop.stderr
        followed = follower.communicate(timeout=60)[0]
    finally:
        follower.kill()
    s.outputs.append(followed)
    assert follower.returncode == 1 and f"{job}: STOPPED" in followed
    assert "Running entrypoint for job" in followed


def _wait_for_success_and_read_logs(s: Session, job: str, stopped: str) -> None:
    listing = s.popen("jobs", "list")
    status = s.cli("jobs", "status", job, "--wait", timeout=240)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.splitlines()[-2:] == [f"{job}: SUCCEEDED", "Job finished successfully."]
    logs = s.cli("jobs", "logs", job)
    assert "simclr: 1 epochs, 9 steps" in logs.stdout
    assert f"outputs:     {s.storage / 'short'}" in logs.stdout
    assert (s.storage / "short" / "summary.json").is_file()
    listed = listing.communicate(timeout=60)[0]
    s.outputs.append(listed)
    assert re.search(rf"^{job}\s+\w+\s+short\b", listed, re.M)
    assert re.search(rf"^{stopped}\s+STOPPED\s+long\b", listed, re.M)
