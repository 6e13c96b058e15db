"""Where Ray, MLflow and storage live: the one module that decides it.

Every pipeline calls ``init_ray`` instead of ``ray.init()``, and takes the tracking URI that the
spec resolved at load (``pipelines.paths.resolve_tracking_uri``), so that the same entry point
behaves alike in an embedded local Ray and under ``ray job submit``. Two rules drive the code
(docs/platform.md: Paths, Starting Ray):
- Ray workers run in a session directory, not in our cwd, so every path and sqlite URI handed to
  them is absolute; and on a cluster they see only the env vars passed through ``runtime_env``.
- A bare ``ray.init()`` joins whatever cluster is running on the box (or hangs on a stale
  cluster file), so the embedded case always asks for ``address="local"``, dashboard on loopback,
  on a GCS port chosen here so that its workers get their own cluster's address as
  ``RAY_ADDRESS``, and with the auth token file private to the user (``ensure_private_auth_token``).
Ray is imported inside functions so that importing this module stays cheap. Paths and URIs live in
``pipelines.paths``; this module does not import ``pipelines.spec`` (its ``resources`` and
``tracking`` arguments are the spec's sections, taken by their attributes).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import socket
import stat
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.paths import absolute_path, absolute_tracking_uri, redact

if TYPE_CHECKING:
    import pyarrow.fs

LOOPBACK = "127.0.0.1"
# Env vars a worker needs to reach the same services as the driver (values never logged).
VERBOSE_ENV = "AUNET_VERBOSE"  # 1: Ray's own INFO lines on the terminal too (train --verbose)
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", VERBOSE_ENV)
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by the Ray job supervisor for the entrypoint
_GCS_ADDRESS = re.compile(r"^[A-Za-z0-9.-]+:\d+$")  # host:port (not auto, ray://, http://)
_GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"  # read by Ray's Node when it starts a head (node.py)
_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # Ray's token settings
_GCS_START_TRIES = 3  # a chosen port taken before the GCS binds it: try another one


class TrackingUnreachable(ConnectionError):
    """The MLflow tracking server did not answer; raised before any work starts."""


# ---------------------------------------------------------------------------------- paths
def open_filesystem(path_or_uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or any ``pyarrow.fs`` URI (s3://, gs://),
    with the S3 options of ``pipelines.storage.resolve``."""
    from pipelines.storage import resolve

    return resolve(path_or_uri)


# ---------------------------------------------------------------------------------- MLflow
def artifact_location_for(tracking_uri: str, configured: str | None) -> str | None:
    """Artifact root for a new experiment: ``configured``, else the store's own choice.

    A tracking server (http) picks it (its ``--default-artifact-root`` or proxied
    ``mlflow-artifacts:``), so runs from a ``ray job submit`` land in the server's store and not
    in the job's ephemeral working_dir. A sqlite store has no server: next to the database file.
    """
    if configured:
        return configured
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///") :]
        if path not in ("", ":memory:"):
            return Path(os.path.dirname(absolute_path(path)), "mlartifacts").as_uri()
    return None


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(URI without userinfo, user, password) of ``http://user:pass@host``, percent-decoded.

    Neither ``urllib`` nor MLflow's client should see credentials inside a URL: ``urlopen``
    takes them for a port, and a URL is what error messages and logs print. They travel as
    HTTP Basic auth instead, the way MLflow's client sends ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD`` (docs/platform.md: The MLflow tracking URI).
    """
    from urllib.parse import unquote, urlsplit, urlunsplit

    if not uri.startswith(("http://", "https://")):
        return uri, None, None
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    clean = urlunsplit(parts._replace(netloc=host))
    return clean, unquote(user), unquote(password) if password else None


def check_tracking_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming the URI, if an http(s) server does not answer ``GET /health``.

    Without this, MLflow's client retries for minutes before a run fails. Credentials in the URI
    (or ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``) go as HTTP Basic auth, never in the URL
    (``split_credentials``). For sqlite the parent directory is created so that the first write
    cannot fail on a missing folder.
    """
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if path not in ("", ":memory:"):
            Path(absolute_path(path)).parent.mkdir(parents=True, exist_ok=True)
        return
    if not uri.startswith(("http://", "https://")):
        return
    clean, user, password = split_credentials(uri)
    user = user or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = password or os.environ.get("MLFLOW_TRACKING_PASSWORD")
    request = urllib.request.Request(clean.rstrip("/") + "/health")
    if user:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    outcome: list[BaseException | int] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                outcome.append(response.status)
        except BaseException as e:  # reported below, in the caller's thread
            outcome.append(e)

    # A thread bounds the total time: the socket timeout does not cover name resolution.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    where = f"MLflow tracking server {redact(uri)}"
    if not outcome:
        raise TrackingUnreachable(f"{where}: no answer to GET /health within {timeout_s:g} s")
    result = outcome[0]
    if isinstance(result, urllib.error.HTTPError):
        hint = {401: " (credentials missing or wrong)", 403: " (credentials refused)"}
        raise TrackingUnreachable(
            f"{where}: GET /health answered HTTP {result.code}{hint.get(result.code, '')}"
        )
    if isinstance(result, BaseException):
        reason = getattr(result, "reason", result)
        raise TrackingUnreachable(f"{where}: not reachable ({redact(str(reason))})")
    if not 200 <= result < 300:
        raise TrackingUnreachable(f"{where}: GET /health answered HTTP {result}")


