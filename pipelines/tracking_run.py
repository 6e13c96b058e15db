"""The MLflow run of one training run, as rank 0 of the training loop sees it: ``Tracker``.

Why it looks like this (docs/architecture.md, MLflow):
- A training run keeps one MLflow run across restarts: a run resumed from a checkpoint reopens
  the run id stored in it; a worker group restarted before its first checkpoint finds its run
  again by key (the run directory plus the launch id, kept in the run directory). A run
  directory deleted and trained again is a new launch, hence a new MLflow run.
- Metrics go through a background thread that batches them (``log_batch``) and retries with
  backoff. A tracking outage in the middle of a run delays metrics and prints a warning; it never
  stops training and loses nothing: what memory cannot hold is re-read from ``steps.jsonl``
  (``StepReplay``), and what the end of the run could not send is completed by the same command
  run again. Each (metric, step) is logged once, also when a restarted worker replays steps.

Length: one class whose outage handling (the queue, the replay from ``steps.jsonl``, the end-of-run
marker) is state shared by all its methods; split, that state would be passed between modules.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pipelines.paths import is_uri, redact
from pipelines.runtime import check_tracking_reachable
from pipelines.storage import fetch_local
from pipelines.tracking import (
    METRICS_PER_REQUEST,
    MODEL_URI_TAG,
    RUN_KEY_TAG,
    client_for,
    experiment_id_for,
    metric_list,
    new_run,
    param_chunks,
    retry,
    run_by_key,
    safe_error,
    set_default_uri,
    warn,
)

T = TypeVar("T")
CLOSE_TIMEOUT_ENV = "AUNET_MLFLOW_CLOSE_TIMEOUT_S"
_MAX_PENDING = 200_000  # metric values kept in memory while the store is down (Tracker._shed)


class StepReplay:
    """The logged steps of a JSONL step log (rank 0's ``steps.jsonl``), to send again.

    A restarted worker appends the steps it replays, so a step may have several records: the last
    one wins (the chain of the latest attempt per step). Two passes keep memory bounded: the
    first keeps one file offset per step, the second reads the records back in step order.
    Metrics are a record's numeric fields other than ``step`` and ``time``; ``select(step,
    record)`` says whether the training loop logged that step (``train.log_every``).
    """

    def __init__(self, path: str | os.PathLike, select: Callable[[int, dict], bool]) -> None:
        self.path, self.select = Path(path), select

    def __call__(self, upto: int) -> Iterable[tuple[int, int, dict[str, float]]]:
        """(step, timestamp in ms, metrics) of every selected step <= ``upto``, in step order."""
        if not self.path.is_file():
            return
        offsets: dict[int, int] = {}
        with open(self.path, "rb") as f:
            while True:
                at, line = f.tell(), f.readline()
                if not line:
                    break
                step = _record_step(line)
                if step is not None and step <= upto:
                    offsets[step] = at
            for step in sorted(offsets):
                f.seek(offsets[step])
                record = json.loads(f.readline())
                if not self.select(step, record):
                    continue
                metrics = {
                    k: float(v)
                    for k, v in record.items()
                    if k not in ("step", "time") and isinstance(v, (int, float))
                    if not isinstance(v, bool)
                }
                yield step, int(float(record.get("time", time.time())) * 1000), metrics


def _record_step(line: bytes) -> int | None:
    """The step of one JSONL record; None for a torn last line (a process killed mid-write)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


