"""Platform files: the cluster launcher config, the KubeRay manifests, the image definition, and
a real start/stop of the local Ray head + MLflow server (platform/local/up, down)."""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "platform" / "local"
K8S = ROOT / "platform" / "k8s"


def _load(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def _walk(node: Any, key: str) -> list[Any]:
    """Every value stored under `key` anywhere in a nested YAML document."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            found.extend(_walk(v, key))
    elif isinstance(node, list):
        for v in node:
            found.extend(_walk(v, key))
    return found


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(k) + _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


# ---------------------------------------------------------------------------------------------
# cluster.yaml


def test_cluster_yaml_matches_rays_schema() -> None:
    config = _load(ROOT / "cluster.yaml")
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(config, schema)
    # What `ray up` does before talking to AWS: merge provider defaults, then validate.
    validate_config(prepare_config(copy.deepcopy(config)))
    # The schema is strict enough to catch a misspelt key, so passing it means something.
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_cluster_yaml_gpu_workers_and_bounds() -> None:
    config = _load(ROOT / "cluster.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = config["head_node_type"]
    workers = {k: v for k, v in types.items() if k != head}
    assert workers, "cluster.yaml: no worker node type"
    for name, t in workers.items():
        assert t["node_config"]["InstanceType"] == "p5.48xlarge", name
        assert t["resources"]["GPU"] == 8, name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
    assert any("experiments" in src or src == "." for src in config["file_mounts"].values())
    assert any("pip install" in c and "[gpu]" in c for c in config["setup_commands"])


def test_cluster_yaml_opens_ssh_only() -> None:
    config = _load(ROOT / "cluster.yaml")
    rules = [r for perms in _walk(config, "IpPermissions") for r in perms]
    for rule in rules:
        assert (rule.get("FromPort"), rule.get("ToPort")) == (22, 22), rule
    # Nothing binds or allows every address: dashboard on 127.0.0.1 (reached via `ray dashboard`).
    assert not [s for s in _strings(config) if "0.0.0.0" in s or "::/0" in s]
    head_cmds = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert "RAY_AUTH_MODE=token" in head_cmds
    assert not _walk(config, "SecurityGroupIds"), "a custom security group bypasses the check"


# ---------------------------------------------------------------------------------------------
# KubeRay manifests and image

SECRETISH = ("TOKEN", "PASSWORD", "SECRET", "KEY", "CREDENTIAL")


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_rayjob_manifest() -> None:
    job = _load(K8S / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"] == "python -m pipelines.train experiments/quickstart.yaml"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    gpus = [
        int(c["resources"]["limits"]["nvidia.com/gpu"])
        for g in spec["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    ]
    assert gpus and all(n == 8 for n in gpus)
    for c in _containers(spec):
        refs = [r["configMapRef"]["name"] for r in c.get("envFrom", []) if "configMapRef" in r]
        assert refs, f"container {c['name']}: MLFLOW_TRACKING_URI must come from a ConfigMap"
        for e in c.get("env", []):
            assert e["name"] != "MLFLOW_TRACKING_URI" or "valueFrom" in e, e
            if any(w in e["name"].upper() for w in SECRETISH):
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], e
    cm = _load(K8S / "mlflow-config.yaml")
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] in refs
    assert cm["data"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert not [k for k in cm["data"] if any(w in k.upper() for w in SECRETISH)]


def test_raycluster_matches_rayjob_cluster() -> None:
    cluster = _load(K8S / "raycluster.yaml")
    job = _load(K8S / "rayjob.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"] == job["spec"]["rayClusterSpec"]
    for doc in (cluster, job):
        assert "LoadBalancer" not in _strings(doc) and "NodePort" not in _strings(doc)


def test_dockerfile_installs_project_with_gpu_extras() -> None:
    lines = [ln.strip() for ln in (ROOT / "platform/docker/Dockerfile").read_text().splitlines()]
    args = {
        ln.split()[1].split("=")[0]: ln.split("=", 1)[1] for ln in lines if ln.startswith("ARG ")
    }
    assert "cuda" in args["BASE_IMAGE"] and "torch" in args["BASE_IMAGE"]
    assert any(ln.startswith("FROM ${BASE_IMAGE}") for ln in lines)
    runs = " ".join(ln for ln in lines if not ln.startswith("#"))
    assert 'pip install --no-build-isolation ".[gpu]"' in runs and "flash_attn" in runs
    assert "COPY experiments" in runs and lines[-1] == "USER ray"


def test_platform_has_no_python_package() -> None:
    # A platform/__init__.py (or any module) would shadow the stdlib `platform` (torch, ray break).
    assert not list((ROOT / "platform").rglob("*.py"))


# ---------------------------------------------------------------------------------------------
# Local head + MLflow, for real


def _free_ports(n: int) -> list[int]:
    """Distinct free ports outside Ray's worker range (10002-19999)."""
    ports: set[int] = set()
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            ports.add(port)
    return sorted(ports)


def _status(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _tree(roots: list[int]) -> set[int]:
    """Live (non-zombie) processes in the sessions led by `roots`, plus their descendants."""
    out = subprocess.run(
        ["ps", "-e", "-o", "pid=,ppid=,sid=,stat="], capture_output=True, text=True, check=True
    ).stdout
    procs = [line.split() for line in out.splitlines()]
    procs = [(int(p), int(pp), int(s)) for p, pp, s, st in procs if not st.startswith("Z")]
    found = {p for p, _, s in procs if s in roots} | (set(roots) & {p for p, _, _ in procs})
    grew = True
    while grew:
        new = {p for p, pp, _ in procs if pp in found} - found
        found |= new
        grew = bool(new)
    return found


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent for UDP connect
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


@pytest.mark.e2e
def test_local_up_idempotent_down(tmp_path: Path) -> None:
    gcs, dash, client, agent, mlf, autoscaler_metrics, dashboard_metrics = _free_ports(7)
    env = {
        **os.environ,
        "AUNET_PLATFORM_DIR": str(tmp_path / "state"),
        "AUNET_RAY_PORT": str(gcs),
        "AUNET_RAY_DASHBOARD_PORT": str(dash),
        "AUNET_RAY_CLIENT_PORT": str(client),
        "AUNET_RAY_AGENT_PORT": str(agent),
        "AUNET_MLFLOW_PORT": str(mlf),
        "AUNET_RAY_NUM_CPUS": "1",
    }
    env.pop("AUNET_BIND_HOST", None)
    state = tmp_path / "state"

    def run(script: str) -> str:
        p = subprocess.run(
            [str(LOCAL / script)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert p.returncode == 0, f"{script} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
        return p.stdout

    def pids() -> tuple[int, int]:
        return tuple(
            int((state / f).read_text().split()[0]) for f in ("ray/ray.pid", "mlflow/mlflow.pid")
        )

    t0 = time.monotonic()
    out = run("up")
    try:
        assert "started: mlflow ray" in out
        first = pids()
        token = (state / "ray/auth_token").read_text().strip()
        assert len(token) == 64 and (state / "ray/auth_token").stat().st_mode & 0o077 == 0
        assert _status(f"http://127.0.0.1:{dash}/api/version", token) == 200
        assert _status(f"http://127.0.0.1:{dash}/api/version") == 401  # token auth is on
        assert _status(f"http://127.0.0.1:{mlf}/health") == 200
        exports = run("env")
        assert f"export RAY_API_SERVER_ADDRESS=http://127.0.0.1:{dash}\n" in exports
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{mlf}\n" in exports
        assert f"export RAY_AUTH_TOKEN_PATH={state / 'ray/auth_token'}\n" in exports
        assert "export RAY_AUTH_MODE=token\n" in exports
        assert exports in out.replace("\n  export", "\nexport")

        # Dashboard and MLflow are reachable on loopback only.
        if shutil.which("ss"):
            listen = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
            locals_ = [line.split()[3] for line in listen.splitlines()]
            for port in (dash, mlf):
                bound = [a for a in locals_ if a.rsplit(":", 1)[1] == str(port)]
                assert bound and all(a.startswith("127.0.0.1:") for a in bound), bound
        ip = _non_loopback_ip()
        if ip:
            for port in (dash, mlf):
                with pytest.raises(OSError), socket.create_connection((ip, port), timeout=2):
                    pass

        tree = _tree(list(first))
        assert len(tree) > 5, tree  # gcs_server, raylet, dashboard, ... and uvicorn
        again = run("up")
        assert "already running (nothing started)" in again and pids() == first
    finally:
        down = run("down")
    assert "ray: stopped" in down and "mlflow: stopped" in down
    assert not (state / "ray/ray.pid").exists() and not (state / "mlflow/mlflow.pid").exists()
    left = _tree(list(first)) | (tree & _tree(list(tree)))
    assert not left, f"processes left after down: {left}"
    tmp_root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    cluster_file = Path(tmp_root) / "ray" / "ray_current_cluster"
    assert not cluster_file.exists() or not cluster_file.read_text().endswith(f":{gcs}")
    assert time.monotonic() - t0 < 120


def _platform_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for platform/local/{up,down} with its state in tmp and free ports."""
    gcs, dash, client, agent, mlf, autoscaler_metrics, dashboard_metrics = _free_ports(7)
    env = {
        **os.environ,
        "AUNET_PLATFORM_DIR": str(tmp_path / "state"),
        "AUNET_RAY_PORT": str(gcs),
        "AUNET_RAY_DASHBOARD_PORT": str(dash),
        "AUNET_RAY_CLIENT_PORT": str(client),
        "AUNET_RAY_AGENT_PORT": str(agent),
        "AUNET_MLFLOW_PORT": str(mlf),
        # Ray's defaults (44217, 44227) may be held by another Ray instance on the machine.
        "AUNET_RAY_AUTOSCALER_METRIC_PORT": str(autoscaler_metrics),
        "AUNET_RAY_DASHBOARD_METRIC_PORT": str(dashboard_metrics),
        "AUNET_RAY_NUM_CPUS": "1",
        **extra,
    }
    for var in ("AUNET_BIND_HOST", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN"):
        env.pop(var, None)
    return env


def _listening(pids: set[int]) -> list[tuple[str, str, int]]:
    """(netid, local address, pid) of every listening TCP and bound UDP socket of `pids`, as
    `ss` reports them (a socket shared by several processes is listed once per process)."""
    if not shutil.which("ss"):
        pytest.fail("`ss` not found: install iproute2 to check the platform's sockets")
    out = subprocess.run(
        ["ss", "-H", "-l", "-t", "-u", "-n", "-p"], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for line in out.splitlines():
        cols = line.split()
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                found.append((cols[0], cols[4], pid))
    return found


def _host_port(local: str) -> tuple[str, int]:
    """`127.0.0.1:80`, `[::ffff:127.0.0.1]:80`, `*:80`, `127.0.0.1%lo:80` -> (host, port)."""
    host, _, port = local.rpartition(":")
    return host.strip("[]").split("%")[0], int(port)


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # "*" (every address) or a name
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _started_by(state: Path) -> set[int]:
    """Live processes whose command line or environment names `state` (the platform's state
    dir): what `up` started, whether or not a pid file still records it."""
    needle = str(state).encode()
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if (
                needle in (proc / "cmdline").read_bytes()
                or needle in (proc / "environ").read_bytes()
            ):
                found.add(int(proc.name))
        except (OSError, IndexError):
            continue  # gone, or not ours to read
    return found


def _describe(pids: set[int]) -> str:
    """pid, parent, session and command line of each process: what a failure needs to say."""
    lines = []
    for pid in sorted(pids):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            lines.append(f"{pid}: gone")
            continue
        service = [e.decode() for e in env if e.startswith(b"AUNET_PLATFORM_SERVICE=")]
        lines.append(f"{pid}: ppid {stat[1]} sid {stat[3]} {service} {cmd[:160]}")
    return "\n".join(lines)


def _clean_up(env: dict[str, str], state: Path) -> set[int]:
    """After a platform test: `down` if anything `up` started is still alive, then SIGKILL for
    what is left (found by _started_by only) and Ray's current-cluster file if it names the
    killed head. Returns what was left after `down`."""
    if _started_by(state):
        subprocess.run([str(LOCAL / "down")], env=env, capture_output=True, timeout=150)
    left = _started_by(state)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    tmp_root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    cluster_file = Path(tmp_root) / "ray" / "ray_current_cluster"
    with contextlib.suppress(OSError):
        if left and cluster_file.read_text().endswith(f":{env['AUNET_RAY_PORT']}"):
            cluster_file.unlink()
    return left


@pytest.mark.e2e
@pytest.mark.slow
def test_local_up_listens_on_loopback_only(tmp_path: Path) -> None:
    """Every socket of the head's and MLflow's process trees, a job driver's and its actor's
    included, is bound to loopback (docs/platform.md, ray job submit, ports and token auth)."""
    env = _platform_env(tmp_path)
    state = tmp_path / "state"
    up = subprocess.run(
        [str(LOCAL / "up")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=150
    )
    driver = None
    try:
        assert up.returncode == 0, f"up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}"
        leaders = [int((state / f"{n}/{n}.pid").read_text().split()[0]) for n in ("ray", "mlflow")]
        exports = subprocess.run(
            [str(LOCAL / "env")], env=env, capture_output=True, text=True, check=True
        ).stdout
        driver_env = dict(env)
        for line in exports.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            driver_env[key] = value
        # A driver in a user's shell (the exports of `env`) joins the head and starts an actor,
        # so that worker and driver sockets exist while the sockets are listed.
        code = (
            "import sys, ray\n"
            "ray.init(logging_level='ERROR')\n"
            "@ray.remote\n"
            "class A:\n"
            "    def node(self):\n"
            "        return ray.util.get_node_ip_address()\n"
            "a = A.remote()\n"
            "print('actor on', ray.get(a.node.remote(), timeout=90), flush=True)\n"
            "sys.stdin.read()\n"
        )
        driver = subprocess.Popen(
            [sys.executable, "-c", code],
            env=driver_env,
            cwd=tmp_path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert driver.stdout is not None and driver.stderr is not None
        ready, _, _ = select.select([driver.stdout], [], [], 120)
        first = driver.stdout.readline() if ready else ""
        if not first.startswith("actor on "):
            driver.kill()
            pytest.fail(f"driver did not start an actor in 120 s: {first}{driver.stderr.read()}")

        pids = _tree(leaders) | {driver.pid}
        sockets = _listening(pids)
        names = {p: Path(f"/proc/{p}/comm").read_text().strip() for _, _, p in sockets}
        exposed = [
            (net, local, names[pid])
            for net, local, pid in sockets
            if not _is_loopback(_host_port(local)[0])
        ]
        assert not exposed, f"sockets not on loopback: {exposed}"
        assert first.split()[-1] == "127.0.0.1", first  # the node's IP, as Ray reports it
        ports = {_host_port(local)[1] for _, local, _ in sockets}
        settings = ("RAY_PORT", "RAY_DASHBOARD_PORT", "RAY_CLIENT_PORT", "RAY_AGENT_PORT")
        settings += ("MLFLOW_PORT", "RAY_AUTOSCALER_METRIC_PORT", "RAY_DASHBOARD_METRIC_PORT")
        expected = {int(env[f"AUNET_{name}"]) for name in settings}
        assert expected <= ports, f"not listening: {sorted(expected - ports)}"
        # More than the fixed ports: raylet, object manager, agents, worker and driver servers.
        assert len(ports) >= len(expected) + 5, sorted(ports)
        ip = _non_loopback_ip()
        if ip:
            for port in sorted(ports):
                with pytest.raises(OSError), socket.create_connection((ip, port), timeout=2):
                    pass
    finally:
        if driver is not None:
            driver.kill()
            driver.wait(timeout=30)
        down = subprocess.run(
            [str(LOCAL / "down")], env=env, capture_output=True, text=True, timeout=150
        )
    left = _clean_up(env, state)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not left, f"left running after down: {left}"


@pytest.mark.e2e
@pytest.mark.parametrize(
    "when, setting",
    [
        ("before", "AUNET_RAY_DASHBOARD_PORT"),
        # `ray start` finds the dashboard port taken and exits, stopping its children.
        ("during", "AUNET_RAY_DASHBOARD_PORT"),
        # The client server dies and `ray start` exits, leaving orphans in its session (one of
        # which ignores SIGTERM until AUNET_STOP_TIMEOUT).
        pytest.param("during", "AUNET_RAY_CLIENT_PORT", marks=pytest.mark.slow),
    ],
)
def test_local_up_on_busy_port_stops_what_it_started(
    tmp_path: Path, when: str, setting: str
) -> None:
    """A port held by another process (from the start, or taken after `up` checked it and
    before Ray bound it) fails `up` in one line naming that port, and nothing `up` started
    stays alive."""
    env = _platform_env(tmp_path, AUNET_START_TIMEOUT="90", AUNET_STOP_TIMEOUT="10")
    state = tmp_path / "state"
    port = int(env[setting])
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        if when == "before":
            holder.bind(("127.0.0.1", port))
            holder.listen()
        proc = subprocess.Popen(
            [str(LOCAL / "up")],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if when == "during":
            # MLflow is started first; take the Ray port once it has been.
            deadline = time.monotonic() + 60
            while not (state / "mlflow/mlflow.pid").exists() and proc.poll() is None:
                assert time.monotonic() < deadline, "up did not start MLflow within 60 s"
                time.sleep(0.02)
            holder.bind(("127.0.0.1", port))
            holder.listen()
        try:
            out, err = proc.communicate(timeout=150)
        finally:
            proc.kill()
        left = _started_by(state)
        described = _describe(left)
    finally:
        holder.close()
        _clean_up(env, state)
    assert proc.returncode != 0, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"port {port}" in lines[0], lines[0]
    assert not left, f"left running after the failed up:\n{described}\n{out}"
    assert not (state / "ray/ray.pid").exists() and not (state / "mlflow/mlflow.pid").exists()
