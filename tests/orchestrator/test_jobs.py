"""`selfsup submit` and `selfsup jobs`: what is uploaded, how selfsup reaches the job, the job's
command line, and a real token-authenticated local cluster driven through the CLI from start to
`cluster down`."""
from __future__ import annotations

import ast
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
import zipfile
from pathlib import Path

import pytest
import yaml

from methods.config import ConfigError
from orchestrator.cli import parser
from orchestrator.cluster import free_port
from orchestrator.jobs import (JOB_CONFIG, _check_storage, _working_dir, entrypoint, runtime_env,
                               selfsup_env, stage, upload_excludes)
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = [str(ROOT / name) for name in ("orchestrator", "methods", "pipelines")]
MISSING = "/path/that/does/not/exist/here"


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


def test_the_job_gets_the_resolved_config_and_the_working_dir_as_ray_packs_it(tmp_path):
    from ray._private.runtime_env.packaging import _zip_files
    user = tmp_path / "experiment"
    for path, text in (("simclr.yaml", "method: {name: simclr}\n"), ("notes/plan.md", "x"),
                       (".gitignore", "images/\n"), ("images/a.png", "x"),
                       ("outputs/run/summary.json", "{}"), ("runs/r/ckpt", "x")):
        (user / path).parent.mkdir(parents=True, exist_ok=True)
        (user / path).write_text(text)
    with open(user / "big.bin", "wb") as f:
        f.truncate(51 * 2**20)
    staged = tmp_path / "staged"
    staged.mkdir()
    stage(staged, "method:\n  name: simclr\n", _working_dir(str(user)))
    excludes, _ = upload_excludes(user, str(user / "runs"))
    _zip_files(str(staged), excludes, str(tmp_path / "job.zip"), include_gitignore=True)
    with zipfile.ZipFile(tmp_path / "job.zip") as packed:  # what Ray uploads as working_dir
        assert sorted(packed.namelist()) == sorted([".gitignore", JOB_CONFIG, "notes/plan.md",
                                                    "simclr.yaml"])
        assert packed.read(JOB_CONFIG) == b"method:\n  name: simclr\n"
    shutil.rmtree(staged)  # as the submit's TemporaryDirectory does: links go, the folder stays
    assert (user / "notes" / "plan.md").read_text() == "x" and (user / "images").is_dir()
    alone = tmp_path / "alone"
    alone.mkdir()
    stage(alone, "x: 1\n", None)
    assert os.listdir(alone) == [JOB_CONFIG]
    (user / JOB_CONFIG).write_text("x")
    with pytest.raises(ConfigError, match=f"--working-dir .*{JOB_CONFIG}.*rename"):
        stage(alone, "x: 1\n", user)
    with pytest.raises(ConfigError, match="--working-dir .*no such folder"):
        _working_dir(str(tmp_path / "nowhere"))


def test_each_selfsup_mode_builds_its_runtime_env(tmp_path):
    env = runtime_env(tmp_path, ["outputs"], "local", None)
    assert env == {"working_dir": str(tmp_path), "excludes": ["outputs"],
                   "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
                   "py_modules": PACKAGES}  # this test's selfsup is the checkout's
    assert selfsup_env("cluster", None) == {}
    assert selfsup_env("pip:selfsup==0.1.0", None) == {"pip": ["selfsup==0.1.0"]}
    # A checkout as --working-dir: the job imports it (its cwd comes first on sys.path).
    assert selfsup_env("local", ROOT) == {}  # it is this selfsup: nothing else to ship
    other = tmp_path / "other-checkout"
    (other / "orchestrator").mkdir(parents=True)
    (other / "orchestrator" / "__init__.py").write_text("")
    assert selfsup_env("cluster", other) == {}
    for mode in ("local", "pip:selfsup==0.1.0"):
        with pytest.raises(ConfigError, match=r"--working-dir .* orchestrator/.*--selfsup cluster"):
            selfsup_env(mode, other)


@pytest.mark.parametrize("value, message", [("pip:selfsup", "pin what every node installs"),
                                            ("pip:", "choose local"), ("docker", "choose local")])
