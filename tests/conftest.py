"""Suite-wide isolation.

``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` into ``os.environ`` (so that
subprocesses inherit it), and our pipelines let that variable win over the spec. Without this
fixture one test's SQLite store leaks into every later test in the same process.
"""

from __future__ import annotations

import os
import sys

import pytest


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
