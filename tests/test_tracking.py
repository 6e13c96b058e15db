"""MLflow tracking: one run per run key, idempotent params, metric delivery through outages."""

from __future__ import annotations

import socket
import time

import pytest
from mlflow.tracking import MlflowClient

from pipelines.runtime import TrackingUnreachable
from pipelines.tracking import RUN_KEY_TAG, Tracker, retry, ui_command


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


def test_permanent_outage_warns_and_close_still_returns(store, capsys):
    t = _tracker(store, "/outage/b")

    def broken(*args, **kwargs):
        raise ConnectionError("store gone")

    t.client.log_batch = broken
    t.log_metrics({"loss": 1.0}, 1)
    t0 = time.monotonic()
    assert not t.flush(timeout_s=0.5)
    assert t._pending  # kept for a later attempt, not silently dropped
    t.close(timeout_s=0.5)  # the run is still marked finished
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert "cannot log metrics" in err and "could not be logged" in err
    assert MlflowClient(store[0]).get_run(t.run_id).info.status == "FINISHED"


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
