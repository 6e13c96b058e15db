"""Suite-wide isolation, and the grouping of tests under ``pytest -n``.

``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` into ``os.environ`` (so that
subprocesses inherit it), and our pipelines let that variable win over the spec. Without this
fixture one test's SQLite store leaks into every later test in the same process.
"""

from __future__ import annotations

import os
import sys

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``pytest -n N``) keep each module's tests on one worker, as with
    ``--dist loadfile``: module-scoped fixtures (a Ray session, a trained and resumed run, an S3
    server) are then built once, not once per worker. An explicit ``--dist`` is kept."""
    option = config.option
    explicit = any(a.startswith(("--dist", "-d")) for a in config.invocation_params.args)
    implied = getattr(option, "numprocesses", None) and getattr(option, "dist", "no") == "load"
    if implied and not explicit:
        option.dist = "loadfile"


@pytest.fixture(autouse=True)
def _isolate_mlflow_tracking_uri():
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(before)  # None also unsets the environment variable
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
