"""Issue 18 item 6, end to end: real training (``pipelines.train.train``) against a real
``mlflow server`` on 127.0.0.1 that is killed mid-run, a worker SIGKILLed and restarted during
the outage, the store back only after the run ended: the same command again, and the MLflow run
ends FINISHED with each step once."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_tracking import MlflowServer
from test_train import _spec

from pipelines.train_worker import MLFLOW_MARKER, FaultInjection


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from pipelines.runtime import init_ray
    from pipelines.spec import ResourcesConfig
    from pipelines.tracking_run import CLOSE_TIMEOUT_ENV

    before = os.environ.get(CLOSE_TIMEOUT_ENV)
    os.environ[CLOSE_TIMEOUT_ENV] = "5"  # the store is down at the end: wait 5 s, not 60
    init_ray(ResourcesConfig(), num_cpus=2, include_dashboard=True)  # workers inherit it
    yield
    ray.shutdown()
    if before is None:
        os.environ.pop(CLOSE_TIMEOUT_ENV, None)
    else:
        os.environ[CLOSE_TIMEOUT_ENV] = before


def _steps(run: Path) -> list[dict]:
    path = run / "steps.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_outage_and_worker_kill_end_in_one_complete_run(ray_session, tmp_path, capsys):
    """The store dies after step 3 and stays down; the worker dies after step 10 and restarts
    from the step-8 checkpoint during the outage (its MLflow run named by the checkpoint); the
    run ends while the store is down. Once it is back, the same command completes the run."""
    from pipelines.train import train

    server = MlflowServer(tmp_path)
    server.start()
    spec = _spec(tmp_path, steps=16, checkpoint_every=4, eval_every=16)
    spec = spec.with_overrides(
        {
            "resources.num_workers": 1,
            "tracking.tracking_uri": server.uri,
            "tracking.log_model": False,
        }
    )
    run = tmp_path / "runs" / "t"
    killed_at: list[int] = []

    def kill_after_step_3() -> None:  # the store dies a few steps into training
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(_steps(run)) < 3:
            time.sleep(0.05)
        killed_at.append(len(_steps(run)))
        server.kill()

    killer = threading.Thread(target=kill_after_step_3, daemon=True)
    fault = FaultInjection(step=10, rank=0, marker=str(tmp_path / "killed"))
    try:
        killer.start()
        first = train(spec, run_name="t", fault=fault)
        killer.join(10)
        assert killed_at and killed_at[0] < 10 and first.steps == 16
        assert (tmp_path / "killed").read_text() == "10"
        assert [r["step"] for r in _steps(run)].count(9) == 2  # replayed after the restart
        err = capsys.readouterr().err  # (the warnings of the killed worker may never reach us)
        assert "stays RUNNING: run the same command again" in err
        assert (run / MLFLOW_MARKER).is_file()  # close() could not reach the store

        server.start()  # back, same port and database: the same command completes the run
        client = MlflowClient(server.uri)
        assert client.get_run(first.mlflow_run_id).info.status == "RUNNING"
        again = train(spec, run_name="t")
        assert again.mlflow_run_id == first.mlflow_run_id
        assert not (run / MLFLOW_MARKER).exists()
        chain = {r["step"]: r for r in _steps(run)}  # the last attempt of each step
        exp = client.get_experiment_by_name("t").experiment_id
        (only,) = client.search_runs([exp], "tags.`aunet.run_dir` LIKE '%/runs/t'")
        assert only.info.run_id == first.mlflow_run_id and only.info.status == "FINISHED"
        history = client.get_metric_history(only.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, 17))  # 16 values, 16 steps
        assert {m.step: m.value for m in history} == pytest.approx(
            {s: r["train/loss"] for s, r in chain.items()}, abs=1e-6
        )
        for key in ("train/lr", "train/bits_per_byte", "train/tokens/stage0"):
            assert len(client.get_metric_history(only.info.run_id, key)) == 16, key
    finally:
        server.kill()