class Tracker:
    """The MLflow run of one training run (create or re-open), and a non-blocking metric queue.

    Delivery rules (issue 18: no lost metrics, each step once):
    - Each (key, step) is logged once. The run's history is read once at open (the highest step
      logged per key, from the run's latest metrics) and after every failed request (a request
      whose answer was lost may have been stored); values at or below a key's highest logged step
      are not sent. Steps are logged in order, so that watermark is exact: a worker restarted
      from an older checkpoint replays steps the run has already, and they are skipped. This
      costs one ``get_run`` per open or outage, never a read of the whole history.
    - Nothing is dropped. Values wait in memory while the store is down; past ``max_pending``,
      the values of older steps that ``replay`` can read back (``steps.jsonl`` holds every
      metric of every step) are let go and re-read on recovery; values it cannot read back
      (checkpoint timings, the final metrics) always stay in memory.
    - At open, a reopened run is backfilled from ``replay`` up to ``resumed_step`` and from the
      ``marker`` file that ``close`` leaves when the store did not answer at the end; ``close``
      marks the run finished only when everything is stored, so a run whose metrics are
      incomplete stays RUNNING until the same command is run again.
    """

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
        replay: Callable[[int], Iterable[tuple[int, int, dict[str, float]]]] | None = None,
        resumed_step: int = 0,
        marker: str | os.PathLike | None = None,
        flush_every_s: float = 2.0,
        attempts: int = 4,
        backoff_s: float = 0.5,
        max_pending: int = _MAX_PENDING,
        system_metrics_s: float | None = None,
    ) -> None:
        # MLflow's own HTTP retries last minutes; ours (bounded) replace them.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.uri, self.attempts, self.backoff_s = uri, attempts, backoff_s
        self.client = client_for(uri)
        offline = False
        try:
            check_tracking_reachable(uri)
            self.experiment_id: str | None = self._call(
                lambda: experiment_id_for(self.client, uri, experiment, artifact_location),
                "experiment set-up",
            )
            self.run_id, self.resumed = self._call(
                lambda: self._open_run(run_key, run_name, parent_run_id, dict(tags or {}), run_id),
                "run set-up",
            )
        except Exception as e:
            if not run_id:  # a new run needs the store to exist at all
                raise
            # A worker restarted during an outage, of a run whose checkpoint names its MLflow
            # run: training goes on, and the run is reached (and backfilled) when the store is.
            warn(
                f"MLflow store {redact(uri)} unreachable at start ({type(e).__name__}: "
                f"{safe_error(e)}); training goes on, run {run_id} is reached when it answers"
            )
            self.experiment_id, self.run_id, self.resumed, offline = None, run_id, True, True
        self._replay, self._marker = replay, Path(marker) if marker else None
        self._max_pending = max_pending
        self._logged: dict[str, int] = {}  # key -> highest step stored
        if self.resumed and not offline:
            self._logged = self._call(self._stored_steps, "read run")
        # (metric, can be read back by replay); the values of steps <= _replay_upto were let go
        self._pending: list[tuple[Any, bool]] = self._unsent_from_marker()
        self._replay_upto = resumed_step if replay is not None and self.resumed else 0
        self._last_step = 0
        self._latest: dict[str, Any] = {}  # key -> the last Metric queued (log_model links it)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._failing = offline  # the first send then reads the stored steps first
        self._flush_every_s = flush_every_s
        self._thread = threading.Thread(target=self._loop, name="mlflow-metrics", daemon=True)
        self._thread.start()
        self._system = (
            None if offline or not system_metrics_s else self._system_monitor(system_metrics_s)
        )

    def _system_monitor(self, interval_s: float) -> Any:
        """MLflow's system-metrics monitor (psutil; nvidia-ml-py on GPU) on this run: system/*
        metrics every ``interval_s``. It sends on its own thread; a failure only warns."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id, interval_s, resume_logging=self.resumed, tracking_uri=self.uri
            )
            monitor.start()
            return monitor
        except Exception as e:
            warn(f"system metrics off ({type(e).__name__}: {safe_error(e)})")
            return None

    # ------------------------------------------------------------------ set-up
    def _call(self, fn: Callable[[], T], what: str) -> T:
        return retry(fn, f"MLflow {what} on {redact(self.uri)}", self.attempts, self.backoff_s)

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
                warn(f"MLflow run {run_id} of the checkpoint not found ({safe_error(e)}); new run")
        found = run_by_key(self.client, [self.experiment_id], key)
        if found is not None:
            run_id = found.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id, True
        tags = {**tags, RUN_KEY_TAG: key, MLFLOW_RUN_NAME: name}
        if parent:
            tags[MLFLOW_PARENT_RUN_ID] = parent
        return new_run(self.client, self.experiment_id, name, tags), False

    def _stored_steps(self) -> dict[str, int]:
        """Key -> the highest step the store holds (its latest metrics: one request)."""
        proto = self.client.get_run(self.run_id).to_proto()
        return {m.key: int(m.step) for m in proto.data.metrics}

    def _unsent_from_marker(self) -> list[tuple[Any, bool]]:
        """Values ``close`` could not send last time (this run's only: another run id is stale)."""
        from mlflow.entities import Metric

        if self._marker is None or not self._marker.is_file():
            return []
        try:
            saved = json.loads(self._marker.read_text())
        except ValueError:
            return []
        if saved.get("run_id") != self.run_id:
            return []
        return [(Metric(k, v, ts, step), False) for k, v, ts, step in saved.get("metrics", [])]

    # ------------------------------------------------------------------ synchronous logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params not logged yet (MLflow refuses to change a param; a resumed run re-sends them).

        A resumed run logged its params when it started: if the store is down now, that is a
        warning, not a reason to stop training."""
        try:
            have = self._call(lambda: self.client.get_run(self.run_id).data.params, "get run")
            for chunk in param_chunks(params, have):
                self._call(
                    lambda c=chunk: self.client.log_batch(self.run_id, params=c), "log params"
                )
        except Exception as e:
            if not self.resumed:
                raise
            warn(f"params of run {self.run_id} not re-sent ({type(e).__name__}: {safe_error(e)})")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self._call(lambda k=k, v=v: self.client.set_tag(self.run_id, k, str(v)), "set tag")

    def log_input(self, dataset: Any) -> None:
        """A run input (``tracking.dataset_input``); like an artifact, never fatal."""
        try:
            self._call(lambda: self.client.log_inputs(self.run_id, [dataset]), "log input")
        except Exception as e:
            warn(f"dataset input not logged ({type(e).__name__}: {safe_error(e)})")

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """A file or a whole directory, local or on a ``pyarrow.fs`` URI (copied through a
        temporary directory: MLflow's clients read local files); a failure is a warning."""
        try:
            if is_uri(path):
                with tempfile.TemporaryDirectory() as tmp:
                    self._log_local(fetch_local(path, tmp), artifact_path)
            else:
                self._log_local(path, artifact_path)
        except Exception as e:
            warn(f"artifact {path} not logged ({type(e).__name__}: {safe_error(e)})")

    def _log_local(self, path: str, artifact_path: str | None) -> None:
        fn = self.client.log_artifacts if os.path.isdir(path) else self.client.log_artifact
        self._call(lambda: fn(self.run_id, path, artifact_path), f"log artifact {path}")

    def log_model(
        self, final_dir: str, name: str, register: str | None = None, link: Sequence[str] = ()
    ) -> str | None:
        """The final checkpoint as the run's pyfunc model (tag ``aunet.model_uri``) named after
        the run (``name``), with the latest values of the metrics ``link`` names linked to it;
        registered as ``models:/<register>/<version>`` when asked; never fatal (a warning and
        None)."""
        try:
            from pipelines.tracking_model import log_generation_model, model_name_for

            set_default_uri(self.uri)
            with self._lock:
                linked = [self._latest[k] for k in link if k in self._latest]
            uri = log_generation_model(
                final_dir,
                run_id=self.run_id,
                name=model_name_for(name),
                registered_model_name=register,
                linked_metrics=linked,
            )
            self.set_tags({MODEL_URI_TAG: uri})
            return uri
        except Exception as e:
            warn(f"pyfunc model not logged ({type(e).__name__}: {safe_error(e)})")
            return None

    # ------------------------------------------------------------------ asynchronous metrics
    def log_metrics(
        self, metrics: Mapping[str, float | None], step: int, replayable: bool = False
    ) -> None:
        """Queue finite values; returns at once. Sent by the background thread in batches.

        ``replayable``: ``replay`` can read these values back once a later step is logged (the
        loop's step metrics, written to ``steps.jsonl`` right after this call).
        """
        batch = [m for m in metric_list(metrics, step) if step > self._logged.get(m.key, -1)]
        with self._lock:
            self._pending.extend((m, replayable) for m in batch)
            self._latest.update((m.key, m) for m in batch)
            if replayable:
                self._last_step = max(self._last_step, step)
            if len(self._pending) > self._max_pending:
                self._shed()

    def _shed(self) -> None:
        """Memory bound (holding ``_lock``): let go of values ``replay`` can read back (older
        steps than the last one logged, which may not be in the file yet), else the oldest."""
        if self._replay is not None:
            upto = self._last_step - 1
            keep = [(m, r) for m, r in self._pending if not (r and m.step <= upto)]
            if len(keep) < len(self._pending):
                self._pending, self._replay_upto = keep, max(self._replay_upto, upto)
                return
        drop = len(self._pending) - self._max_pending
        del self._pending[:drop]
        warn(f"tracking store unreachable for long: dropped {drop} oldest metric values")

    def _post(self, metrics: list[Any]) -> None:
        """Send ``metrics`` (in order, 1000 per request) that the store does not have yet."""
        todo = [m for m in metrics if m.step > self._logged.get(m.key, -1)]
        for i in range(0, len(todo), METRICS_PER_REQUEST):
            chunk = todo[i : i + METRICS_PER_REQUEST]
            self._call(lambda c=chunk: self.client.log_batch(self.run_id, metrics=c), "metrics")
            for m in chunk:
                self._logged[m.key] = max(self._logged.get(m.key, -1), m.step)

    def _send_replay(self) -> None:
        """Re-read and send the let-go steps (<= ``_replay_upto``) that the store lacks."""
        from mlflow.entities import Metric

        with self._lock:
            upto = self._replay_upto
        if upto <= 0 or self._replay is None:
            return
        batch: list[Any] = []
        for step, ts, metrics in self._replay(upto):
            batch += [Metric(k, v, ts, step) for k, v in metrics.items() if math.isfinite(v)]
            if len(batch) >= METRICS_PER_REQUEST:
                self._post(batch)
                batch = []
        self._post(batch)
        with self._lock:
            if self._replay_upto == upto:  # not raised meanwhile by another shed
                self._replay_upto = 0

    def _send(self) -> bool:
        with self._send_lock:
            try:
                if self._failing:  # a request whose answer was lost may have been stored
                    self._logged = self._call(self._stored_steps, "read run")
                self._send_replay()
            except Exception as e:
                return self._failed(e)
            with self._lock:
                batch, self._pending = self._pending, []
            sent = 0
            try:
                while sent < len(batch):
                    chunk = batch[sent : sent + METRICS_PER_REQUEST]
                    self._post([m for m, _ in chunk])
                    sent += len(chunk)
            except Exception as e:
                with self._lock:  # keep the rest for the next attempt, in order
                    self._pending = batch[sent:] + self._pending
                return self._failed(e)
            if self._failing:
                warn(f"tracking store {redact(self.uri)} answers again; queued metrics sent")
            self._failing = False
            return True

    def _failed(self, e: BaseException) -> bool:
        if not self._failing:
            warn(
                f"cannot log metrics to {redact(self.uri)} ({type(e).__name__}: {safe_error(e)}); "
                "training goes on, metrics are kept and retried"
            )
        self._failing = True
        return False

    def _loop(self) -> None:
        while not self._stop:
            self._wake.wait(self._flush_every_s)
            self._wake.clear()
            if self._pending or self._replay_upto:
                self._send()

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Send everything queued now (blocking, bounded); True if nothing is left."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._send() and not self._pending and not self._replay_upto:
                return True  # _send waits for an in-flight batch first
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(2.0, left))

    def close(self, status: str = "FINISHED", timeout_s: float | None = None) -> bool:
        """Flush, stop the thread and mark the run ``status`` (FINISHED / FAILED / KILLED).

        Waits up to ``timeout_s`` for an unreachable store (default: env
        ``AUNET_MLFLOW_CLOSE_TIMEOUT_S``, else 60 s): the end of a run is the last chance to send
        cheaply, but waiting longer only delays the run's exit; nothing is lost either way.

        True when the run is complete and marked. Otherwise the run is left RUNNING, the values
        ``replay`` cannot read back are kept in the ``marker`` file, and a warning says how to
        complete it: run the same command again once the store answers.
        """
        if timeout_s is None:
            timeout_s = float(os.environ.get(CLOSE_TIMEOUT_ENV) or 60.0)
        if self._system is not None:
            self._system.finish()  # its last samples, before the run is marked
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=timeout_s)
        done = self.flush(timeout_s)
        if done:
            try:
                self._call(lambda: self.client.set_terminated(self.run_id, status), "end run")
            except Exception as e:
                done = False
                warn(f"run {self.run_id} not marked {status} ({type(e).__name__}: {safe_error(e)})")
        if done:
            if self._marker is not None:
                self._marker.unlink(missing_ok=True)
            return True
        kept = [m for m, replayable in self._pending if not replayable]
        if self._marker is not None:
            rows = [[m.key, m.value, m.timestamp, m.step] for m in kept]
            self._marker.write_text(json.dumps({"run_id": self.run_id, "metrics": rows}))
        where = f"kept in {self._marker} and steps.jsonl" if self._marker else "lost"
        warn(
            f"{len(self._pending)} metric values could not be logged to {redact(self.uri)} "
            f"({where}); MLflow run {self.run_id} stays RUNNING: run the same command again "
            "when the store answers, to log them and finish the run"
        )
        return False
