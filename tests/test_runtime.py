"""Runtime placement: tracking URIs, reachability checks, storage, and the embedded local Ray."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.fs
import pytest
from netutil import free_port

from pipelines.paths import absolute_path, join_path, resolve_tracking_uri
from pipelines.runtime import (
    TrackingUnreachable,
    check_tracking_reachable,
    ensure_private_auth_token,
    init_ray,
    open_filesystem,
    ray_job_id,
)
from pipelines.spec import ResourcesConfig, TrackingConfig


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = str(tmp_path)
    cases = {
        "sqlite:///mlruns.db": f"sqlite:///{cwd}/mlruns.db",
        "sqlite:///sub/../runs/m.db": f"sqlite:///{cwd}/runs/m.db",
        "sqlite:////abs/m.db": "sqlite:////abs/m.db",
        "http://127.0.0.1:5000": "http://127.0.0.1:5000",
        "mlruns": f"file://{cwd}/mlruns",
        "databricks": "databricks",
    }
    for given, expected in cases.items():
        assert resolve_tracking_uri(TrackingConfig(tracking_uri=given).tracking_uri) == expected
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")  # env wins, made absolute too
    assert resolve_tracking_uri(TrackingConfig().tracking_uri) == f"sqlite:///{cwd}/env.db"


def test_paths_and_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_path("a/../b") == str(tmp_path / "b")
    assert absolute_path("s3://bucket/a/../b") == "s3://bucket/a/../b"  # URIs untouched
    assert join_path("gs://b/x/", "datasets", "d") == "gs://b/x/datasets/d"
    assert join_path("/r", "datasets", "d") == "/r/datasets/d"
    fs, path = open_filesystem("out")
    assert isinstance(fs, pyarrow.fs.LocalFileSystem) and path == str(tmp_path / "out")
    fs.create_dir(path)
    with fs.open_output_stream(f"{path}/x.bin") as f:
        f.write(b"abc")
    fs2, path2 = open_filesystem((tmp_path / "out").as_uri())
    with fs2.open_input_stream(f"{path2}/x.bin") as f:
        assert f.read() == b"abc"


def test_check_tracking_fails_fast_on_closed_port():
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingUnreachable) as info:
        check_tracking_reachable(uri, timeout_s=5)
    assert time.monotonic() - t0 < 10
    assert uri in str(info.value)


def test_check_tracking_times_out_on_silent_server():
    """A socket that accepts connections but never answers: bounded by the timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(TrackingUnreachable, match=uri.replace(".", r"\.")):
            check_tracking_reachable(uri, timeout_s=1)
        assert time.monotonic() - t0 < 4


class _Health(http.server.BaseHTTPRequestHandler):
    status = {"/health": 200}

    def do_GET(self):  # noqa: N802 (http.server's name)
        code = self.status.get(self.path, 404)
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_check_tracking_http_status():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        check_tracking_reachable(base)  # answers 200
        check_tracking_reachable(base + "/")
        with pytest.raises(TrackingUnreachable, match=r"/sub: GET /health answered HTTP 404"):
            check_tracking_reachable(base + "/sub")
        with pytest.raises(TrackingUnreachable, match=r"http://\*\*\*@127"):  # no password shown
            check_tracking_reachable(f"http://u:pw@127.0.0.1:{server.server_port}/sub")
    finally:
        server.shutdown()
        server.server_close()


def test_check_tracking_sqlite_creates_parent(tmp_path):
    db = tmp_path / "a" / "b" / "m.db"
    check_tracking_reachable(f"sqlite:///{db}")
    assert db.parent.is_dir() and not db.exists()
    check_tracking_reachable("sqlite:///:memory:")