def test_selfsup_flag_refuses_what_cannot_work(capsys, value, message):
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(["submit", "c.yaml", "--selfsup", value])
    assert exited.value.code == 2
    assert f"argument --selfsup: {value!r}: {message}" in capsys.readouterr().err
    for fine in ("local", "cluster", "pip:selfsup==0.1.0", "pip:selfsup @ git+https://h/r@abc"):
        assert parser().parse_args(["submit", "c.yaml", "--selfsup", fine]).selfsup == fine


def test_submit_ships_the_resolved_config_of_a_config_from_anywhere(tmp_path, monkeypatch,
                                                                     capsys):
    from orchestrator import jobs
    from orchestrator.config import from_dict, load_config
    config = tmp_path / "mine.yaml"  # outside the project; its data is on the cluster only
    shutil.copy(ROOT / "configs" / "simclr.yaml", config)
    sets = [f"data.source=folder:{MISSING}", "train.epochs=3", "cluster.storage_path=/mnt/s"]
    submitted = {}

    class Jobs:
        def submit_job(self, entrypoint, runtime_env, metadata):
            submitted.update(entrypoint=entrypoint, runtime_env=runtime_env, staged=sorted(
                os.listdir(runtime_env["working_dir"])), config=yaml.safe_load(
                Path(runtime_env["working_dir"], JOB_CONFIG).read_text()))
            return "raysubmit_x"

    monkeypatch.setattr(jobs, "client", lambda address: Jobs())
    args = parser().parse_args(["submit", str(config), "--name", "mine", "--address",
                                "http://127.0.0.1:1", *[w for s in sets for w in ("--set", s)]])
    assert args.handler(args) == 0
    assert submitted["entrypoint"] == entrypoint("run", "mine")
    assert submitted["staged"] == [JOB_CONFIG]
    assert submitted["runtime_env"]["py_modules"] == PACKAGES
    expected = load_config(str(config), [*sets, "output.name=mine"], check_data=False)
    assert from_dict(submitted["config"]) == expected
    assert "submitted raysubmit_x: selfsup run" in capsys.readouterr().out


def test_entrypoint_runs_the_same_cli_on_the_resolved_config():
    assert shlex.split(entrypoint("run", "my run")) == [
        "python", "-m", "orchestrator.cli", "run", JOB_CONFIG, "--name", "my run"]


