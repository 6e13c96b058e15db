"""Reading corpora into documents: the functions that run inside the preprocessing Ray tasks.

Every function here is a pure function of its input file and settings, so the document stream it
produces does not depend on how Ray schedules it (``pipelines.preprocess`` relies on that).

- Formats: ``.txt`` (one document per file, raw bytes: invalid UTF-8 is kept and gets level 0),
  ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` (one JSON object per line; text, id and lang fields
  configurable) and ``.parquet`` (a text column; string or binary).
- Rejected documents, with their reason: ``missing_field`` (no text field, or null),
  ``invalid_unicode`` (a JSON string with a lone surrogate: it has no UTF-8 encoding), ``not_text``
  (a number, list, ...), ``empty``. A file that cannot be read, a line that is not JSON or a
  missing parquet column is a ``CorpusError`` naming the file (and line). Inside a Ray Data task it
  travels to the driver as an error row (``ERROR_SPLIT``) rather than as a failed task, which Ray
  would retry and report in a page of log; the driver raises it (``raise_error_rows``).
- Source weights are the expected number of passes over a source: 2.5 reads it 3 times, keeping
  every document in passes 0 and 1 and, in pass 2, those whose hash (seed, source, pass, key)
  falls below 0.5 (reason ``sampled_out``, counted apart from rejections); 0 excludes the source.
  Passes follow one another (two copies of a document are never packed side by side).
- The train/val split is a hash of (seed, key), key = the id field's value when configured and
  present, else the document bytes, so every copy of a document lands in the same split.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import struct
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MISSING = object()
ERROR_SPLIT = -2  # split of an error row: its ``ident`` is the message


class CorpusError(ValueError):
    """A corpus the user must fix: a line that is not a JSON object, an unreadable file, a missing
    column, no document at all. The message names the file (and line)."""


DOCS_SCHEMA = pa.schema(
    [
        ("data", pa.large_binary()),
        ("split", pa.int8()),
        ("reject", pa.string()),
        ("ident", pa.string()),
        ("lang", pa.string()),
    ]
)


def source_files(i: int, path: str) -> list[str]:
    """The files of source ``i``: its path, or its glob's matches (sorted); none is an error."""
    if glob.has_magic(path):
        matches = sorted(glob.glob(path, recursive=True))
        if not matches:
            raise FileNotFoundError(f"data.sources[{i}].path: glob matches no file: {path}")
        return matches
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.sources[{i}].path: no such file: {path}")
    return [path]


def check_sources(sources: list[Any]) -> None:
    """Every source names at least one file: what a driver checks before it starts Ray (no
    reading, no checksums), so a typo in a path fails in a second, not after Ray's start-up."""
    for i, src in enumerate(sources):
        source_files(i, src.path)


def resolve_inputs(sources: list[Any]) -> list[dict[str, Any]]:
    """Expand each source's path or glob (sorted), checksum every file; errors name the source."""
    out = []
    for i, src in enumerate(sources):
        for path in source_files(i, src.path):
            digest = file_sha256(path)
            fields = {k: getattr(src, k) for k in ("text_field", "id_field", "lang_field")}
            out.append(
                {
                    "path": os.path.abspath(path),
                    "source": i,
                    "format": src.resolved_format,
                    "bytes": os.path.getsize(path),
                    "sha256": digest,
                    "weight": float(src.weight),
                    **fields,
                }
            )
    return out


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 4 MB blocks; a read error names the file."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    except OSError as e:
        raise CorpusError(f"{path}: cannot read input: {e}") from e
    return h.hexdigest()


def hash01(*parts: bytes) -> float:
    """Deterministic uniform [0, 1) (blake2b; Python's hash() is salted per process)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(struct.pack("<Q", len(p)) + p)
    return int.from_bytes(h.digest(), "little") / 2.0**64


def jsonl_objects(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number from 1, object) of a .jsonl / .jsonl.gz / .jsonl.zst file, blank lines
    skipped. A line that is not a JSON object is a ``CorpusError`` (a ValueError) naming the file
    and line; read errors propagate as OSError / ``pa.ArrowException``."""
    with io.BufferedReader(pa.input_stream(path, compression="detect"), 1 << 20) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise CorpusError(f"{path}: line {n}: invalid JSON: {e}") from None
            if not isinstance(rec, dict):
                raise CorpusError(f"{path}: line {n}: expected a JSON object")
            yield n, rec


def records(path: str, fmt: str, text_field: str, id_field: str | None, lang_field: str | None):
    """Yield (record number, text value or MISSING, id, lang) of one file; errors name the file."""
    try:
        if fmt == "txt":
            with open(path, "rb") as f:
                yield 0, f.read(), None, None
        elif fmt == "jsonl":
            for line_no, rec in jsonl_objects(path):
                ident = rec.get(id_field) if id_field else None
                lang = rec.get(lang_field) if lang_field else None
                yield line_no - 1, rec.get(text_field, MISSING), ident, lang
        elif fmt == "parquet":
            pf = pq.ParquetFile(path)
            cols = [c for c in (text_field, id_field, lang_field) if c]
            for col in cols:
                if col not in pf.schema_arrow.names:
                    raise CorpusError(f"{path}: no column {col!r} (has {pf.schema_arrow.names})")
            n = 0
            for batch in pf.iter_batches(columns=cols, batch_size=1024):
                d = batch.to_pydict()
                for j, text in enumerate(d[text_field]):
                    ident = d[id_field][j] if id_field else None
                    yield n, text, ident, d[lang_field][j] if lang_field else None
                    n += 1
        else:
            raise CorpusError(f"{path}: unknown format {fmt!r} (txt, jsonl, parquet)")
    except (OSError, pa.ArrowException, EOFError) as e:
        raise CorpusError(f"{path}: cannot read input: {e}") from e