def test_ray_job_id_from_submission_env(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_job_id() is None
    config = {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_abc"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(config))
    assert ray_job_id() == "raysubmit_abc"


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cwd = tmp_path_factory.mktemp("driver")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
            mp.delenv(var, raising=False)
        init_ray(
            ResourcesConfig(), num_cpus=2, include_dashboard=False, tracking_uri="sqlite:///t.db"
        )
        yield ray, cwd
    ray.shutdown()


def test_init_ray_embedded_local(local_ray):
    ray, cwd = local_ray
    assert ray.cluster_resources()["CPU"] == 2

    @ray.remote(num_cpus=1)
    def probe() -> str | None:
        return os.environ.get("MLFLOW_TRACKING_URI")

    # Train workers run in the session dir, so they must get the absolute (4-slash) URI.
    assert ray.get(probe.remote()) == f"sqlite:///{cwd}/t.db"
    session = ray.get_runtime_context().get_job_id()
    init_ray(ResourcesConfig(ray_address="10.255.255.1:6379"))  # already up: a no-op
    assert ray.get_runtime_context().get_job_id() == session
    assert ray_job_id() is None  # not a submitted job
    import ray.data

    ctx = ray.data.DataContext.get_current()
    assert ctx.enable_progress_bars is sys.stderr.isatty()
    assert ctx.execution_options.preserve_order is True


def test_embedded_workers_get_their_own_gcs_address(local_ray):
    """Ray internals in workers find the cluster by RAY_ADDRESS (issue 18, item 11)."""
    ray, _ = local_ray

    @ray.remote(num_cpus=1)
    def probe() -> tuple[str | None, str | None]:
        return os.environ.get("RAY_ADDRESS"), os.environ.get("RAY_GCS_SERVER_PORT")

    gcs = ray.get_runtime_context().gcs_address
    assert ray.get(probe.remote()) == (gcs, "")  # no worker may start a head on that port
    assert "RAY_GCS_SERVER_PORT" not in os.environ  # set for the start only


# ------------------------------------------------------------------ issue 18, items 5 and 11
_RAY_ENV = (
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_GCS_SERVER_PORT",
    "MLFLOW_TRACKING_URI",
    "RAY_JOB_CONFIG_JSON_ENV_VAR",
)
_REPO = str(Path(__file__).resolve().parents[1])


def _child_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RAY_ENV}
    return {**env, "HOME": str(home), "PYTHONPATH": _REPO}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_embedded_run_creates_private_auth_token(tmp_path):
    """A fresh HOME: the token an embedded Ray creates is 0600 (Ray alone writes it 0644)."""
    home = tmp_path / "home"
    home.mkdir()
    code = (
        "import ray\n"
        "from pipelines.runtime import init_ray\n"
        "from pipelines.spec import ResourcesConfig\n"
        "init_ray(ResourcesConfig(), num_cpus=1, include_dashboard=False)\n"
        "assert ray.cluster_resources()['CPU'] == 1\n"
        "ray.shutdown()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_child_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    token = home / ".ray" / "auth_token"
    assert _mode(token) == 0o600
    assert _mode(token.parent) == 0o700
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())  # Ray's format: token_hex(32)
    assert not list(token.parent.glob(".auth_token.*"))  # no staging file left behind


def test_auth_token_tightened_never_loosened(tmp_path, monkeypatch, capsys):
    for var in _RAY_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("a" * 64)
    token.chmod(0o644)  # what Ray 2.60 leaves behind
    assert ensure_private_auth_token() == token
    assert _mode(token) == 0o600 and token.read_text() == "a" * 64  # same token, now private
    assert f"{token} was readable by other users (mode 644); now 600" in capsys.readouterr().err
    token.chmod(0o400)
    ensure_private_auth_token()
    assert _mode(token) == 0o400  # stricter already: left alone
    token.unlink()
    for var, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))):
        with monkeypatch.context() as mp:
            mp.setenv(var, value)
            assert ensure_private_auth_token() is None  # Ray would not read ~/.ray/auth_token
        assert not token.exists()
    shared = tmp_path / "shared_token"
    shared.write_text("b" * 64)
    shared.chmod(0o644)
    token.symlink_to(shared)
    ensure_private_auth_token()
    assert _mode(shared) == 0o644  # a link the user made is theirs to manage


@contextlib.contextmanager
def _other_ray_head(home: Path):
    """Another Ray instance on this machine: a real ``ray start --head --block``, stopped by pid.

    Its temp dir is short (Ray's socket paths must fit in 107 bytes) and its own, so the test
    never touches ``/tmp/ray`` of other Ray instances on the machine.
    """
    with tempfile.TemporaryDirectory(prefix="ray-o-", ignore_cleanup_errors=True) as tmp:
        yield from _run_head(Path(tmp), home)


def _run_head(temp_dir: Path, home: Path):
    log = temp_dir / "start.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head"]
            + [f"--port={free_port()}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}"]
            + ["--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats", "--block"],
            env=_child_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its processes form a group led by this pid
        )
    try:
        deadline = time.monotonic() + 120
        while not (temp_dir / "ray_current_cluster").exists():  # written once the head is up
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)  # --block drains and stops the processes it started
        try:
            proc.wait(timeout=60)
        finally:
            for pid in _group_members(proc.pid):  # anything of ours that outlived it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) == pgid:
                    members.append(int(entry.name))
    return members


_TRAIN = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_train import _spec
from pipelines.train import train
result = train(_spec(Path({root!r}), steps=4, checkpoint_every=2, eval_every=2))
print("steps", result.steps)
"""


@pytest.mark.slow
def test_embedded_training_beside_another_ray_instance(tmp_path):
    """Train's PlacementGroupCleaner found two GCS processes and died (issue 18, item 11)."""
    home = tmp_path / "home"
    home.mkdir()
    with _other_ray_head(home):
        root = tmp_path / "run"
        root.mkdir()
        code = _TRAIN.format(tests=str(Path(__file__).parent), root=str(root))
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            env=_child_env(home),
            capture_output=True,
            text=True,
            timeout=600,
        )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "steps 4" in proc.stdout
    for failure in ("multiple active Ray instances", "Timed out while waiting for GCS"):
        assert failure not in output, output[-4000:]
    cleaner = [x for x in output.splitlines() if "PlacementGroupCleaner" in x and "Error" in x]
    assert not cleaner, output[-4000:]
