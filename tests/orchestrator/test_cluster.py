"""`selfsup cluster`: the token file, stopping only what `up` started, and the storage checks
that keep a multi-machine run from writing checkpoints to node-local disks. No Ray cluster here:
the real head is started in tests/orchestrator/test_jobs.py."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from methods.config import ConfigError
from orchestrator import cluster, ray_env
from orchestrator.cli import main
from orchestrator.config import ClusterConfig, apply_overrides, from_dict
from orchestrator.storage import check_shared, is_shared_filesystem, mount_of

import psutil  # noqa: E402  (bundled with Ray; importable once orchestrator.cluster imported ray)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_token_file_is_created_private_kept_and_never_replaced(home, monkeypatch, capsys):
    source = cluster.ensure_token()
    token_file = home / ".ray" / "auth_token"
    assert source == str(token_file)
    token = token_file.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert token_file.stat().st_mode & 0o777 == 0o600
    token_file.chmod(0o644)  # as `ray.init()` leaves the file it generates
    cluster.ensure_token()
    assert token_file.read_text() == token
    assert "readable by other users" in capsys.readouterr().err
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x" * 64)
    token_file.unlink()
    assert cluster.ensure_token() == "the RAY_AUTH_TOKEN environment variable"
    assert not token_file.exists()


def _spawn_group() -> subprocess.Popen:
    """A group leader with a child in a session of its own (as Ray's job drivers are)."""
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(120)'], start_new_session=True); time.sleep(120)")
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.time() + 30
    while not psutil.Process(leader.pid).children():
        assert time.time() < deadline
        time.sleep(0.05)
    return leader


def test_stop_hits_the_recorded_processes_their_descendants_and_no_other():
    ours = _spawn_group()
    theirs = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                              start_new_session=True)
    try:
        child = psutil.Process(ours.pid).children()[0]
        records = [cluster._record(psutil.Process(ours.pid))]
        # `theirs` leads a group and holds a pid that was recorded for a process (and a group
        # leader) that has since exited
        reused = {**cluster._record(psutil.Process(theirs.pid)), "create_time": 1.0}
        assert cluster.stop_processes(records + [reused], leader=reused, grace=5) == 2
        assert ours.wait(timeout=10) is not None
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
        assert theirs.poll() is None, "a process `up` did not start was stopped"
    finally:
        for p in (ours, theirs):
            p.kill()
            p.wait()


def test_up_refuses_a_second_cluster_and_down_stops_the_recorded_one(home, capsys):
    assert main(["cluster", "down"]) == 0
    assert "no cluster started by `selfsup cluster up`" in capsys.readouterr().out
    head = _spawn_group()  # stands in for the head's daemons
    leader = cluster._record(psutil.Process(head.pid))
    state = {"address": "10.0.0.1:6379", "dashboard": "http://127.0.0.1:8265",
             "session_dir": "/tmp/ray/session_x", "leader": leader,
             "processes": [leader]}
    cluster.state_path().parent.mkdir()
    cluster.state_path().write_text(json.dumps(state))
    try:
        assert main(["cluster", "up"]) == 1
        assert "selfsup cluster down` first" in capsys.readouterr().err
        assert main(["cluster", "down", "--grace", "2"]) == 0
        assert "2 process(es)" in capsys.readouterr().out
        assert head.wait(timeout=10) is not None
        assert not cluster.state_path().exists()
    finally:
        head.kill()
        head.wait()


MOUNTS = "/dev/sda1 / ext4 rw 0 0\nserver:/export /mnt/shared nfs4 rw 0 0\n" \
         "bucket /mnt/bucket fuse.s3fs rw 0 0\n"


@pytest.fixture
def mounts(tmp_path):
    path = tmp_path / "mounts"
    path.write_text(MOUNTS)
    return str(path)


def test_mount_of_finds_the_innermost_mount(mounts):
    assert mount_of("/mnt/shared/selfsup/run", mounts) == ("/mnt/shared", "nfs4")
    assert mount_of("/mnt/sharedother", mounts) == ("/", "ext4")
    assert mount_of("/mnt/bucket", mounts) == ("/mnt/bucket", "fuse.s3fs")
    assert is_shared_filesystem("fuse.s3fs") and not is_shared_filesystem("ext4")


TWO_MACHINES = {"10.0.0.1", "10.0.0.2"}


def test_node_local_storage_on_several_machines_is_an_error_that_says_why(mounts):
    with pytest.raises(ConfigError) as e:
        check_shared("/data/runs", None, TWO_MACHINES, mounts)
    assert "2 machines" in str(e.value) and "ext4" in str(e.value)
    assert "shared_storage=true" in str(e.value)
    with pytest.raises(ConfigError, match="not set"):
        check_shared(None, None, TWO_MACHINES, mounts)
    with pytest.raises(ConfigError, match="node-local"):
        check_shared("/mnt/shared/runs", False, TWO_MACHINES, mounts)


def test_shared_or_single_machine_storage_passes(mounts):
    check_shared("/data/runs", None, {"10.0.0.1"}, mounts)  # every node on one disk
    check_shared("/mnt/shared/runs", None, TWO_MACHINES, mounts)
    check_shared("/mnt/bucket/runs", None, TWO_MACHINES, mounts)
    check_shared("/data/runs", True, TWO_MACHINES, mounts)  # the user knows it is shared


def test_uri_storage_is_refused_before_ray_starts():
    d = apply_overrides({"method": {"name": "simclr"}}, ["cluster.storage_path=s3://bucket/runs"])
    with pytest.raises(ConfigError, match=r"cluster.storage_path: .*mount"):
        from_dict(d)


def test_joining_a_multi_machine_cluster_checks_the_storage(monkeypatch):
    joined = []
    monkeypatch.setattr(ray_env.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_env.ray, "init", lambda **kw: joined.append(kw["address"]))
    monkeypatch.setattr(ray_env, "token_available", lambda: False)
    monkeypatch.setattr(ray_env, "alive_hosts", lambda: TWO_MACHINES)
    with pytest.raises(ConfigError, match="2 machines"):
        ray_env.init_ray(ClusterConfig(address="10.0.0.1:6379", storage_path="/var/tmp/runs",
                                       shared_storage=False))
    assert joined == ["10.0.0.1:6379"]


def test_down_forgets_rays_pointer_to_its_head_only(tmp_path):
    pointer = tmp_path / "ray_current_cluster"  # where `ray start --temp-dir` writes it
    pointer.write_text("10.0.0.9:6379")
    cluster.forget_address("10.0.0.1:6379", str(tmp_path))
    assert pointer.read_text() == "10.0.0.9:6379", "a pointer to another head was removed"
    pointer.write_text("10.0.0.1:6379")
    cluster.forget_address("10.0.0.1:6379", str(tmp_path))
    assert not pointer.exists()
    cluster.forget_address("10.0.0.1:6379", str(tmp_path))  # already gone: nothing to do


def test_a_run_without_an_address_starts_its_own_ray(monkeypatch):
    started = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_env.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_env.ray, "init", lambda **kw: started.append(kw))
    ray_env.init_ray(ClusterConfig())
    # "local", not None: None joins the latest cluster `ray start` left on this machine
    assert [kw["address"] for kw in started] == ["local"]
    assert started[0]["dashboard_host"] == "127.0.0.1"
