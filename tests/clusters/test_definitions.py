"""The cluster definitions under clusters/ parse and carry what selfsup relies on.

No network, no Ray cluster: YAML is read with yaml.safe_load, the launcher config is validated
against the schema shipped with the installed Ray, every `ray start` argument list is parsed by
Ray's own CLI, and the SLURM script is executed with stub `srun`/`ray`/`selfsup` commands.
"""

import json
import os
import re
import secrets
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray._private.label_utils import validate_node_label_syntax
from ray.scripts.scripts import start as ray_start

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
KUBERAY = CLUSTERS / "kuberay"
SBATCH = CLUSTERS / "slurm" / "selfsup.sbatch"
DOCKERFILE = CLUSTERS / "docker" / "Dockerfile"
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def cluster_specs():
    """(name, RayCluster spec) for the standalone cluster and the RayJob's inline cluster."""
    return [
        ("raycluster", load(KUBERAY / "raycluster.yaml")["spec"]),
        ("rayjob", load(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"]),
    ]


def pod_specs(spec):
    """(group name, pod spec, group) for the head and every worker group."""
    head = spec["headGroupSpec"]
    pods = [("head", head["template"]["spec"], head)]
    pods += [(g["groupName"], g["template"]["spec"], g) for g in spec["workerGroupSpecs"]]
    return pods


def limits(pod):
    return pod["containers"][0]["resources"]["limits"]


def parse_ray_start(args):
    """Parse `ray start` arguments with Ray's CLI: unknown flags or bad values raise."""
    return ray_start.make_context("ray start", list(args)).params


def ray_start_invocations(command):
    """Argument lists of every `ray start` in a shell command line."""
    found = []
    for segment in re.split(r";|&&|\|\|", command):
        words = shlex.split(segment)
        for i in range(len(words) - 1):
            if words[i : i + 2] == ["ray", "start"]:
                found.append(words[i + 2 :])
    return found


@pytest.mark.parametrize("name,spec", cluster_specs())
def test_kuberay_cluster_pins_ray_and_enables_token_auth(name, spec):
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    for _, pod, _ in pod_specs(spec):
        for container in pod["containers"]:
            names = {env["name"]: env for env in container.get("env", [])}
            assert "value" not in names.get("RAY_AUTH_TOKEN", {}), f"{name}: literal token"


def test_kuberay_kinds_and_api_versions():
    assert load(KUBERAY / "raycluster.yaml")["kind"] == "RayCluster"
    assert load(KUBERAY / "rayjob.yaml")["kind"] == "RayJob"
    for file in ("raycluster.yaml", "rayjob.yaml"):
        assert load(KUBERAY / file)["apiVersion"] == "ray.io/v1"
    assert load(KUBERAY / "storage.yaml")["kind"] == "PersistentVolumeClaim"


@pytest.mark.parametrize("name,spec", cluster_specs())
def test_kuberay_head_takes_no_work_and_is_not_exposed(name, spec):
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["serviceType"] == "ClusterIP"
    assert "nvidia.com/gpu" not in limits(head["template"]["spec"])


@pytest.mark.parametrize("name,spec", cluster_specs())
def test_kuberay_gpu_train_and_cpu_data_groups(name, spec):
    groups = spec["workerGroupSpecs"]
    train = [g for g in groups if "nvidia.com/gpu" in limits(g["template"]["spec"])]
    data = [g for g in groups if "data_cpu" in g.get("resources", {})]
    assert train and data
    for group in train:
        assert int(limits(group["template"]["spec"])["nvidia.com/gpu"]) >= 1
        assert group["labels"]["selfsup/role"] == "train"
    for group in data:
        pod = group["template"]["spec"]
        assert "nvidia.com/gpu" not in limits(pod)
        assert group["resources"]["data_cpu"] == str(limits(pod)["cpu"])
        assert group["labels"]["selfsup/role"] == "data"
    for group in groups:
        validate_node_label_syntax(group.get("labels", {}))
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > 0


@pytest.mark.parametrize("name,spec", cluster_specs())
def test_kuberay_every_pod_has_memory_shm_and_the_shared_volume(name, spec):
    claim = load(KUBERAY / "storage.yaml")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    shared_paths = set()
    for group, pod, _ in pod_specs(spec):
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", group
            shared = [p for p, v in mounts.items() if "persistentVolumeClaim" in volumes[v]]
            assert len(shared) == 1, group
            pvc = volumes[mounts[shared[0]]]["persistentVolumeClaim"]
            assert pvc["claimName"] == claim["metadata"]["name"], group
            shared_paths.add(shared[0])
    assert len(shared_paths) == 1, f"{name}: shared volume mounted at {shared_paths}"


@pytest.mark.parametrize("name,spec", cluster_specs())
def test_kuberay_ray_start_params_are_ray_start_options(name, spec):
    for group, _, group_spec in pod_specs(spec):
        params = group_spec.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), group
        parse_ray_start(f"--{key}={value}" for key, value in params.items())


def test_kuberay_one_image_everywhere():
    images = {
        container["image"]
        for _, spec in cluster_specs()
        for _, pod, _ in pod_specs(spec)
        for container in pod["containers"]
    }
    assert len(images) == 1


def test_rayjob_runs_selfsup_on_shared_storage_and_cleans_up():
    job = load(KUBERAY / "rayjob.yaml")["spec"]
    entrypoint = job["entrypoint"]
    assert entrypoint.startswith("selfsup ")
    overrides = dict(word.split("=", 1) for word in shlex.split(entrypoint) if "=" in word)
    head_pod = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head_pod["containers"][0]["volumeMounts"]}
    mount = mounts["shared"]
    assert overrides["cluster.storage_path"].startswith(mount.rstrip("/") + "/")
    assert overrides["cluster.shared_storage"] == "true"
    groups = job["rayClusterSpec"]["workerGroupSpecs"]
    advertised = {resource for group in groups for resource in group.get("resources", {})}
    asked = {key.split(".", 2)[2] for key in overrides if key.startswith("data.task_resources.")}
    assert asked and asked <= advertised
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] > 0 and job["activeDeadlineSeconds"] > 0
    assert isinstance(yaml.safe_load(job["runtimeEnvYAML"]), dict)


