"""Local paths, storage URIs and MLflow tracking URIs: stdlib only, importing nothing of ours.

Ray workers run in a session directory, not in the driver's working directory, so every path
and sqlite URI handed to them must be absolute; this module is where relative ones are made so.
It is a leaf: the spec reader and the runtime both use it without importing each other.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

TRACKING_ENV = "MLFLOW_TRACKING_URI"
# MLflow's own default store since MLflow 3 (``mlflow.store.tracking.DEFAULT_TRACKING_URI``): a
# plain ``mlflow ui`` or ``python -c`` in the same directory reads it without any export
# (docs/platform.md, The MLflow tracking URI). The platform's default before issue 20 is still read.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
OLD_DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
# MLflow URIs without a "://" that name a service, not a file store.
_NAMED_STORES = ("databricks", "databricks-uc", "uc")


def is_uri(path: str) -> bool:
    """``scheme://...`` (s3, gs, file, http): a location that ``os.path`` must leave alone."""
    return bool(_URI.match(path))


def absolute_path(path: str, cwd: str | None = None) -> str:
    """A URI unchanged; a local path (or glob) absolute and normalised against ``cwd``."""
    if is_uri(path):
        return path
    return os.path.normpath(os.path.join(cwd or os.getcwd(), os.path.expanduser(path)))


def join_path(base: str, *parts: str) -> str:
    """Join under a local directory or a pyarrow URI (``s3://bucket/x``) alike."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def absolute_tracking_uri(uri: str, cwd: str | None = None) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////<cwd>/rel.db``; a plain path -> a ``file://`` URI."""
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///") :]
        if rest.startswith("/") or rest in ("", ":memory:"):
            return uri
        return "sqlite:///" + absolute_path(rest, cwd)
    if ":" not in uri and uri not in _NAMED_STORES:
        return Path(absolute_path(uri, cwd)).as_uri()  # MLflow's file store
    return uri


def resolve_tracking_uri(
    configured: str, cwd: str | None = None, env: Mapping[str, str] | None = None
) -> str:
    """The URI to use: env ``MLFLOW_TRACKING_URI`` wins over ``configured``, then made absolute.

    The variable wins because a cluster names its tracking server there (``ray job submit``
    forwards it), while the spec's default sqlite file would land in the job's scratch directory.
    """
    environ = os.environ if env is None else env
    return absolute_tracking_uri(environ.get(TRACKING_ENV) or configured, cwd)


def redact(uri: str) -> str:
    """``http://user:secret@host`` -> ``http://***@host``: safe for messages and params."""
    return _USERINFO.sub("***@", uri)


def existing_default_store(cwd: str | None = None) -> str | None:
    """The default SQLite store of ``cwd`` when its file exists (``./mlflow.db``, else the older
    ``./mlruns.db``), absolute; None when neither does."""
    for uri in (DEFAULT_TRACKING_URI, OLD_DEFAULT_TRACKING_URI):
        path = Path(cwd or os.getcwd(), uri.removeprefix("sqlite:///"))
        if path.is_file():
            return f"sqlite:///{path.absolute()}"
    return None
