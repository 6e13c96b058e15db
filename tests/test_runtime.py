"""Runtime placement: tracking URIs, reachability checks, storage, and the embedded local Ray."""

from __future__ import annotations

import http.server
import json
import os
import socket
import sys
import threading
import time

import pyarrow.fs
import pytest

from pipelines.paths import absolute_path, join_path, resolve_tracking_uri
from pipelines.runtime import (
    TrackingUnreachable,
    check_tracking_reachable,
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_tracking_fails_fast_on_closed_port():
    uri = f"http://127.0.0.1:{_free_port()}"
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