def test_submit_needs_an_absolute_storage_path():
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

    def cli(self, *args: str, timeout: float = 180, cwd: Path = ROOT,
            env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd,
                                env={**self.env, **(env or {})}, capture_output=True, text=True,
                                timeout=timeout)
        self.outputs += [result.stdout, result.stderr]
        return result

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT,
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def submit(self, name: str, *overrides: str, config: str = "configs/simclr.yaml",
               flags: tuple[str, ...] = (), **cli) -> subprocess.CompletedProcess:
        """`selfsup submit` of a tiny 1-epoch run; `.job` is the submission id."""
        sets = [*TINY, "eval.stages=[]", "eval.online_every=0", "train.epochs=1",
                f"cluster.storage_path={self.storage}", *overrides]
        result = self.cli("submit", config, "--address", self.dashboard, "--name", name, *flags,
                          *[w for s in sets for w in ("--set", s)], **cli)
        assert result.returncode == 0, result.stdout + result.stderr
        result.job = re.search(r"^submitted (\S+):", result.stdout, re.M).group(1)
        return result

    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text()

    def job_status(self, job_id: str) -> str:
        request = urllib.request.Request(f"{self.dashboard}/api/jobs/{job_id}",
                                         headers={"Authorization": f"Bearer {self.token()}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.load(r)["status"]

    def job_logs(self, job_id: str, timeout: float = 240) -> tuple[str, str]:
        """(status, log) once the job has ended, read from the Jobs REST API with the token."""
        _wait_for(lambda: self.job_status(job_id) in ("SUCCEEDED", "FAILED", "STOPPED"),
                  timeout, f"job {job_id} to end")
        request = urllib.request.Request(f"{self.dashboard}/api/jobs/{job_id}/logs",
                                         headers={"Authorization": f"Bearer {self.token()}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return self.job_status(job_id), json.load(r)["logs"]

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
@pytest.mark.slow
def test_token_cluster_submit_follow_stop_and_down(session):
    s = session
    processes = _cluster_up(s)
    status = s.popen("cluster", "status")
    long_job, short_job = s.submit("long", "train.epochs=1000").job, s.submit("short").job
    _stop(s, long_job)
    _wait_for_success_and_read_logs(s, short_job, long_job)
    nodes = status.communicate(timeout=60)[0]
    s.outputs.append(nodes)
    assert status.returncode == 0 and re.search(r"head\s+ALIVE\s+\{'CPU': 2.0\}", nodes)
    down = s.cli("cluster", "down", "--grace", "2")
    assert down.returncode == 0 and "stopped the Ray head" in down.stdout, down.stderr
    assert s.state() is None
    assert not [p for p in processes if _same_process_alive(p)], "cluster down left processes"
    # `ray start` pointed <temp>/ray_current_cluster at the head; a later plain `ray.init()`
    # would join that dead address and retry it for minutes
    assert not (Path(s.ray_tmp) / "ray_current_cluster").exists(), "down left Ray's pointer"
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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One token-auth head for the tests that only submit to it (last in this file, so it is up
    only while they run)."""
    s = Session(tmp_path_factory.mktemp("cluster"))
    try:
        _cluster_up(s)
        yield s
    finally:
        s.tear_down()
        shutil.rmtree(s.ray_tmp, ignore_errors=True)


@pytest.mark.ray
def test_data_only_the_cluster_sees_is_checked_in_the_job(cluster):
    job = cluster.submit("no-data", f"data.source=folder:{MISSING}").job  # accepted here
    status, logs = cluster.job_logs(job)
    assert status == "FAILED", logs
    assert re.search(rf"selfsup: config error: data\.source\b.*{re.escape(MISSING)}", logs), logs
    assert "Traceback" not in logs


@pytest.mark.ray
@pytest.mark.slow
def test_a_pip_installed_selfsup_submits_a_config_from_the_users_own_folder(cluster, tmp_path):
    # A non-editable install: the three packages copied, no pyproject.toml, found through
    # PYTHONPATH. Each process that imports the copy prints where from and its working folder.
    site = tmp_path / "site-packages"
    for name in ("orchestrator", "methods", "pipelines"):
        shutil.copytree(ROOT / name, site / name, ignore=shutil.ignore_patterns("__pycache__"))
    with open(site / "orchestrator" / "__init__.py", "a") as f:
        f.write("import os as _os\n"
                "print(f'selfsup-under-test: {__file__} in {sorted(_os.listdir())}', flush=True)\n")
    experiment = tmp_path / "experiment"  # outside the project, and the submitting cwd
    experiment.mkdir()
    shutil.copy(ROOT / "configs" / "simclr.yaml", experiment / "simclr.yaml")
    (experiment / "notes.md").write_text("the user's own file\n")
    submitted = cluster.submit("from-pip", "data.test_fraction=0.9",  # 180 images: 1 step
                               config="simclr.yaml", flags=("--working-dir", "."),
                               cwd=experiment, env={"PYTHONPATH": str(site)})
    assert f"selfsup-under-test: {site / 'orchestrator' / '__init__.py'} in " in submitted.stdout
    assert f"selfsup      this one, shipped from {site}\n" in submitted.stdout
    status, logs = cluster.job_logs(submitted.job)
    assert status == "SUCCEEDED", logs
    # The job's driver imported the shipped copy (py_modules), in the shipped working dir.
    driver = re.search(r"^selfsup-under-test: (\S+) in (\[.*\])$", logs, re.M)
    assert driver, logs
    assert "/runtime_resources/py_modules_files/" in driver[1]
    assert driver[1].endswith("/orchestrator/__init__.py")
    assert ast.literal_eval(driver[2]) == ["notes.md", JOB_CONFIG, "simclr.yaml"]
    assert "simclr: 1 epochs," in logs
    run = cluster.storage / "from-pip"
    assert (run / "summary.json").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["backbone"]["width"] == 8  # --set
    assert cluster.token() not in "\n".join(cluster.outputs), "the token was printed"
