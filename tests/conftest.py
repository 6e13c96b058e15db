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
        # xdist would sort modules by their number of tests, which puts the few-but-long ones
        # (a study, a sweep, a job submit) last; keep the collection order (LONGEST_FIRST).
        option.loadscopereorder = False


# The longest modules (minutes each: Ray Train runs, sweeps, subprocess drivers, a 3-node cluster),
# longest first. Under ``pytest -n`` a worker takes the next module as it frees up, in collection
# order; xdist's default order (most tests first) left the longest ones, which have few tests, for
# the end, where one worker could run a 5-minute module while the other sat idle. Longest first
# is the classic greedy bound on the finishing time; unlisted modules follow in their usual order.
LONGEST_FIRST = (
    "test_train.py",
    "test_sweep.py",
    "test_scaling.py",
    "test_train_s3.py",
    "test_tracking_outage.py",
    "test_jobs_e2e.py",
    "test_runtime.py",
    "test_bpe_pipeline.py",
    "test_preprocess_cluster.py",
    "test_platform.py",
    "test_cli_errors.py",
    "test_tracking.py",
    "test_serve_app.py",
    "test_preprocess.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest modules first (``LONGEST_FIRST``); a stable sort keeps every module's own order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add contention (the suite shares 2 cores). A module
    takes it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
