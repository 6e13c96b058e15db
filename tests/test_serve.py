"""The MLflow pyfunc generation model and MLflow-URI loading, against direct generation."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from aunet.api import AUModel
from aunet.checkpoint import CheckpointError, save_pretrained
from aunet.config import AUNetConfig
from aunet.generate import generate
from aunet.model import AUNet
from pipelines.serve import log_generation_model

PROMPTS = ["The quick brown fox", "caf\u00e9 au lait, s'il vous pla", ""]


@pytest.fixture()
def tracking(tmp_path):
    """A fresh SQLite store with an absolute artifact root; the global URI is restored after."""
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    exp = mlflow.create_experiment("gen", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=exp)
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(old)


@pytest.fixture()
def checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = AUNetConfig(
        dimensions=[16, 32], layers=[1, 1], head_dims=[8, 8], sliding_windows=[8, 4], multiple_of=16
    )
    model = AUNet(cfg).eval()
    return model, save_pretrained(model, tmp_path / "ckpt")


def direct(model: AUNet, prompt: str, n: int) -> str:
    out = generate(model, prompt.encode(), n, temperature=0.0)
    return out.decode("utf-8", errors="replace")


def test_pyfunc_predict_equals_direct_generation(tracking, checkpoint) -> None:
    model, ckpt = checkpoint
    uri = log_generation_model(ckpt)
    assert uri.startswith("models:/")
    served = mlflow.pyfunc.load_model(uri)
    got = served.predict(
        pd.DataFrame({"prompt": PROMPTS}), params={"max_new_bytes": 12, "temperature": 0.0}
    )
    assert list(got) == [direct(model, p, 12) for p in PROMPTS]
    # per-row settings override the request-wide ones
    rows = pd.DataFrame({"prompt": PROMPTS[:2], "max_new_bytes": [3, 7], "temperature": [0.0, 0.0]})
    assert list(served.predict(rows)) == [
        direct(model, PROMPTS[0], 3),
        direct(model, PROMPTS[1], 7),
    ]
    # the same URI through the library API
    loaded = AUModel.from_pretrained(uri)
    assert loaded.generate(b"The quick", max_new_bytes=9, temperature=0) == generate(
        model, b"The quick", 9, temperature=0
    )


def test_runs_uri_and_errors(tracking, checkpoint) -> None:
    model, ckpt = checkpoint
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(ckpt), artifact_path="checkpoint")
        uri = log_generation_model(ckpt, run_id=run.info.run_id)
    assert mlflow.get_logged_model(uri.removeprefix("models:/")).source_run_id == run.info.run_id
    loaded = AUModel.from_pretrained(f"runs:/{run.info.run_id}/checkpoint")
    assert loaded.generate(b"ab", max_new_bytes=5, temperature=0) == generate(
        model, b"ab", 5, temperature=0
    )
    with pytest.raises(CheckpointError, match="runs:/.*cannot download"):
        AUModel.from_pretrained(f"runs:/{run.info.run_id}/nothing-here")
    with pytest.raises(CheckpointError, match="config.json: missing"):
        log_generation_model(tracking / "empty-dir")


def test_generate_cli(checkpoint, capsys) -> None:
    from pipelines.generate import main

    model, ckpt = checkpoint
    args = [str(ckpt), "--prompt", "The quick", "--max-new-bytes", "10", "--temperature", "0"]
    assert main(args) == 0
    assert capsys.readouterr().out == direct(model, "The quick", 10) + "\n"
    sampled = []
    for _ in "ab":
        assert main([*args, "--temperature", "1", "--top-p", "0.9", "--seed", "3"]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1]


def test_serve_cli_help_and_bad_source(tmp_path, capsys) -> None:
    """``--help`` lists the serving options; a bad source is one line and exit 2, before Ray."""
    import ray

    from pipelines.serve import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for option in (
        "--replicas",
        "--max-batch-size",
        "--quantize",
        "--port",
        "--log",
        "--step-budget-ms",
    ):
        assert option in text
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing (not an AU-Net checkpoint" in err
    assert err.count("\n") == 1 and not ray.is_initialized()
    assert main([str(tmp_path), "--replicas", "0"]) == 2
    assert "--replicas: expected >= 1" in capsys.readouterr().err
    assert main([str(tmp_path), "--step-budget-ms", "0"]) == 2
    assert "--step-budget-ms: expected > 0" in capsys.readouterr().err


def test_serve_configs_validate_with_ray_serve_schema() -> None:
    """experiments/serve/ and the RayService manifest are valid Serve configs whose builder
    args build the application (validated by Ray Serve's own schema, no cluster needed)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve_app import app_builder

    root = Path(__file__).resolve().parents[1]
    local = yaml.safe_load((root / "experiments/serve/quickstart.yaml").read_text())
    service = yaml.safe_load((root / "platform/k8s/rayservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert service["spec"]["rayClusterConfig"]["authOptions"]["mode"] == "token"
    assert local["http_options"]["host"] == "127.0.0.1"
    for config in (local, yaml.safe_load(service["spec"]["serveConfigV2"])):
        ServeDeploySchema.parse_obj(config)
        (app,) = config["applications"]
        assert app["import_path"] == "pipelines.serve_app:app_builder"
        built = app_builder(app["args"])
        assert type(built).__name__ == "Application"
    with pytest.raises(ValueError, match="'source'"):
        app_builder({"replicas": 1})
