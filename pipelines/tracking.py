"""The MLflow layer: every call the pipelines make to MLflow goes through this module (and
``pipelines.tracking_model``, the pyfunc model); ``tests/test_layout.py`` holds the rest to it.

Why it looks like this:
- A training run keeps one MLflow run across restarts: a run resumed from a checkpoint reopens
  the run id stored in it; a worker group restarted before its first checkpoint finds its run
  again by key (the run directory plus the launch id of this ``fit``). A run directory deleted
  and trained again is a new launch, hence a new MLflow run.
- Metrics go through a background thread that batches them (``log_batch``) and retries with
  backoff. A tracking outage in the middle of a run delays metrics and prints a warning; it never
  stops training and loses nothing: what memory cannot hold is re-read from ``steps.jsonl``, and
  what the end of the run could not send is completed by the same command run again. Each
  (metric, step) is logged once, also when a restarted worker replays steps (``Tracker``).
- Start-up is strict instead: an unreachable server fails in seconds, naming the URI
  (``pipelines.runtime.check_tracking_reachable``), before any compute is spent.
- Length: one module for runs, experiments, params, tags, metrics, artifacts and searches
  (about 730 lines: the training-loop ``Tracker`` with its delivery rules and ``StepReplay``,
  then the driver calls) so that what the platform asks of MLflow, and the store limits and
  outages it works around, are in one place.
- The functions below the ``Tracker`` serve the drivers (sweeps, studies, reports, evaluation),
  which log a few values once: they take the tracking URI and call the store synchronously.
  Experiments are created by whoever comes first (concurrent trials, a second sweep on the same
  store): a creation that loses the race reads the winner's experiment back.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pipelines.paths import redact
from pipelines.runtime import (
    artifact_location_for,
    check_tracking_reachable,
    ray_job_id,
    split_credentials,
)

RUN_KEY_TAG = "aunet.run_key"
MODEL_URI_TAG = "aunet.model_uri"
PARENT_RUN_FILE = "parent_run.json"  # in a sweep directory: the parent run's id, for resumes
MAX_PARAM_CHARS = 6000  # the store refuses longer param values
PARAMS_PER_REQUEST = 100  # the store's limit per log_batch
METRICS_PER_REQUEST = 1000
DEFAULT_CLI_URI = "sqlite:///mlruns.db"
T = TypeVar("T")
_MAX_PENDING = 200_000  # metric values kept in memory while the store is down (Tracker._shed)


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


def cli_uri(explicit: str | None) -> str:
    """The store of a command that reads runs without a spec (``--summary``, ``report``): the
    flag, else ``MLFLOW_TRACKING_URI``, else ``./mlruns.db`` (where a spec's default points)."""
    from pipelines.paths import absolute_tracking_uri

    return absolute_tracking_uri(
        explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_CLI_URI
    )


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=authenticated(uri))


def authenticated(uri: str) -> str:
    """``uri`` without its credentials, which go to MLflow the way its client reads them.

    MLflow's REST client sends ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` as HTTP
    Basic auth (``mlflow.utils.credentials.get_default_host_creds``, read on every request), so
    ``http://user:pass@host`` sets them for this process and MLflow sees ``http://host``: the
    URL its errors print, and the artifact URIs it derives, hold no password.
    """
    clean, user, password = split_credentials(uri)
    if user:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        if password is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return clean


def _experiment_id(client: Any, uri: str, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=artifact_location_for(uri, artifact_location)
        )
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _run_by_key(client: Any, experiment_ids: list[str], key: str) -> Any | None:
    """The run tagged ``aunet.run_key`` = ``key``, or None.

    MLflow's filter parser takes a string literal verbatim (a backslash escapes nothing), so the
    key is quoted with a quote it does not contain; a key with both kinds is matched by LIKE with
    ``_`` in their places, and the candidates are checked here.
    """
    quote = '"' if "'" in key else "'"
    if quote not in key:
        cond, limit = f"tags.`{RUN_KEY_TAG}` = {quote}{key}{quote}", 1
    else:
        pattern = key.replace("'", "_").replace('"', "_")
        cond, limit = f"tags.`{RUN_KEY_TAG}` LIKE '{pattern}'", 1000
    runs = client.search_runs(experiment_ids, cond, max_results=limit)
    return next((r for r in runs if r.data.tags.get(RUN_KEY_TAG) == key), None)


