"""The serving command, and MLflow URIs as checkpoint sources.

``python -m pipelines.serve <checkpoint | runs:/ | models:/ URI> [--replicas N] [--max-batch-size B]
[--quantize int8] [--port P]`` serves the model over HTTP with Ray Serve on 127.0.0.1
(``pipelines.serve_host`` starts it, ``pipelines.serve_app`` is the application; docs/serving.md).
``python -m pipelines.serve <checkpoint dir> --log [--run-id ID] [--name N] [--register NAME]``
logs the checkpoint as the pyfunc generation model (``pipelines.tracking_model``) instead.

``resolve_checkpoint`` is the ``aunet.checkpoint_sources`` plugin (pyproject.toml): with it
``AUModel.from_pretrained("runs:/...")`` works without ``aunet`` importing MLflow.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from aunet.checkpoint import CheckpointError, read_config
from pipelines import tracking
from pipelines.paths import (
    DEFAULT_TRACKING_URI,
    TRACKING_ENV,
    absolute_tracking_uri,
    existing_default_store,
)
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
    default ``./mlflow.db`` (the spec's and MLflow's own) when that file exists, else an older
    ``./mlruns.db``.

    Else CheckpointError naming the store it looked for, creating nothing: MLflow's client would
    create an empty ``./mlflow.db`` in whatever directory the command runs in, and then report
    the run as missing (issue 18).
    """
    env = os.environ.get(TRACKING_ENV)
    if env:
        return absolute_tracking_uri(env)
    found = existing_default_store()
    if found is not None:
        return found
    where = Path(DEFAULT_TRACKING_URI.removeprefix("sqlite:///")).absolute()
    raise CheckpointError(
        f"{uri}: no MLflow tracking store: {where} (the default) does not exist; "
        "set MLFLOW_TRACKING_URI or --tracking-uri"
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.serve",
        description="Serve a trained AU-Net over HTTP with Ray Serve on 127.0.0.1 "
        "(POST /generate, docs/serving.md); with --log, log it as an MLflow pyfunc model instead.",
    )
    ap.add_argument("source", help="checkpoint dir, runs:/ or models:/ URI, or MLflow model dir")
    ap.add_argument("--replicas", type=int, default=1, help="Serve replicas (default 1)")
    ap.add_argument("--max-batch-size", type=int, default=16, help="requests per batch")
    ap.add_argument("--quantize", choices=["int8"], default=None, help="dynamic INT8 (CPU)")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1")
    ap.add_argument("--num-cpus", type=float, default=1, help="CPUs per replica")
    ap.add_argument("--max-queued-requests", type=int, default=None, help="503 beyond this")
    ap.add_argument(
        "--step-budget-ms",
        type=float,
        default=50,
        help="decode time per scheduler round before bytes go out (default 50)",
    )
    ap.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    ap.add_argument("--log", action="store_true", help="log as a pyfunc model, print its URI")
    ap.add_argument("--run-id", default=None, help="--log: into this run (default: a new run)")
    ap.add_argument("--name", default="aunet_generator", help="--log: artifact name")
    ap.add_argument("--register", default=None, help="--log: also register under this name")
    return ap


def main(argv: list[str] | None = None) -> int:
    """The CLI; a bad source or argument is one line on stderr and exit code 2."""
    from pipelines.cli import run_main

    return run_main(_main, argv, extra=(ValueError,))


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.tracking_uri:
        uri = absolute_tracking_uri(args.tracking_uri)
        os.environ[TRACKING_ENV] = uri  # read by resolve_checkpoint, here and in the replicas
        tracking.set_default_uri(uri)
    if args.log:
        uri = log_generation_model(args.source, args.run_id, args.name, args.register)
        print(uri)
        print(f"serve with: python -m pipelines.serve {uri}", flush=True)
        return 0
    for key in ("replicas", "max_batch_size", "port"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')}: expected >= 1, got {getattr(args, key)}")
    if not args.step_budget_ms > 0:
        raise ValueError(f"--step-budget-ms: expected > 0, got {args.step_budget_ms}")
    # Fail before Ray starts: the source must resolve to a readable checkpoint here.
    local = resolve_checkpoint(args.source) or Path(args.source)
    read_config(local)
    from pipelines.serve_host import run_server

    # Embedded, the replicas share this machine and read the local copy; on a cluster they
    # resolve the source themselves (MLFLOW_TRACKING_URI reaches them through runtime_env).
    run_server(args, str(local.resolve()) if not os.environ.get("RAY_ADDRESS") else args.source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