def test_rayjob_cluster_spec_is_the_raycluster_spec():
    (_, standalone), (_, inline) = cluster_specs()
    assert inline == standalone


def test_rayjob_config_exists_in_the_repository():
    config = shlex.split(load(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"])[2]
    if not any((ROOT / "configs").glob("*.yaml")):
        pytest.skip("configs/*.yaml not written yet")
    assert (ROOT / config).is_file()


def launcher():
    return load(CLUSTERS / "launcher" / "aws.yaml")


def test_launcher_matches_the_installed_ray_schema():
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(launcher(), json.loads(schema_path.read_text()))


def test_launcher_node_types():
    config = launcher()
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    data = [t for t in workers if "data_cpu" in t["resources"]]
    assert gpu and data
    assert all(t["labels"]["selfsup/role"] == "train" for t in gpu)
    for node_type in data:
        assert node_type["resources"]["data_cpu"] == node_type["resources"]["CPU"]
        assert node_type["resources"].get("GPU", 0) == 0
        assert node_type["labels"]["selfsup/role"] == "data"
    for node_type in workers:
        validate_node_label_syntax(node_type["labels"])
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]


def test_launcher_start_commands_keep_the_dashboard_on_localhost():
    config = launcher()
    head = [a for c in config["head_start_ray_commands"] for a in ray_start_invocations(c)]
    workers = [a for c in config["worker_start_ray_commands"] for a in ray_start_invocations(c)]
    assert len(head) == 1 and len(workers) == 1
    head_params = parse_ray_start(head[0])
    assert head_params["head"] and head_params["dashboard_host"] == "127.0.0.1"
    assert parse_ray_start(workers[0])["address"].endswith(":6379")
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command
    assert "0.0.0.0" not in (CLUSTERS / "launcher" / "aws.yaml").read_text()


def test_launcher_installs_the_pinned_stack():
    setup = " ".join(launcher()["setup_commands"])
    assert all(pin in setup for pin in TORCH_PINS)
    assert f"=={ray.__version__}" in setup and "pip install --quiet -e" in setup


def write_stub(path, body):
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def write_stubs(bin_dir):
    """Fake SLURM and Ray on 3 nodes; each call is appended to $STUB_LOG. The fake `python -`
    (the script's readiness check) counts `ray start` calls, minus those on $STUB_DEAD_NODE."""
    bin_dir.mkdir()
    write_stub(bin_dir / "scontrol", "printf 'n1\\nn2\\nn3\\n'\n")
    write_stub(bin_dir / "srun", (
        'echo "srun $*" >> "$STUB_LOG"\n'
        'if [[ " $* " == *" hostname "* ]]; then echo "10.1.2.3 fe80::1"; exit 0; fi\n'
        'if [[ " $* " == *" --block "* ]]; then exec /bin/sleep 30; fi\n'
    ))
    write_stub(bin_dir / "ray", 'echo "ray $*" >> "$STUB_LOG"\n')
    write_stub(bin_dir / "selfsup", 'echo "selfsup $*" >> "$STUB_LOG"\nexit "$SELFSUP_EXIT"\n')
    write_stub(bin_dir / "sleep", "/bin/sleep 0.02\n")
    write_stub(bin_dir / "python", (
        'if [[ "$1" != "-" ]]; then exec "$REAL_PYTHON" "$@"; fi\n'
        "cat > /dev/null\n"
        "up=$(grep 'ray start' \"$STUB_LOG\" | grep -vc -- \"-w $STUB_DEAD_NODE \")\n"
        '(( up >= $3 )) && echo "nodes-up $3" >> "$STUB_LOG"\n'
    ))


def run_sbatch(tmp_path, selfsup_exit=0, dead_node="none", wait_seconds=30):
    """Run the SLURM script on the fake nodes; returns (process, log lines, environment)."""
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv" / "bin"
    write_stubs(bin_dir)
    venv.mkdir(parents=True)
    (venv / "activate").write_text("")
    log = tmp_path / "calls.log"
    log.touch()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path / "home"),
        "SHARED": str(tmp_path / "shared"), "VENV": str(venv.parent), "STUB_LOG": str(log),
        "STUB_DEAD_NODE": dead_node, "SELFSUP_EXIT": str(selfsup_exit),
        "REAL_PYTHON": sys.executable, "WAIT_SECONDS": str(wait_seconds),
        "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_CPUS_PER_TASK": "4", "SLURM_GPUS_ON_NODE": "1",
        "SLURM_SUBMIT_DIR": str(tmp_path),
    }
    proc = subprocess.Popen(
        ["bash", str(SBATCH), "--set", "train.epochs=2"], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        # Fake `ray start --block` steps that the script failed to stop hold the pipes open.
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return result, log.read_text().splitlines(), env


def index_of(lines, pattern):
    return next(i for i, line in enumerate(lines) if re.search(pattern, line))


def test_sbatch_passes_bash_syntax_check():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    assert "ray start --head" in text and "selfsup run" in text


def test_sbatch_starts_head_then_workers_then_runs_selfsup_and_stops_ray(tmp_path):
    proc, lines, env = run_sbatch(tmp_path)
    assert proc.returncode == 0, proc.stderr
    head = index_of(lines, r"-w n1 ray start --head")
    workers = [index_of(lines, rf"-w {node} ray start --block --address=") for node in ("n2", "n3")]
    run = index_of(lines, r"^selfsup run")
    assert head < index_of(lines, "nodes-up 1") < min(workers)
    assert max(workers) < index_of(lines, "nodes-up 3") < run < index_of(lines, "^ray stop")
    starts = [
        parse_ray_start(line.split(" ray start ", 1)[1].split())
        for line in lines
        if " ray start " in line
    ]
    assert len(starts) == 3 and starts[0]["dashboard_host"] == "127.0.0.1"
    for params in starts:
        assert params["num_cpus"] == 4 and params["num_gpus"] == 1
        assert params["labels"] == "selfsup/role=train"
        assert params["head"] or params["address"] == "10.1.2.3:6379"
    assert lines[run] == (
        f"selfsup run configs/simclr.yaml --address auto "
        f"--set cluster.storage_path={env['SHARED']}/selfsup --set cluster.shared_storage=true "
        f"--set train.epochs=2"
    )


def test_sbatch_returns_selfsups_failure_and_still_stops_ray(tmp_path):
    proc, lines, _ = run_sbatch(tmp_path, selfsup_exit=3)
    assert proc.returncode == 3
    assert index_of(lines, r"^selfsup run") < index_of(lines, "^ray stop")


def test_sbatch_never_trains_on_an_incomplete_cluster(tmp_path):
    proc, lines, _ = run_sbatch(tmp_path, dead_node="n3", wait_seconds=1)
    assert proc.returncode != 0
    assert "fewer than 3 Ray nodes" in proc.stderr
    assert not any(line.startswith("selfsup") for line in lines)
    assert any(line.startswith("ray stop") for line in lines)


def test_sbatch_creates_a_private_token_and_never_prints_it(tmp_path):
    proc, lines, env = run_sbatch(tmp_path)
    token_file = Path(env["HOME"]) / ".ray" / "auth_token"
    token = token_file.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token not in proc.stdout + proc.stderr + "\n".join(lines)


def test_dockerfile_pins_the_stack_and_runs_as_non_root():
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    run = " ".join(l for l in lines if l.startswith("RUN"))
    assert all(pin in run for pin in TORCH_PINS) and f"=={ray.__version__}" in run
    assert "pip install ." in run
    user = [l.split()[1] for l in lines if l.startswith("USER")][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert not any(re.match(r"(ENV|ARG)\s+\S*(TOKEN|SECRET|PASSWORD|KEY)", l, re.I) for l in lines)


def test_dockerignore_keeps_credentials_and_venv_out():
    ignored = (CLUSTERS / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    for pattern in (".git", ".venv", "**/auth_token", "**/.ray"):
        assert pattern in ignored


SET_OVERRIDE = re.compile(r"--set\s+([A-Za-z_][\w./-]*=(?:\"[^\"]*\"|[^\s\\`\"]*))")


def test_every_set_override_in_the_definitions_is_a_valid_selfsup_config_key():
    from orchestrator.config import apply_overrides, from_dict, read_yaml

    base = read_yaml(str(ROOT / "configs" / "simclr.yaml"))
    found = {}
    for path in CLUSTERS.rglob("*"):
        if path.is_file():
            for override in SET_OVERRIDE.findall(path.read_text()):
                found.setdefault(override, str(path.relative_to(ROOT)))
    assert any(o.startswith("data.task_resources.") for o in found)
    for override, where in found.items():
        try:
            from_dict(apply_overrides(base, [override]))
        except ValueError as e:
            pytest.fail(f"{where}: --set {override}: {e}")


def test_every_definition_folder_has_a_readme():
    for folder in ("", "local", "kuberay", "launcher", "slurm", "docker"):
        assert (CLUSTERS / folder / "README.md").read_text().strip(), folder


TOKEN_PATTERNS = [
    re.compile(r"\b[0-9a-f]{32,}\b", re.I),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"Bearer\s+[A-Za-z0-9._~+/-]{16,}"),
    # a key naming a secret, then a literal value with a digit in it (names rarely have one)
    re.compile(
        r"(token|secret|password)\w*[\"']?\s*[:=]\s*[\"']?"
        r"(?=[A-Za-z0-9+/_.-]*\d)[A-Za-z0-9+/_.-]{16,}",
        re.I,
    ),
]


def looks_like_token(text):
    return [m.group(0) for p in TOKEN_PATTERNS for m in p.finditer(text)]


def test_token_detector_flags_real_tokens_and_not_references():
    token = secrets.token_hex(32)
    assert looks_like_token(f"export RAY_AUTH_TOKEN={token}")
    assert looks_like_token(f"auth_token: {secrets.token_urlsafe(24)}")
    assert looks_like_token(f"Authorization: Bearer {secrets.token_urlsafe(24)}")
    assert not looks_like_token('export RAY_AUTH_TOKEN="$(kubectl get secret selfsup)"')
    assert not looks_like_token("secretKeyRef: {name: selfsup, key: auth_token}")
    assert not looks_like_token("secretName: selfsup-ray-token")


def test_no_cluster_file_contains_a_token_value():
    files = [p for p in CLUSTERS.rglob("*") if p.is_file()]
    assert len(files) >= 12
    found = {str(p.relative_to(ROOT)): looks_like_token(p.read_text()) for p in files}
    assert not {path: hits for path, hits in found.items() if hits}