def _new_run(client: Any, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str:
    """Every run the platform creates names the Ray job that made it, when there is one."""
    job = ray_job_id()
    tags = {**tags, **({"ray_job_id": job} if job else {})}
    return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


def param_chunks(params: Mapping[str, Any], logged: Iterable[str] = ()) -> list[list[Any]]:
    """``params`` not in ``logged`` (MLflow refuses to change a param; a resumed run re-sends
    them), as strings cut to the store's limit, in requests of at most 100."""
    from mlflow.entities import Param

    have = set(logged)
    new = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items() if k not in have]
    return [new[i : i + PARAMS_PER_REQUEST] for i in range(0, len(new), PARAMS_PER_REQUEST)]


def metric_list(metrics: Mapping[str, float | None], step: int) -> list[Any]:
    """Finite values as MLflow metrics at ``step`` (None, NaN and inf are left out)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if v is not None and math.isfinite(float(v))
    ]


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
    ) -> None:
        # MLflow's own HTTP retries last minutes; ours (bounded) replace them.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        check_tracking_reachable(uri)
        self.uri, self.attempts, self.backoff_s = uri, attempts, backoff_s
        self.client = _client(uri)
        self.experiment_id = self._call(
            lambda: _experiment_id(self.client, uri, experiment, artifact_location),
            "experiment set-up",
        )
        self.run_id, self.resumed = self._call(
            lambda: self._open_run(run_key, run_name, parent_run_id, dict(tags or {}), run_id),
            "run set-up",
        )
        self._replay, self._marker = replay, Path(marker) if marker else None
        self._max_pending = max_pending
        self._logged: dict[str, int] = {}  # key -> highest step stored
        if self.resumed:
            self._logged = self._call(self._stored_steps, "read run")
        # (metric, can be read back by replay); the values of steps <= _replay_upto were let go
        self._pending: list[tuple[Any, bool]] = self._unsent_from_marker()
        self._replay_upto = resumed_step if replay is not None and self.resumed else 0
        self._last_step = 0
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
                _warn(f"MLflow run {run_id} of the checkpoint not found ({_safe(e)}); new run")
        found = _run_by_key(self.client, [self.experiment_id], key)
        if found is not None:
            run_id = found.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id, True
        tags = {**tags, RUN_KEY_TAG: key, MLFLOW_RUN_NAME: name}
        if parent:
            tags[MLFLOW_PARENT_RUN_ID] = parent
        return _new_run(self.client, self.experiment_id, name, tags), False

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
        """Params not logged yet (MLflow refuses to change a param; a resumed run re-sends them)."""
        have = self._call(lambda: self.client.get_run(self.run_id).data.params, "get run")
        for chunk in param_chunks(params, have):
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
            _warn(f"artifact {path} not logged ({type(e).__name__}: {_safe(e)})")

    def log_model(self, final_dir: str) -> str | None:
        """The final checkpoint as the run's pyfunc generation model (``mlflow models serve``),
        its URI tagged ``aunet.model_uri``. Never fatal (a warning and None): the run's metrics
        and its checkpoint artifact are already safe."""
        try:
            from pipelines.tracking_model import log_generation_model

            set_default_uri(self.uri)
            uri = log_generation_model(final_dir, run_id=self.run_id)
            self.set_tags({MODEL_URI_TAG: uri})
            return uri
        except Exception as e:
            _warn(f"pyfunc model not logged ({type(e).__name__}: {_safe(e)})")
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
        _warn(f"tracking store unreachable for long: dropped {drop} oldest metric values")

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
                _warn(f"tracking store {redact(self.uri)} answers again; queued metrics sent")
            self._failing = False
            return True

    def _failed(self, e: BaseException) -> bool:
        if not self._failing:
            _warn(
                f"cannot log metrics to {redact(self.uri)} ({type(e).__name__}: {_safe(e)}); "
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

    def close(self, status: str = "FINISHED", timeout_s: float = 60.0) -> bool:
        """Flush, stop the thread and mark the run ``status`` (FINISHED / FAILED / KILLED).

        True when the run is complete and marked. Otherwise the run is left RUNNING, the values
        ``replay`` cannot read back are kept in the ``marker`` file, and a warning says how to
        complete it: run the same command again once the store answers.
        """
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=timeout_s)
        done = self.flush(timeout_s)
        if done:
            try:
                self._call(lambda: self.client.set_terminated(self.run_id, status), "end run")
            except Exception as e:
                done = False
                _warn(f"run {self.run_id} not marked {status} ({type(e).__name__}: {_safe(e)})")
        if done:
            if self._marker is not None:
                self._marker.unlink(missing_ok=True)
            return True
        kept = [m for m, replayable in self._pending if not replayable]
        if self._marker is not None:
            rows = [[m.key, m.value, m.timestamp, m.step] for m in kept]
            self._marker.write_text(json.dumps({"run_id": self.run_id, "metrics": rows}))
        where = f"kept in {self._marker} and steps.jsonl" if self._marker else "lost"
        _warn(
            f"{len(self._pending)} metric values could not be logged to {redact(self.uri)} "
            f"({where}); MLflow run {self.run_id} stays RUNNING: run the same command again "
            "when the store answers, to log them and finish the run"
        )
        return False


def _safe(e: BaseException) -> str:
    """An error's text with any credentials of a URL in it redacted."""
    return redact(str(e))


