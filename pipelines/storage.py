"""Datasets on any ``pyarrow.fs`` filesystem: a local path, ``s3://``, ``gs://``, ``hdfs://`` ...

Preprocessing tasks write shards straight to the target filesystem and the driver reads small
JSON records and listings back; both go through these few calls so that a local directory and a
bucket follow the same code path (docs/data.md, Storage).

S3: the endpoint of an S3-compatible service (MinIO, a test server on loopback) comes from the
standard ``AWS_ENDPOINT_URL`` variable (read by pyarrow itself), credentials and region from the
usual ``AWS_*`` variables. Ray tasks started before the driver set them would not see them, so the
driver forwards them as the tasks' ``runtime_env`` (``forwarded_env``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pyarrow.fs as pafs

from pipelines.paths import absolute_path, is_uri

FORWARDED_PREFIXES = ("AWS_", "GOOGLE_", "ARROW_S3_")


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """A local path or URI -> (filesystem, path inside it); a local path is made absolute."""
    if is_uri(location):
        if location.startswith("s3://") and "allow_delayed_open" not in location:
            # Small objects (records, shards under the part size) then go up in one PUT instead
            # of a three-request multipart upload.
            location += ("&" if "?" in location else "?") + "allow_delayed_open=true"
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), absolute_path(location)


def join(base: str, *parts: str) -> str:
    """``/``-join inside a filesystem path (pyarrow paths use ``/`` on every filesystem)."""
    return "/".join([base.rstrip("/"), *parts])


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    """A whole (small) file, or None when it does not exist."""
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:  # some filesystems say "not found" with a plain OSError
        if "not found" in str(e).lower() or "no such file" in str(e).lower():
            return None
        raise


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a small file so that a reader sees the whole of it or nothing.

    Local: a ``.part`` file renamed over the target (a rename is atomic). Object stores: one PUT,
    which is atomic there, while a rename would be a copy.
    """
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        part = path + ".part"
        with fs.open_output_stream(part) as f:
            f.write(data)
        fs.move(part, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def sizes(fs: pafs.FileSystem, directory: str) -> dict[str, int]:
    """Name -> size of the files directly in ``directory`` (one listing; {} if it is missing)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    except FileNotFoundError:
        return {}
    return {i.base_name: int(i.size) for i in infos if i.type == pafs.FileType.File}


def delete(fs: pafs.FileSystem, path: str) -> None:
    """Remove a file; one that is already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def forwarded_env() -> dict[str, Any]:
    """The driver's storage credentials and endpoint variables, for the tasks' ``runtime_env``."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}


def fetch_local(location: str, into: str) -> str:
    """Copy a file or directory of ``location`` (a URI) under the local directory ``into``;
    returns the local copy's path (same base name), for clients that read only local files."""
    fs, path = resolve(location)
    local = os.path.join(into, path.rstrip("/").rsplit("/", 1)[-1])
    pafs.copy_files(path, local, source_filesystem=fs)  # a file, or a directory recursively
    return local
