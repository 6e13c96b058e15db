"""MLflow tracking: one run per run key, idempotent params, metric delivery through outages."""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.runtime import TrackingUnreachable
from pipelines.tracking import RUN_KEY_TAG, retry, ui_command
from pipelines.tracking_run import Tracker


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating one costs seconds); tests use their own keys."""
    tmp = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{tmp}/mlruns.db", (tmp / "artifacts").as_uri()


def _tracker(store, key: str, **kw) -> Tracker:
    uri, artifacts = store
    return Tracker(
        uri,
        "exp",
        run_key=key,
        run_name="a",
        artifact_location=artifacts,
        flush_every_s=0.05,
        backoff_s=0.01,
        **kw,
    )


def test_run_is_reopened_by_key_and_params_are_idempotent(store, tmp_path):
    t = _tracker(store, "/runs/a", tags={"git_commit": "abc"})
    assert not t.resumed
    t.log_params({"model.dimensions": [32, 64], "plan.lr": 0.003})
    for step in range(1, 4):
        t.log_metrics({"loss": 5.0 - step, "skipped": float("nan"), "none": None}, step)
    (tmp_path / "config.yaml").write_text("name: x\n")
    t.log_artifact(str(tmp_path / "config.yaml"))
    t.close()
    again = _tracker(store, "/runs/a")  # same key: the same run, status back to RUNNING
    assert again.resumed and again.run_id == t.run_id
    again.close()
    again = _tracker(store, "/runs/a#2", run_id=t.run_id)  # a checkpoint's run id wins over keys
    assert again.resumed and again.run_id == t.run_id
    again.log_params({"model.dimensions": [32, 64], "plan.steps": 10})  # old param: not re-sent
    again.log_metrics({"loss": 0.5}, 4)
    again.close()
    other = _tracker(store, key="/runs/b", parent_run_id=t.run_id, run_id="0" * 32)  # unknown id
    assert not other.resumed and other.run_id != t.run_id
    other.close()

    client = MlflowClient(store[0])
    exp = client.get_experiment_by_name("exp")
    assert exp.artifact_location == store[1]
    runs = client.search_runs([exp.experiment_id], "tags.`aunet.run_key` LIKE '/runs/%'")
    assert len(runs) == 2
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {
        "model.dimensions": "[32, 64]",
        "plan.lr": "0.003",
        "plan.steps": "10",
    }
    assert run.data.tags[RUN_KEY_TAG] == "/runs/a" and run.data.tags["git_commit"] == "abc"
    history = client.get_metric_history(t.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 0.5)]
    assert "skipped" not in run.data.metrics and "none" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(t.run_id)] == ["config.yaml"]
    child = client.get_run(other.run_id)
    assert child.data.tags["mlflow.parentRunId"] == t.run_id


def test_outage_mid_run_delays_metrics_but_never_raises(store, capsys):
    t = _tracker(store, "/outage/a")
    real = t.client.log_batch
    down = {"calls": 0, "until": time.monotonic() + 0.5}

    def flaky(*args, **kwargs):
        down["calls"] += 1
        if time.monotonic() < down["until"]:
            raise ConnectionError("store down")
        return real(*args, **kwargs)

    t.client.log_batch = flaky  # fault injection on the real client: the store is "down" 0.5 s
    for step in range(1, 21):
        t.log_metrics({"loss": float(step)}, step)  # never blocks, never raises
    t.close()
    assert down["calls"] > 1
    err = capsys.readouterr().err
    assert "cannot log metrics" in err and "training goes on" in err
    values = MlflowClient(store[0]).get_metric_history(t.run_id, "loss")
    assert sorted(m.step for m in values) == list(range(1, 21))  # nothing lost, nothing doubled


def test_permanent_outage_leaves_a_marker_and_the_next_open_completes_the_run(
    store, tmp_path, capsys
):
    """close() cannot send: the run stays RUNNING (not a FINISHED run with holes), the values
    steps.jsonl does not hold go to the marker, and reopening the run sends them and finishes."""
    marker = tmp_path / "mlflow_unsent.json"
    t = _tracker(store, "/outage/b", marker=marker)

    def broken(*args, **kwargs):
        raise ConnectionError("store gone")

    t.client.log_batch = broken
    t.log_metrics({"loss": 1.0}, 1)
    t.log_metrics({"time/checkpoint_s": 0.25}, 1)
    t0 = time.monotonic()
    assert not t.flush(timeout_s=0.5)
    assert len(t._pending) == 2  # kept for a later attempt, not silently dropped
    assert t.close(timeout_s=0.5) is False
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert "cannot log metrics" in err and "could not be logged" in err
    assert "stays RUNNING: run the same command again" in err
    client = MlflowClient(store[0])
    assert client.get_run(t.run_id).info.status == "RUNNING"
    saved = json.loads(marker.read_text())
    assert saved["run_id"] == t.run_id
    assert [(k, v, step) for k, v, _, step in saved["metrics"]] == [
        ("loss", 1.0, 1),
        ("time/checkpoint_s", 0.25, 1),
    ]
    again = _tracker(store, "/outage/b", marker=marker)  # the same command, store back
    assert again.run_id == t.run_id and again.close() is True
    assert not marker.exists()
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"loss": 1.0, "time/checkpoint_s": 0.25}


def test_steps_replayed_after_a_restart_are_logged_once(store):
    """A worker group restarted from an older checkpoint logs steps 3..5 again: the run's
    history keeps each (key, step) once (the reopened Tracker reads the highest logged step)."""
    t = _tracker(store, "/replay/a")
    for step in range(1, 6):
        t.log_metrics({"loss": 10.0 - step, "lr": 0.1}, step)
    t.log_metrics({"time/checkpoint_s": 0.5}, 3)
    t.flush()  # the first attempt dies here, without close()
    again = _tracker(store, "/replay/a")
    assert again.resumed and again.run_id == t.run_id
    for step in range(3, 9):  # resumed after the step-2 checkpoint: 3..5 are replayed
        again.log_metrics({"loss": 10.0 - step + 0.001, "lr": 0.1}, step)
        if step in (3, 6):
            again.log_metrics({"time/checkpoint_s": 0.7}, step)
    assert again.close()
    client = MlflowClient(store[0])
    loss = sorted((m.step, m.value) for m in client.get_metric_history(t.run_id, "loss"))
    assert loss == [(s, 10.0 - s) for s in range(1, 6)] + [(s, 10.0 - s + 0.001) for s in (6, 7, 8)]
    assert sorted(m.step for m in client.get_metric_history(t.run_id, "lr")) == list(range(1, 9))
    ck = sorted((m.step, m.value) for m in client.get_metric_history(t.run_id, "time/checkpoint_s"))
    assert ck == [(3, 0.5), (6, 0.7)]


def test_memory_bound_rereads_older_steps_from_the_step_log(store, tmp_path):
    """Past ``max_pending`` the values of older steps are let go and re-read from steps.jsonl
    when the store answers again (a torn last line, from a killed writer, is skipped)."""
    from pipelines.tracking_run import StepReplay

    log = tmp_path / "steps.jsonl"
    replay = StepReplay(log, lambda step, record: step % 2 == 0)  # train.log_every = 2
    t = _tracker(store, "/bounded/a", replay=replay, max_pending=12)
    down = {"on": True}
    real = t.client.log_batch

    def flaky(*args, **kwargs):
        if down["on"]:
            raise ConnectionError("store down")
        return real(*args, **kwargs)

    t.client.log_batch = flaky
    sizes = []
    with open(log, "a") as f:
        for step in range(1, 41):
            metrics = {"loss": 100.0 - step, "lr": 0.5, "epoch": 0}
            if step % 2 == 0:
                t.log_metrics(metrics, step, replayable=True)
                if step == 20:
                    t.log_metrics({"time/checkpoint_s": 1.5}, step)  # not in steps.jsonl
            record = {"step": step, "attempt": "a", "time": 1e9 + step, "ids": [1, 2], **metrics}
            if step == 10:  # an attempt that died after step 10: its steps 9-10 are replayed
                f.write(json.dumps({**record, "loss": -1.0, "attempt": "x"}) + "\n")
            f.write(json.dumps(record) + "\n")
            f.flush()
            sizes.append(len(t._pending))
        f.write('{"step": 41, "loss": 1')  # torn
    assert max(sizes) <= 12 + 3  # bounded: at most the cap plus one step's values
    down["on"] = False
    assert t.close()
    client = MlflowClient(store[0])
    loss = sorted((m.step, m.value) for m in client.get_metric_history(t.run_id, "loss"))
    assert loss == [(s, 100.0 - s) for s in range(2, 41, 2)]  # each logged step once, latest
    assert len(client.get_metric_history(t.run_id, "epoch")) == 20
    assert [m.step for m in client.get_metric_history(t.run_id, "time/checkpoint_s")] == [20]
    assert client.get_run(t.run_id).info.status == "FINISHED"


def test_unreachable_server_fails_fast_naming_the_uri():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(TrackingUnreachable, match=f"127.0.0.1:{port}"):
        Tracker(uri, "exp", run_key="k", run_name="n")
    assert time.monotonic() - t0 < 10


def test_retry_backs_off_then_raises():
    calls = []

    def fails_twice():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise OSError("transient")
        return "ok"

    assert retry(fails_twice, "op", attempts=3, backoff_s=0.01) == "ok"
    assert calls[2] - calls[1] >= calls[1] - calls[0] >= 0.01  # exponential backoff
    with pytest.raises(OSError):
        retry(lambda: (_ for _ in ()).throw(OSError("down")), "op", attempts=2, backoff_s=0.01)


def test_ui_command():
    assert (
        ui_command("sqlite:////abs/mlruns.db")
        == "mlflow ui --backend-store-uri sqlite:////abs/mlruns.db"
    )
    assert "http://host:5000" in ui_command("http://host:5000")


# ---------------------------------------------------------------------------------- driver calls
def test_concurrent_get_or_create_makes_one_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    tracking.get_or_create_experiment(uri, "warm-up")  # the schema is created once, first
    for round_ in range(3):
        name, ids, errors = f"race-{round_}", [], []
        barrier = threading.Barrier(2)

        def create(name=name, ids=ids, errors=errors, barrier=barrier):
            barrier.wait()
            try:
                ids.append(tracking.get_or_create_experiment(uri, name))
            except Exception as exc:  # collected: an exception in a thread would be lost
                errors.append(exc)

        threads = [threading.Thread(target=create) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(ids) == 2 and ids[0] == ids[1]
        exps = MlflowClient(uri).search_experiments(filter_string=f"name = '{name}'")
        assert [e.experiment_id for e in exps] == ids[:1]
        assert exps[0].artifact_location == (tmp_path / "mlartifacts").as_uri()
        # Opens in MLflow 3's model-training view, not the GenAI one.
        assert exps[0].tags["mlflow.experimentKind"] == "custom_model_development"


def test_params_are_cut_to_the_store_limit_and_all_sent_past_100(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    exp = tracking.get_or_create_experiment(uri, "p")
    run_id = tracking.create_run(uri, exp, "r", {"k": 1})
    params = {f"p{i:03d}": i for i in range(250)}
    params["long"] = "x" * 7000
    tracking.log_params(uri, run_id, params)
    tracking.log_params(uri, run_id, {"p000": "changed", "extra": [1, 2]})  # p000 is kept
    got = MlflowClient(uri).get_run(run_id).data
    assert len(got.params) == 252
    assert got.params["long"] == "x" * 6000
    assert got.params["p249"] == "249" and got.params["p000"] == "0"
    assert got.params["extra"] == "[1, 2]"
    assert got.tags["k"] == "1" and got.tags["mlflow.runName"] == "r"


def test_parent_run_is_reused_from_its_id_file(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    id_file = tmp_path / tracking.PARENT_RUN_FILE
    assert tracking.parent_run_id(id_file) is None
    kw = dict(run_name="sweep-s", tags={"aunet.sweep": "s"}, params={"base.a": 1})
    first = tracking.parent_run(id_file, uri, "sweeps", **kw)
    assert json.loads(id_file.read_text()) == {"run_id": first, "tracking_uri": uri}
    tracking.end_run(uri, first, "KILLED")  # an interrupted sweep
    again = tracking.parent_run(id_file, uri, "sweeps", **{**kw, "params": {"base.a": 2}})
    assert again == first == tracking.parent_run_id(id_file)
    client = MlflowClient(uri)
    run = client.get_run(first)
    assert run.info.status == "RUNNING" and run.data.params == {"base.a": "1"}
    assert run.data.tags["aunet.sweep"] == "s" and run.info.run_name == "sweep-s"
    exp = client.get_experiment_by_name("sweeps").experiment_id
    assert len(client.search_runs([exp])) == 1


def test_tags_summary_and_reading_back(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    exp = tracking.get_or_create_experiment(uri, "e")
    parent = tracking.create_run(uri, exp, "parent", {})
    child = tracking.create_run(uri, exp, "child", {"mlflow.parentRunId": parent})
    tracking.log_params(uri, child, {"plan.steps": 10})
    tracking.tag_run(uri, child, {"aunet.sweep": "s"}, {"plan.steps": 99, "sweep.x": "a"})
    c = MlflowClient(uri).get_run(child).data
    assert c.params == {"plan.steps": "10", "sweep.x": "a"} and c.tags["aunet.sweep"] == "s"
    assert [r.info.run_id for r in tracking.child_runs(uri, parent)] == [child]
    keys = ["/runs/it's", "C:\\runs\\a", "/runs/a_b", '/runs/"it\'s"', "/runs/'it\"s'"]
    runs = {k: tracking.create_run(uri, exp, "keyed", {RUN_KEY_TAG: k}) for k in keys}
    # verbatim keys; the last two hold both quotes: LIKE finds both, the tag check picks one
    assert {k: tracking.find_run_by_key(uri, k) for k in keys} == runs
    assert tracking.find_run_by_key(uri, "/runs/other") is None
    tracking.log_metrics(uri, child, {"loss": 2.5, "nan": float("nan"), "none": None}, step=3)
    assert tracking.metric_history(uri, child, "loss") == [(3, 2.5)]

    (tmp_path / "results.csv").write_text("a,b\n1,2\n")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "page.html").write_text("<p>")
    tracking.log_summary(uri, parent, files=[tmp_path / "results.csv"], metrics={"n": 2})
    tracking.log_summary(uri, child, files=[tmp_path / "report"], artifact_path="r", status=None)
    run = MlflowClient(uri).get_run(parent)
    assert run.info.status == "FINISHED" and run.data.metrics == {"n": 2.0}
    assert MlflowClient(uri).get_run(child).info.status == "RUNNING"
    assert [a.path for a in MlflowClient(uri).list_artifacts(child, "r")] == ["r/page.html"]
    got = tracking.download_run_artifact(uri, parent, "results.csv", tmp_path / "dl")
    assert got is not None and got.read_text() == "a,b\n1,2\n"
    assert tracking.download_run_artifact(uri, child, "results.csv", tmp_path / "dl") is None


def test_search_runs_pages_and_skips_unknown_experiments(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    exp = tracking.get_or_create_experiment(uri, "many")
    for i in range(5):
        tracking.create_run(uri, exp, f"r{i}", {"i": i})
    assert tracking.search_runs(uri, experiment_names=["nope"]) == []
    assert len(tracking.search_runs(uri, experiment_names=["many", "nope"])) == 5
    assert len(tracking.search_runs(uri, "tags.i = '3'", experiment_ids=[exp])) == 1
    assert len(tracking.search_runs(uri, experiment_ids=[exp], max_results=2)) == 2
    assert tracking.find_experiment(uri, "many") == exp
    assert tracking.find_experiment(uri, "nope") is None


def test_log_model_tags_the_run_and_is_never_fatal(store, tmp_path, capsys, monkeypatch):
    import torch

    from aunet.checkpoint import save_pretrained
    from aunet.config import AUNetConfig
    from aunet.model import AUNet

    t = _tracker(store, "/model/a")
    assert t.log_model(str(tmp_path / "missing"), "r") is None
    assert "pyfunc model not logged" in capsys.readouterr().err
    torch.manual_seed(0)
    cfg = AUNetConfig(
        dimensions=[16, 32], layers=[1, 1], head_dims=[8, 8], sliding_windows=[8, 4], multiple_of=16
    )
    ckpt = save_pretrained(AUNet(cfg).eval(), tmp_path / "final")
    for step, bpb in ((5, 3.0), (10, 2.5)):
        t.log_metrics({"val/bits_per_byte": bpb, "train/loss": bpb + 1}, step, replayable=True)
    t.flush()
    uri = t.log_model(str(ckpt), "quick.sweep-train.lr=0.003", link=["val/bits_per_byte", "x"])
    assert uri is not None and uri.startswith("models:/m-")
    client = MlflowClient(store[0])
    assert client.get_run(t.run_id).data.tags[tracking.MODEL_URI_TAG] == uri
    # Named after the run (MLflow's forbidden characters replaced); the final validation linked
    # to it, and the run's own history unchanged (the linked copy is the same point, kept once).
    model = client.get_logged_model(uri.removeprefix("models:/"))
    assert model.name == "quick-sweep-train-lr=0-003" and model.source_run_id == t.run_id
    assert [(m.key, m.value, m.step, m.run_id) for m in model.metrics] == [
        ("val/bits_per_byte", 2.5, 10, t.run_id)
    ]
    history = client.get_metric_history(t.run_id, "val/bits_per_byte")
    assert sorted((m.step, m.value) for m in history) == [(5, 3.0), (10, 2.5)]
    # tracking.register_model: a registry version, served as models:/<name>/<version>
    assert t.log_model(str(ckpt), "r", "aunet-registered") == "models:/aunet-registered/1"
    t.close()
    from aunet.api import AUModel
    from pipelines.serve import download_mlflow

    got = download_mlflow("models:/aunet-registered/1", tmp_path / "dl", store[0])
    assert (got / "MLmodel").is_file()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[0])
    served = AUModel.from_pretrained("models:/aunet-registered/1").model
    ref = AUModel.from_pretrained(ckpt).model
    assert all(
        torch.equal(a, b) for a, b in zip(served.state_dict().values(), ref.state_dict().values())
    )


# ---------------------------------------------------------------------------------- a real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1, in its own process group: ``kill`` ends it and its
    uvicorn workers (by that group's id, nothing else), ``start`` again reuses port and store."""

    def __init__(self, root, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 150.0) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", "1"]
        cmd += ["--backend-store-uri", f"sqlite:///{self.root}/server.db"]
        cmd += ["--default-artifact-root", (self.root / "server-artifacts").as_uri()]
        with open(self.root / "server.log", "ab") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.kill()
        raise AssertionError(f"mlflow server on {self.uri} did not start in {timeout_s} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None


class BasicAuthProxy:
    """A loopback reverse proxy that requires HTTP Basic auth, in front of a plain server (the
    way a real deployment puts nginx in front of MLflow; MLflow's own basic-auth app needs
    Flask-WTF, which the platform does not install)."""

    def __init__(self, upstream_port: int, user: str, password: str) -> None:
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def forward(self) -> None:
                seen.append((self.command, self.path, self.headers.get("Authorization")))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                skip = ("host", "authorization", "connection", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("server"))
    server.start()
    yield server
    server.kill()


@pytest.mark.slow  # a fresh mlflow server migrates its database: up to a minute on a busy box
def test_credentials_in_the_uri_go_as_basic_auth_and_are_never_printed(
    mlflow_server, monkeypatch, capsys
):
    """``http://user:pass@host``: the probe and MLflow's client authenticate with HTTP Basic
    (the password never in a URL), and no printed line holds the password (issue 18 item 4)."""
    from pipelines.runtime import check_tracking_reachable
    from pipelines.train import TrainResult, summary

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "x")  # restored (unset) after the test: Tracker sets them
        monkeypatch.delenv(var)
    proxy = BasicAuthProxy(mlflow_server.port, "alice", "s3cr3t pw")
    try:
        host = f"127.0.0.1:{proxy.port}"
        for bad in (f"http://{host}", f"http://alice:wrong@{host}"):
            with pytest.raises(TrackingUnreachable) as err:
                check_tracking_reachable(bad)
            assert str(err.value) == (
                f"MLflow tracking server {'http://***@' if '@' in bad else 'http://'}{host}: "
                "GET /health answered HTTP 401 (credentials missing or wrong)"
            )
        good = f"http://alice:s3cr3t%20pw@{host}"  # percent-encoded, as in any URL
        check_tracking_reachable(good)
        t = Tracker(
            good, "creds", run_key="/creds/a", run_name="a", flush_every_s=0.05, backoff_s=0.01
        )
        t.log_params({"tracking.tracking_uri": "x"})
        t.log_metrics({"loss": 1.5}, 1)
        assert t.close()
        assert tracking.metric_history(good, t.run_id, "loss") == [(1, 1.5)]
        assert all(auth == proxy.seen[-1][2] for _, _, auth in proxy.seen[2:])  # all with auth
        assert all("s3cr3t" not in path for _, path, _ in proxy.seen)
        result = TrainResult("a", "/runs/a", "/runs/a/final", 8, 1.25, t.run_id, good, 3.0, None)
        text = summary(result, "creds")
        print(text)
        assert f"store http://***@{host}" in text and f"open http://***@{host}" in text
        proxy.close()  # the store goes away: the warnings name it, redacted
        t.log_metrics({"loss": 1.0}, 2)
        assert t.flush(timeout_s=0.1) is False
    finally:
        with contextlib.suppress(Exception):
            proxy.close()
    out = capsys.readouterr()
    assert "cannot log metrics to http://***@" in out.err
    assert "s3cr3t" not in out.out + out.err
