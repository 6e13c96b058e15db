"""MLflow tracking: one run per run key, idempotent params, metric delivery through outages."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from pipelines import tracking
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


def test_log_model_tags_the_run_and_is_never_fatal(store, tmp_path, capsys):
    import torch

    from aunet.checkpoint import save_pretrained
    from aunet.config import AUNetConfig
    from aunet.model import AUNet

    t = _tracker(store, "/model/a")
    assert t.log_model(str(tmp_path / "missing")) is None
    assert "pyfunc model not logged" in capsys.readouterr().err
    torch.manual_seed(0)
    cfg = AUNetConfig(
        dimensions=[16, 32], layers=[1, 1], head_dims=[8, 8], sliding_windows=[8, 4], multiple_of=16
    )
    ckpt = save_pretrained(AUNet(cfg).eval(), tmp_path / "final")
    uri = t.log_model(str(ckpt))
    t.close()
    assert uri is not None and uri.startswith("models:/")
    assert MlflowClient(store[0]).get_run(t.run_id).data.tags[tracking.MODEL_URI_TAG] == uri
