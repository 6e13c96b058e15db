"""MLflow logging for training: one run per training run, written by rank 0 only.

Why it looks like this:
- A training run keeps one MLflow run across restarts: a run resumed from a checkpoint reopens
  the run id stored in it; a worker group restarted before its first checkpoint finds its run
  again by key (the run directory plus the launch id of this ``fit``). A run directory deleted
  and trained again is a new launch, hence a new MLflow run.
- Metrics go through a background thread that batches them (``log_batch``) and retries with
  backoff. A tracking outage in the middle of a run delays metrics (they are kept, up to a cap, and
  sent when the store answers again) and prints a warning; it never stops training.
- Start-up is strict instead: an unreachable server fails in seconds, naming the URI
  (``pipelines.runtime.check_tracking_reachable``), before any compute is spent.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pipelines.runtime import artifact_location_for, check_tracking_reachable, redact

RUN_KEY_TAG = "aunet.run_key"
T = TypeVar("T")
_MAX_PENDING = 200_000  # metric values kept while the store is down; older ones are dropped


def _warn(msg: str) -> None:
    print(f"tracking: WARNING: {msg}", file=sys.stderr, flush=True)


def retry(fn: Callable[[], T], what: str, attempts: int = 4, backoff_s: float = 0.5) -> T:
    """Call ``fn`` up to ``attempts`` times with exponential backoff; re-raise the last error."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if i == attempts - 1:
                raise
            _warn(f"{what} failed ({type(e).__name__}: {e}); retry {i + 1} in {backoff_s:g} s")
            time.sleep(backoff_s)
            backoff_s *= 2
    raise AssertionError("unreachable")


def ui_command(uri: str) -> str:
    """The shell command that opens the MLflow UI on ``uri`` (local stores), else the URL."""
    if uri.startswith(("http://", "https://")):
        return f"open {redact(uri)} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


class Tracker:
    """The MLflow run of one training run (create or re-open), and a non-blocking metric queue."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        *,
        run_key: str,
        run_name: str,
        artifact_location: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
        flush_every_s: float = 2.0,
        attempts: int = 4,
        backoff_s: float = 0.5,
    ) -> None:
        # MLflow's own HTTP retries last minutes; ours (bounded) replace them.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.tracking import MlflowClient

        check_tracking_reachable(uri)
        self.uri, self.attempts, self.backoff_s = uri, attempts, backoff_s
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self._call(
            lambda: self._experiment(experiment, artifact_location), "experiment set-up"
        )
        self.run_id, self.resumed = self._call(
            lambda: self._open_run(run_key, run_name, parent_run_id, dict(tags or {}), run_id),
            "run set-up",
        )
        self._pending: list[Any] = []
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._failing = False
        self._flush_every_s = flush_every_s
        self._thread = threading.Thread(target=self._loop, name="mlflow-metrics", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ set-up
    def _call(self, fn: Callable[[], T], what: str) -> T:
        return retry(fn, f"MLflow {what} on {redact(self.uri)}", self.attempts, self.backoff_s)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(
                name, artifact_location=artifact_location_for(self.uri, artifact_location)
            )
        except Exception:  # created concurrently by another process
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _open_run(
        self, key: str, name: str, parent: str | None, tags: dict[str, str], run_id: str | None
    ) -> tuple[str, bool]:
        """(run id, reopened?): ``run_id`` if it exists, else the run tagged ``key``, else new."""
        from mlflow.exceptions import MlflowException
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        if run_id:
            try:
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
                return run_id, True
            except MlflowException as e:  # deleted, or another store: start a new run
                _warn(f"MLflow run {run_id} of the checkpoint not found ({e}); new run")
        escaped = key.replace("\\", "\\\\").replace("'", "\\'")
        found = self.client.search_runs(
            [self.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{escaped}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id, True
        tags = {**tags, RUN_KEY_TAG: key, MLFLOW_RUN_NAME: name}
        if parent:
            tags[MLFLOW_PARENT_RUN_ID] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id, False

    # ------------------------------------------------------------------ synchronous logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params not logged yet (MLflow refuses to change a param; a resumed run re-sends them)."""
        from mlflow.entities import Param

        have = self._call(lambda: self.client.get_run(self.run_id).data.params, "get run")
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):  # the store's limit per request
            chunk = new[i : i + 100]
            self._call(lambda c=chunk: self.client.log_batch(self.run_id, params=c), "log params")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self._call(lambda k=k, v=v: self.client.set_tag(self.run_id, k, str(v)), "set tag")

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """A file or a whole directory; a failure is a warning, not an error."""
        fn = self.client.log_artifacts if os.path.isdir(path) else self.client.log_artifact
        try:
            self._call(lambda: fn(self.run_id, path, artifact_path), f"log artifact {path}")
        except Exception as e:
            _warn(f"artifact {path} not logged ({type(e).__name__}: {e})")

    # ------------------------------------------------------------------ asynchronous metrics
    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        """Queue finite values; returns at once. Sent by the background thread in batches."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        with self._lock:
            self._pending.extend(batch)
            if len(self._pending) > _MAX_PENDING:
                drop = len(self._pending) - _MAX_PENDING
                del self._pending[:drop]
                _warn(f"tracking store unreachable for long: dropped {drop} oldest metric values")

    def _send(self) -> bool:
        with self._send_lock:
            with self._lock:
                batch, self._pending = self._pending, []
            sent = 0
            try:
                while sent < len(batch):  # the store takes at most 1000 values per request
                    chunk = batch[sent : sent + 1000]
                    self._call(
                        lambda c=chunk: self.client.log_batch(self.run_id, metrics=c), "metrics"
                    )
                    sent += len(chunk)
            except Exception as e:
                with self._lock:  # keep the rest for the next attempt, in order
                    self._pending = batch[sent:] + self._pending
                if not self._failing:
                    _warn(
                        f"cannot log metrics to {redact(self.uri)} ({type(e).__name__}: {e}); "
                        "training goes on, metrics are kept and retried"
                    )
                self._failing = True
                return False
            if self._failing:
                _warn(f"tracking store {redact(self.uri)} answers again; queued metrics sent")
            self._failing = False
            return True

    def _loop(self) -> None:
        while not self._stop:
            self._wake.wait(self._flush_every_s)
            self._wake.clear()
            if self._pending:
                self._send()

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Send everything queued now (blocking, bounded); True if nothing is left."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._send() and not self._pending:  # _send waits for an in-flight batch first
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(2.0, left))

    def close(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        """Flush, stop the thread and mark the run ``status`` (FINISHED / FAILED / KILLED)."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=timeout_s)
        if not self.flush(timeout_s):
            _warn(f"{len(self._pending)} metric values could not be logged to {redact(self.uri)}")
        try:
            self._call(lambda: self.client.set_terminated(self.run_id, status), "end run")
        except Exception as e:
            _warn(f"run {self.run_id} not marked {status} ({type(e).__name__}: {e})")