# ---------------------------------------------------------------------------------- runs
def get_or_create_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created (artifacts at ``artifact_location``, else where
    ``runtime.artifact_location_for`` puts them) if it does not exist yet."""
    return _experiment_id(_client(uri), uri, name, artifact_location)


def find_experiment(uri: str, name: str) -> str | None:
    """The id of experiment ``name``, None if there is none (readers must not create one)."""
    exp = _client(uri).get_experiment_by_name(name)
    return None if exp is None else exp.experiment_id


def create_run(uri: str, experiment_id: str, run_name: str, tags: Mapping[str, Any]) -> str:
    """A new run (status RUNNING), tagged ``tags`` and the Ray job id when in a job; its id."""
    return _new_run(_client(uri), experiment_id, run_name, {k: str(v) for k, v in tags.items()})


def get_run(uri: str, run_id: str) -> Any:
    """The run (``mlflow.entities.Run``); MLflow's error if the store has no such run."""
    return _client(uri).get_run(run_id)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status)


def parent_run_id(id_file: str | os.PathLike) -> str | None:
    """The run id a ``parent_run`` call stored in ``id_file``, None before the first one."""
    p = Path(id_file)
    return json.loads(p.read_text())["run_id"] if p.is_file() else None


def parent_run(
    id_file: str | os.PathLike,
    uri: str,
    experiment: str,
    *,
    run_name: str,
    tags: Mapping[str, Any],
    params: Mapping[str, Any],
    artifact_location: str | None = None,
) -> str:
    """A parent run created once and reopened (status RUNNING) on every resume.

    Its id lives in ``id_file`` (a sweep directory's ``parent_run.json``) rather than being
    searched by tags, so a resumed sweep reopens exactly its own run even when an earlier sweep
    of the same name is in the store; ``params`` are logged only when the run is created.
    """
    client = _client(uri)
    run_id = parent_run_id(id_file)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id
    exp_id = _experiment_id(client, uri, experiment, artifact_location)
    run_id = _new_run(client, exp_id, run_name, {k: str(v) for k, v in tags.items()})
    for chunk in param_chunks(params):
        client.log_batch(run_id, params=chunk)
    Path(id_file).write_text(json.dumps({"run_id": run_id, "tracking_uri": redact(uri)}))
    return run_id


# ---------------------------------------------------------------------------------- logging
def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """The params ``run_id`` does not have yet (cut to 6000 characters, 100 per request)."""
    client = _client(uri)
    have = client.get_run(run_id).data.params
    for chunk in param_chunks(params, have):
        client.log_batch(run_id, params=chunk)


def tag_run(
    uri: str, run_id: str, tags: Mapping[str, Any], params: Mapping[str, Any] | None = None
) -> None:
    """Mark an existing run (a sweep's child, a study's cell, an evaluated training run) with
    ``tags``, and with the ``params`` it does not have yet (a training run's params are fixed)."""
    if params:
        log_params(uri, run_id, params)
    from mlflow.entities import RunTag

    _client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float | None], step: int = 0) -> None:
    """The finite values at ``step``, 1000 per request."""
    client, ms = _client(uri), metric_list(metrics, step)
    for i in range(0, len(ms), METRICS_PER_REQUEST):
        client.log_batch(run_id, metrics=ms[i : i + METRICS_PER_REQUEST])