# ---------------------------------------------------------------------------------- Ray
def configure_ray_data() -> None:
    """Ray Data defaults for this platform: quiet logs off a TTY, deterministic output order."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()  # bars flood CI logs and files
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True  # same input -> same shards, byte for byte


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_ray_console() -> None:
    """In a Ray worker: Ray's own INFO records ("Reporting training result ...") stay in Ray's
    log files instead of reaching the user's terminal, unless verbose. Records are matched by the
    file that logged them (some Ray loggers are named by file path, not ``ray.*``); the worker's
    file handlers are left alone."""
    import logging

    import ray

    if verbose():
        return
    ray_dir = os.path.dirname(ray.__file__)

    class _NoRayInfo(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return record.levelno >= logging.WARNING or not record.pathname.startswith(ray_dir)

    for handler in logging.getLogger().handlers:
        console = isinstance(handler, logging.StreamHandler)  # Ray's session files are not
        if console and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_NoRayInfo())


def worker_env(tracking_uri: str | None = None) -> dict[str, str]:
    """Env vars every Ray worker must see, with URIs made absolute for the workers' other cwd."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if tracking_uri is not None:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if "MLFLOW_TRACKING_URI" in env:
        env["MLFLOW_TRACKING_URI"] = absolute_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return env


def _job_runtime_env() -> dict:
    """The runtime_env ``ray job submit`` gave this driver ({} outside a submitted job)."""
    try:
        return json.loads(os.environ.get(_JOB_CONFIG_ENV, "{}")).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def init_ray(
    resources: Any,
    num_cpus: int | None = None,
    *,
    include_dashboard: bool | None = None,
    tracking_uri: str | None = None,
    env_vars: Mapping[str, str] | None = None,
) -> None:
    """Connect to ``resources.ray_address`` / env ``RAY_ADDRESS``, else start Ray on loopback.

    A no-op when Ray is already initialised (tests share one session per module). ``tracking_uri``
    and ``env_vars`` reach every worker through ``runtime_env``; ``include_dashboard=None`` keeps
    Ray's default (Train wants the dashboard: without it the State API warns every few seconds).
    """
    import ray

    if ray.is_initialized():
        return
    env = {**worker_env(tracking_uri), **(env_vars or {})}
    address = resources.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        if _GCS_ADDRESS.match(address):
            # Ray internals in workers (Train's PlacementGroupCleaner uses the State API) look the
            # cluster up by RAY_ADDRESS, else by /tmp/ray/ray_current_cluster: with several heads
            # on one machine that file may name another cluster.
            env.setdefault("RAY_ADDRESS", address)
        # Under `ray job submit` the job's runtime_env is merged with ours, and Ray refuses a key
        # set in both: keep the job's value (it is the one the submitter chose).
        job_env = _job_runtime_env().get("env_vars") or {}
        env = {k: v for k, v in env.items() if k not in job_env}
        ray.init(address=address, runtime_env={"env_vars": env} if env else None)
    else:
        ensure_private_auth_token()
        _start_embedded(num_cpus, include_dashboard, env)
    configure_ray_data()