def to_bytes(value: Any) -> tuple[bytes | None, str | None]:
    """A record's text -> (bytes, None) or (None, reject reason). bytes stay raw (txt, binary)."""
    if value is MISSING or value is None:
        return None, "missing_field"
    if isinstance(value, str):
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, from a JSON "\ud800" escape
            return None, "invalid_unicode"
    elif isinstance(value, bytes | bytearray):
        data = bytes(value)
    else:
        return None, "not_text"
    return (data, None) if data else (None, "empty")


def _error_table(message: str) -> pa.Table:
    row = {"data": [None], "split": [ERROR_SPLIT], "reject": ["error"], "ident": [message]}
    return pa.Table.from_pydict({**row, "lang": [None]}, schema=DOCS_SCHEMA)


def raise_error_rows(table: pa.Table) -> None:
    """Raise the ``CorpusError`` a task sent as an error row (``read_unit``), if there is one."""
    split = table.column("split").to_numpy()
    bad = np.flatnonzero(split == ERROR_SPLIT)
    if len(bad):
        raise CorpusError(table.column("ident")[int(bad[0])].as_py())


def read_unit(batch: dict[str, np.ndarray]):
    """One (file, pass) unit -> blocks of document rows in record order (split -1 = not kept).

    A ``CorpusError`` ends the unit with an error row (``raise_error_rows``) instead of failing
    the task: the user reads one line naming the file and line, not Ray's retry log.
    """
    try:
        yield from _read_unit(batch)
    except CorpusError as e:
        yield _error_table(str(e))


def _read_unit(batch: dict[str, np.ndarray]):
    (u,) = [json.loads(s) for s in batch["unit"]]
    seed, w, p = str(u["seed"]).encode(), u["weight"], u["pass"]
    keep = min(1.0, w - p)  # keep-probability of a document in this pass
    rows: dict[str, list] = {k: [] for k in DOCS_SCHEMA.names}
    size = 0
    recs = records(u["path"], u["format"], u["text_field"], u["id_field"], u["lang_field"])
    for n, value, ident, lang in recs:
        data, reason = to_bytes(value)
        split = -1
        if data is not None:
            key = b"id:" + str(ident).encode("utf-8", "replace") if ident is not None else data
            pass_key = f"{u['source']}/{p}".encode()
            if keep < 1.0 and hash01(seed, b"pass", pass_key, key) >= keep:
                data, reason = None, "sampled_out"
            else:
                split = int(hash01(seed, b"split", key) < u["val_fraction"])
        rows["data"].append(data)
        rows["split"].append(split)
        rows["reject"].append(reason)
        rows["ident"].append(str(ident) if ident is not None else f"{u['path']}:{n}")
        rows["lang"].append(None if lang is None else str(lang))
        size += len(data) if data else 0
        if size >= u["block_bytes"]:
            yield pa.Table.from_pydict(rows, schema=DOCS_SCHEMA)
            rows, size = {k: [] for k in DOCS_SCHEMA.names}, 0
    if rows["split"]:
        yield pa.Table.from_pydict(rows, schema=DOCS_SCHEMA)


@lru_cache(maxsize=4)
def _splitter(strategy_json: str):
    from aunet.splitting import Splitter

    strategy = json.loads(strategy_json)
    return Splitter(strategy) if strategy else None


def encode_batch(table: pa.Table, strategy_json: str) -> pa.Table:
    """Splitter levels per whole document (docs/data.md), in a ``levels`` column beside ``data``.

    BOS/EOS are added by the consumer (``aunet.packing.Packer.add_documents``): bytes + levels are 2
    bytes per text byte through the object store, uint16 tokens with BOS/EOS would be 3.
    ``nbytes``: the document's byte count (0 for a row without data).
    """
    splitter = _splitter(strategy_json)
    column = table.column("data").cast(pa.large_binary())
    column = column.fill_null(b"") if column.null_count else column
    docs = column.combine_chunks()  # one buffer of text: levels_batch splits it in one pass
    _, offsets_buffer, values_buffer = docs.buffers()
    bounds = np.zeros(1, np.int64)
    if len(docs):
        bounds = np.frombuffer(offsets_buffer, np.int64)[docs.offset : docs.offset + len(docs) + 1]
    lengths = np.diff(bounds)
    data = np.frombuffer(values_buffer or b"", np.uint8)[bounds[0] : bounds[-1]]
    if splitter is None:
        values = np.zeros(len(data), np.uint8)
    else:
        values = splitter.levels_batch(data, lengths)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    levels = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(docs), [None, pa.py_buffer(offsets), pa.py_buffer(values)]
    )
    table = table.append_column("nbytes", pa.array(lengths, pa.int64()))
    return table.append_column("levels", levels)


def read_encode_unit(batch: dict[str, np.ndarray], strategy_json: str):
    """One (file, pass) unit -> encoded blocks of document rows, in record order."""
    for table in read_unit(batch):
        yield encode_batch(table, strategy_json)


def work_units(inputs: list[dict[str, Any]], data_cfg: Any, block_bytes: int) -> list[str]:
    """(file, pass) work units, pass-major so that repeated passes never sit side by side."""
    passes = max((int(np.ceil(i["weight"])) for i in inputs), default=0)
    common = {
        "seed": data_cfg.seed,
        "val_fraction": data_cfg.val_fraction,
        "block_bytes": block_bytes,
    }
    return [
        json.dumps({**i, **common, "pass": p})
        for p in range(passes)
        for i in inputs
        if p < np.ceil(i["weight"])
    ]