def log_artifacts(
    uri: str, run_id: str, paths: Iterable[str | os.PathLike], artifact_path: str | None = None
) -> None:
    """Files, or the contents of directories, under ``artifact_path`` of the run."""
    client = _client(uri)
    for p in map(str, paths):
        if os.path.isdir(p):
            client.log_artifacts(run_id, p, artifact_path)
        else:
            client.log_artifact(run_id, p, artifact_path)


def log_summary(
    uri: str,
    run_id: str,
    *,
    files: Iterable[str | os.PathLike] = (),
    metrics: Mapping[str, float] | None = None,
    artifact_path: str | None = None,
    status: str | None = "FINISHED",
) -> None:
    """What a driver leaves on its own run at the end (a sweep's results, a report's files and
    fit numbers), then the run's final ``status`` (None leaves it running)."""
    log_artifacts(uri, run_id, files, artifact_path)
    log_metrics(uri, run_id, metrics or {})
    if status is not None:
        end_run(uri, run_id, status)


# ---------------------------------------------------------------------------------- reading
def search_runs(
    uri: str,
    filter_string: str = "",
    *,
    experiment_names: Sequence[str] | None = None,
    experiment_ids: Sequence[str] | None = None,
    order_by: Sequence[str] | None = None,
    max_results: int | None = None,
) -> list[Any]:
    """Runs matching ``filter_string``, every page of them (or the first ``max_results``).

    Experiments by name (names not in the store are skipped), by id, or, with neither, every
    active experiment of the store.
    """
    client = _client(uri)
    ids = list(experiment_ids or [])
    if experiment_names is not None:
        exps = [client.get_experiment_by_name(n) for n in experiment_names]
        ids += [e.experiment_id for e in exps if e is not None]
        if not ids:
            return []
    elif experiment_ids is None:
        ids = [e.experiment_id for e in client.search_experiments()]
    runs: list[Any] = []
    token = None
    while max_results is None or len(runs) < max_results:
        page = client.search_runs(
            ids,
            filter_string,
            max_results=min(1000, max_results - len(runs)) if max_results else 1000,
            order_by=list(order_by) if order_by else None,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def find_run_by_key(uri: str, key: str) -> str | None:
    """The run tagged ``aunet.run_key`` = ``key`` (a training run's directory), any experiment."""
    client = _client(uri)
    found = _run_by_key(client, [e.experiment_id for e in client.search_experiments()], key)
    return None if found is None else found.info.run_id


def child_runs(uri: str, parent_id: str) -> list[Any]:
    """The runs nested under ``parent_id`` (a sweep's trials); MLflow's error if it is unknown."""
    exp_id = get_run(uri, parent_id).info.experiment_id
    return search_runs(uri, f"tags.mlflow.parentRunId = '{parent_id}'", experiment_ids=[exp_id])


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """Every (step, value) logged for ``key``."""
    return [(m.step, m.value) for m in _client(uri).get_metric_history(run_id, key)]


def download_run_artifact(uri: str, run_id: str, path: str, dst: str | os.PathLike) -> Path | None:
    """A top-level artifact of the run copied into ``dst``; None if the run has none by that
    name (MLflow's error if there is no such run)."""
    client = _client(uri)
    client.get_run(run_id)
    if path not in [a.path for a in client.list_artifacts(run_id)]:
        return None
    return Path(client.download_artifacts(run_id, path, str(dst)))


def download_artifacts(
    artifact_uri: str, dst: str | os.PathLike | None = None, tracking_uri: str | None = None
) -> Path:
    """A local copy of an artifact or model URI (``runs:/``, ``models:/``, ...).

    ``tracking_uri`` becomes the process's default store first, so that a ``models:/`` URI
    resolves against the registry of that same store.
    """
    import mlflow

    if tracking_uri is not None:
        set_default_uri(tracking_uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=dst))


def set_default_uri(uri: str) -> None:
    """The store the fluent API (``mlflow.pyfunc.log_model``, ``load_model``) uses."""
    import mlflow

    mlflow.set_tracking_uri(authenticated(uri))
