"""The MLflow layer: every call the pipelines make to MLflow goes through this module,
``pipelines.tracking_run`` (the training run's ``Tracker``) and ``pipelines.tracking_model`` (the
pyfunc model); ``tests/test_layout.py`` holds the rest to it.

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
- The training loop's ``Tracker`` (with its delivery rules and ``StepReplay``) lives in
  ``pipelines.tracking_run``, on top of this module. The functions here serve it and the drivers
  (sweeps, studies, reports, evaluation), which log a few values once: they take the tracking URI
  and call the store synchronously.
  Experiments are created by whoever comes first (concurrent trials, a second sweep on the same
  store): a creation that loses the race reads the winner's experiment back.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pipelines.paths import redact
from pipelines.runtime import (
    artifact_location_for,
    ray_job_id,
    split_credentials,
)

RUN_KEY_TAG = "aunet.run_key"
MODEL_URI_TAG = "aunet.model_uri"
PARENT_RUN_FILE = "parent_run.json"  # in a sweep directory: the parent run's id, for resumes
MAX_PARAM_CHARS = 6000  # the store refuses longer param values
PARAMS_PER_REQUEST = 100  # the store's limit per log_batch
METRICS_PER_REQUEST = 1000
T = TypeVar("T")


def warn(msg: str) -> None:
    print(f"tracking: WARNING: {msg}", file=sys.stderr, flush=True)


def retry(fn: Callable[[], T], what: str, attempts: int = 4, backoff_s: float = 0.5) -> T:
    """Call ``fn`` up to ``attempts`` times with exponential backoff; re-raise the last error."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if i == attempts - 1:
                raise
            warn(f"{what} failed ({type(e).__name__}: {e}); retry {i + 1} in {backoff_s:g} s")
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
    flag, else ``MLFLOW_TRACKING_URI``, else ``./mlflow.db`` (where a spec's default points, and
    MLflow's own default), or an older ``./mlruns.db`` that exists."""
    from pipelines.paths import DEFAULT_TRACKING_URI, absolute_tracking_uri, existing_default_store

    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or existing_default_store()
    return absolute_tracking_uri(uri or DEFAULT_TRACKING_URI)


def client_for(uri: str) -> Any:
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


# MLflow 3's UI opens an experiment without this tag in its GenAI (traces) view when it guesses
# wrong; model training is the "custom model development" kind (its runs and charts view).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id_for(client: Any, uri: str, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(
            name,
            artifact_location=artifact_location_for(uri, artifact_location),
            tags=EXPERIMENT_KIND,
        )
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def run_by_key(client: Any, experiment_ids: list[str], key: str) -> Any | None:
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


def new_run(client: Any, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str:
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


def safe_error(e: BaseException) -> str:
    """An error's text with any credentials of a URL in it redacted."""
    return redact(str(e))


# ---------------------------------------------------------------------------------- runs
def get_or_create_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created (artifacts at ``artifact_location``, else where
    ``runtime.artifact_location_for`` puts them) if it does not exist yet."""
    return experiment_id_for(client_for(uri), uri, name, artifact_location)


def find_experiment(uri: str, name: str) -> str | None:
    """The id of experiment ``name``, None if there is none (readers must not create one)."""
    exp = client_for(uri).get_experiment_by_name(name)
    return None if exp is None else exp.experiment_id


def create_run(uri: str, experiment_id: str, run_name: str, tags: Mapping[str, Any]) -> str:
    """A new run (status RUNNING), tagged ``tags`` and the Ray job id when in a job; its id."""
    return new_run(client_for(uri), experiment_id, run_name, {k: str(v) for k, v in tags.items()})


def get_run(uri: str, run_id: str) -> Any:
    """The run (``mlflow.entities.Run``); MLflow's error if the store has no such run."""
    return client_for(uri).get_run(run_id)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client_for(uri).set_terminated(run_id, status)


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
    client = client_for(uri)
    run_id = parent_run_id(id_file)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id
    exp_id = experiment_id_for(client, uri, experiment, artifact_location)
    run_id = new_run(client, exp_id, run_name, {k: str(v) for k, v in tags.items()})
    for chunk in param_chunks(params):
        client.log_batch(run_id, params=chunk)
    Path(id_file).write_text(json.dumps({"run_id": run_id, "tracking_uri": redact(uri)}))
    return run_id


# ---------------------------------------------------------------------------------- logging
def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """The params ``run_id`` does not have yet (cut to 6000 characters, 100 per request)."""
    client = client_for(uri)
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

    client_for(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float | None], step: int = 0) -> None:
    """The finite values at ``step``, 1000 per request."""
    client, ms = client_for(uri), metric_list(metrics, step)
    for i in range(0, len(ms), METRICS_PER_REQUEST):
        client.log_batch(run_id, metrics=ms[i : i + METRICS_PER_REQUEST])


def log_artifacts(
    uri: str, run_id: str, paths: Iterable[str | os.PathLike], artifact_path: str | None = None
) -> None:
    """Files, or the contents of directories, under ``artifact_path`` of the run."""
    client = client_for(uri)
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
    client = client_for(uri)
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
    client = client_for(uri)
    found = run_by_key(client, [e.experiment_id for e in client.search_experiments()], key)
    return None if found is None else found.info.run_id


def child_runs(uri: str, parent_id: str) -> list[Any]:
    """The runs nested under ``parent_id`` (a sweep's trials); MLflow's error if it is unknown."""
    exp_id = get_run(uri, parent_id).info.experiment_id
    return search_runs(uri, f"tags.mlflow.parentRunId = '{parent_id}'", experiment_ids=[exp_id])


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """Every (step, value) logged for ``key``."""
    return [(m.step, m.value) for m in client_for(uri).get_metric_history(run_id, key)]


def download_run_artifact(uri: str, run_id: str, path: str, dst: str | os.PathLike) -> Path | None:
    """A top-level artifact of the run copied into ``dst``; None if the run has none by that
    name (MLflow's error if there is no such run)."""
    client = client_for(uri)
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


def dataset_input(path: str, manifest: Mapping[str, Any]) -> Any:
    """A run input (``log_inputs``) naming the dataset a run trains on: its location and its
    content hash (the manifest's ``config_hash``, cut to MLflow's 36-character digest), so the
    runs table and the compare view show which runs read the same data."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # "local file or local artifact": the same path either way
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(path))
    ds = MetaDataset(
        source,
        name=str(manifest.get("name") or "dataset"),
        digest=str(manifest.get("config_hash", ""))[:36] or None,
    )
    tags = [InputTag(key="mlflow.data.context", value="training")]
    return DatasetInput(dataset=ds._to_mlflow_entity(), tags=tags)
