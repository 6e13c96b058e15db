"""MLflow URIs as checkpoint sources, and the command that logs a checkpoint as a servable model.

``python -m pipelines.serve <checkpoint dir> [--run-id ID] [--name N] [--register NAME]
[--tracking-uri URI]`` logs the checkpoint as the pyfunc generation model
(``pipelines.tracking_model``, which documents it) and prints the ``mlflow models serve`` command.

``resolve_checkpoint`` is the ``aunet.checkpoint_sources`` plugin (pyproject.toml): with it
``AUModel.from_pretrained("runs:/...")`` works without ``aunet`` importing MLflow.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from aunet.checkpoint import CheckpointError
from pipelines import tracking
from pipelines.paths import DEFAULT_TRACKING_URI, TRACKING_ENV, absolute_tracking_uri
from pipelines.tracking_model import (  # noqa: F401  (re-exported: the served model's home)
    CHECKPOINT_ARTIFACT,
    AUNetGenerationModel,
    log_generation_model,
)

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def is_mlflow_uri(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and source.startswith(MLFLOW_SCHEMES)


def store_for(uri: str) -> str:
    """The tracking store an MLflow URI is read from: ``MLFLOW_TRACKING_URI``, else the
    platform's default ``./mlruns.db`` when that file exists.

    Else CheckpointError, creating nothing: MLflow's own default would create ``./mlflow.db`` in
    whatever directory the command runs in, and then report the run as missing (issue 18).
    """
    env = os.environ.get(TRACKING_ENV)
    if env:
        return absolute_tracking_uri(env)
    if Path(DEFAULT_TRACKING_URI.removeprefix("sqlite:///")).is_file():
        return absolute_tracking_uri(DEFAULT_TRACKING_URI)
    raise CheckpointError(
        f"{uri}: no MLflow tracking store: set MLFLOW_TRACKING_URI or --tracking-uri"
    )


def download_mlflow(
    uri: str, dst: str | os.PathLike | None = None, tracking_uri: str | None = None
) -> Path:
    """Local copy of an MLflow artifact or model URI; CheckpointError names the URI.

    ``tracking_uri`` None: the store ``store_for`` finds, never MLflow's implicit default.
    """
    tracking_uri = tracking_uri or store_for(uri)
    try:
        return tracking.download_artifacts(uri, dst, tracking_uri)
    except Exception as e:  # MlflowException, missing run or model, unreachable store
        raise CheckpointError(f"{uri}: cannot download ({type(e).__name__}: {e})") from None


def _pyfunc_checkpoint(mlmodel: Path) -> Path:
    """The checkpoint directory a pyfunc model (``log_generation_model``) holds as an artifact."""
    try:
        spec = yaml.safe_load(mlmodel.read_text())
        rel = spec["flavors"]["python_function"]["artifacts"][CHECKPOINT_ARTIFACT]["path"]
    except (yaml.YAMLError, KeyError, TypeError):
        raise CheckpointError(
            f"{mlmodel}: MLflow model without a '{CHECKPOINT_ARTIFACT}' artifact"
        ) from None
    return mlmodel.parent / rel


def resolve_checkpoint(source: str) -> Path | None:
    """``aunet.checkpoint_sources`` plugin: an MLflow URI or pyfunc model dir -> a local path.

    Registered in pyproject.toml so that ``AUModel.from_pretrained("runs:/...")`` works without
    ``aunet`` importing MLflow. Returns None for sources it does not handle.
    """
    if is_mlflow_uri(source):
        return download_mlflow(source)
    p = Path(source)
    if p.is_dir() and (p / "MLmodel").is_file():
        return _pyfunc_checkpoint(p / "MLmodel")
    return None


def main(argv: list[str] | None = None) -> str:
    """``python -m pipelines.serve <checkpoint dir> [--run-id ID] [--name N]``: print the URI."""
    ap = argparse.ArgumentParser(
        description="Log a trained AU-Net as an MLflow pyfunc model, so "
        "``mlflow models serve -m <uri>`` serves it."
    )
    ap.add_argument("checkpoint", help="consolidated checkpoint dir (config.json + safetensors)")
    ap.add_argument("--run-id", default=None, help="log into this run (default: a new run)")
    ap.add_argument("--name", default="aunet_generator")
    ap.add_argument("--register", default=None, help="also register under this model name")
    ap.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    args = ap.parse_args(argv)
    if args.tracking_uri:
        tracking.set_default_uri(absolute_tracking_uri(args.tracking_uri))
    uri = log_generation_model(args.checkpoint, args.run_id, args.name, args.register)
    print(uri)
    print(f"serve with: mlflow models serve -m {uri} --env-manager local", flush=True)
    return uri


if __name__ == "__main__":
    main()