def _start_embedded(num_cpus: int | None, include_dashboard: bool | None, env: dict) -> None:
    """Start a private head whose workers know its GCS address (docs/platform.md: Starting Ray).

    Ray's workers find "their" cluster for the State API (Train's ``PlacementGroupCleaner``) by
    ``RAY_ADDRESS``, else ``ray_current_cluster`` or a scan of running GCS processes: with another
    Ray on the machine that fails ("Found multiple active Ray instances") or picks the other one.
    The address is only known before ``ray.init`` if we choose the GCS port, so we do, through
    Ray's ``RAY_GCS_SERVER_PORT`` (a port set there by the user is kept). The variable is set for
    the start only and blanked for the workers, which must not start heads on that port.
    """
    import ray

    chosen = os.environ.get(_GCS_PORT_ENV)
    for attempt in range(1, _GCS_START_TRIES + 1):
        port = int(chosen) if chosen else _free_port()
        own = _gcs_address(ray.util.get_node_ip_address(), port)
        worker_vars = {**env, "RAY_ADDRESS": own, _GCS_PORT_ENV: ""}
        try:
            with _environ(_GCS_PORT_ENV, str(port)):
                context = ray.init(
                    address="local",  # never join a cluster that happens to run on this box
                    num_cpus=num_cpus,
                    include_dashboard=include_dashboard,
                    dashboard_host=LOOPBACK,  # core ports rely on token auth (docs/platform.md)
                    runtime_env={"env_vars": worker_vars},
                )
        except Exception:
            ray.shutdown()
            # Another process took the port between our probe and the GCS bind: choose again.
            if chosen or attempt == _GCS_START_TRIES or _port_is_free(port):
                raise
            continue
        started = context.address_info.get("gcs_address")
        if started != own:  # the workers would look for the wrong GCS: refuse, loudly
            ray.shutdown()
            raise RuntimeError(
                f"embedded Ray started its GCS at {started}, not at {own} as asked through "
                f"{_GCS_PORT_ENV}; its workers could not find their own cluster"
            )
        return


def _free_port() -> int:
    """A TCP port free on every interface now (the GCS listens on all of them)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
        return True


def _gcs_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """Set one env var for the duration of the block, then restore it (or its absence)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def ray_auth_token_path() -> Path:
    """Where Ray keeps the token of local clusters (Ray's ``_get_default_token_path``)."""
    return Path.home() / ".ray" / "auth_token"


def ensure_private_auth_token() -> Path | None:
    """Make the token file an embedded Ray will use readable by its owner only (0600).

    A new local Ray turns token auth on and, when no token exists, writes one with a plain
    ``open(path, "w")`` (Ray's ``generate_and_save_token``): mode 0644 under the usual umask, so
    any local user could read the token that lets one run code on the cluster. We write it
    first, in Ray's format (64 hex characters, ``secrets.token_hex(32)``), created 0600 and
    linked into place atomically so that a concurrent start never reads half a token. A token
    file we own that others can read is tightened, never loosened; a symlink or another user's
    file is left alone. Nothing is done where Ray would not read that file (``RAY_AUTH_MODE``
    other than ``token``, ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` set). Returns the file
    managed, or None.
    """
    mode, token, token_path = (os.environ.get(k) for k in _AUTH_ENV)
    if os.name != "posix" or (mode is not None and mode.lower() != "token"):
        return None
    if token or token_path:  # the user chose where the token lives: theirs to protect
        return None
    path = ray_auth_token_path()
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=path.parent, prefix=".auth_token.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # written meanwhile: check its mode
                os.link(staging, path)
        finally:
            os.unlink(staging)
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
        print(
            f"runtime: {path} was readable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):o}); now {stat.S_IMODE(os.lstat(path).st_mode):o}",
            file=sys.stderr,
        )
    return path


def ray_job_id() -> str | None:
    """The ``ray job submit`` submission id of this driver or its workers, else None."""
    try:
        metadata = json.loads(os.environ.get(_JOB_CONFIG_ENV, "{}")).get("metadata") or {}
    except (ValueError, AttributeError):
        metadata = {}
    if metadata.get("job_submission_id"):
        return str(metadata["job_submission_id"])
    import ray

    if not ray.is_initialized():
        return None
    try:  # workers: the job config travels with the job, not the environment
        job_config = ray._private.worker.global_worker.core_worker.get_job_config()
        return dict(job_config.metadata).get("job_submission_id") or None
    except Exception:  # private API; a missing id must never fail a run
        return None
