"""Reading corpora into documents: the functions that run inside the preprocessing Ray tasks.

Every function here is a pure function of its input file and settings, so the document stream it
produces does not depend on how Ray schedules it (``pipelines.preprocess`` relies on that).

- Formats: ``.txt`` (one document per file, raw bytes: invalid UTF-8 is kept and gets level 0),
  ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` (one JSON object per line; text, id and lang fields
  configurable) and ``.parquet`` (a text column; string or binary).
- Rejected documents, with their reason: ``missing_field`` (no text field, or null),
  ``invalid_unicode`` (a JSON string with a lone surrogate: it has no UTF-8 encoding), ``not_text``
  (a number, list, ...), ``empty``. A file that cannot be read, a line that is not JSON or a
  missing parquet column is a ``CorpusError`` naming the file (and line); a preprocessing task
  returns its message to the driver, which raises it (``pipelines.units``).
- Source weights are the expected number of passes over a source: 2.5 reads it 3 times, keeping
  every document in passes 0 and 1 and, in pass 2, those whose hash (seed, source, pass, key)
  falls below 0.5 (reason ``sampled_out``, counted apart from rejections); 0 excludes the source.
  Passes follow one another (two copies of a document are never packed side by side).
- The train/val split is a hash of (seed, key), key = the id field's value when configured and
  present, else the document bytes, so every copy of a document lands in the same split.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MISSING = object()


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
            digest = cached_sha256(path)
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


def _cache_file() -> str:
    root = os.environ.get("AUNET_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "aunet"
    )
    return os.path.join(root, "sha256.json")


_SHA_MEMO: dict[str, tuple[int, int, str]] = {}


def cached_sha256(path: str) -> str:
    """``file_sha256``, remembered per file by (size, mtime) in a local JSON cache.

    The checksums are what a dataset's identity hangs on (docs/data.md, Dataset identity), and
    every driver that asks where a dataset lives needs them: hashing a large corpus once per
    machine, not once per command, keeps that cheap. A changed file changes size or mtime.
    """
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as e:
        raise CorpusError(f"{path}: cannot read input: {e}") from e
    key = (st.st_size, st.st_mtime_ns)
    hit = _SHA_MEMO.get(real)
    if hit is None:
        try:
            with open(_cache_file()) as f:
                _SHA_MEMO.update({k: tuple(v) for k, v in json.load(f).items()})
        except (OSError, ValueError):
            pass
        hit = _SHA_MEMO.get(real)
    if hit is not None and tuple(hit[:2]) == key:
        return hit[2]
    digest = file_sha256(real)
    _SHA_MEMO[real] = (*key, digest)
    for gone in [p for p in _SHA_MEMO if not os.path.exists(p)]:  # deleted files: forget them
        del _SHA_MEMO[gone]
    _write_cache(_cache_file())
    return digest


def _write_cache(path: str) -> None:
    """Concurrent drivers (parallel tests, jobs on one node) never see half a file: a uniquely
    named temporary file renamed over the cache; entries other processes wrote are merged in
    first. Best effort: a read-only home only costs the re-hash next time."""
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            for k, v in json.load(f).items():
                if k not in _SHA_MEMO and os.path.exists(k):
                    _SHA_MEMO[k] = tuple(v)
        fd, tmp = tempfile.mkstemp(prefix=".sha256-", suffix=".part", dir=os.path.dirname(path))
        with os.fdopen(fd, "w") as f:
            json.dump(_SHA_MEMO, f)
        os.replace(tmp, path)


def source_digests(path: str) -> list[str] | str:
    """The checksums of a source's files (sorted glob), or the path itself where none matches
    (a spec is hashed before its inputs are checked; preprocessing then names the bad path)."""
    if "://" in path:
        return path
    files = sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else [path]
    files = [f for f in files if os.path.isfile(f)]
    return [cached_sha256(f) for f in files] if files else path


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
    skipped; a line that is not a JSON object is a ``CorpusError`` naming the file and line."""
    for where, _, rec in jsonl_pieces(path):
        yield int(where.split()[1]), rec


def jsonl_pieces(
    path: str, lo: int = 0, hi: int | None = None
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(where, ident, object) of each line of a .jsonl / .jsonl.gz / .jsonl.zst file, blank lines
    skipped; ``lo``/``hi``: the byte range of a plain .jsonl whose lines are read (a line belongs
    to the range its first byte is in). ``where`` is "line N" from the file's start (or "line at
    byte B" inside a range that does not start there: counting the lines before it would read
    the file's head once per range); ``ident`` the record's default id in the manifest. A line
    that is not a JSON object is a ``CorpusError`` (a ValueError) naming the file and line."""
    for where, ident, line in _lines(path, lo, hi):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise CorpusError(f"{path}: {where}: invalid JSON: {e}") from None
        if not isinstance(rec, dict):
            raise CorpusError(f"{path}: {where}: expected a JSON object")
        yield where, ident, rec


def _lines(path: str, lo: int, hi: int | None) -> Iterator[tuple[str, str, bytes]]:
    if lo == 0 and hi is None:
        with io.BufferedReader(pa.input_stream(path, compression="detect"), 1 << 20) as f:
            for n, line in enumerate(f, 1):
                yield f"line {n}", f"{path}:{n - 1}", line
        return
    end = os.path.getsize(path) if hi is None else hi
    with open(path, "rb", buffering=1 << 20) as f:
        pos = 0
        if lo:
            f.seek(lo - 1)  # the previous byte: a newline there means a line starts at lo
            pos = lo - 1 + len(f.readline())
        n = 0
        while pos < end:
            line = f.readline()
            if not line:
                return
            n += 1
            if lo == 0:
                yield f"line {n}", f"{path}:{n - 1}", line
            else:
                yield f"line at byte {pos}", f"{path}@{pos}", line
            pos += len(line)


def records(
    path: str,
    fmt: str,
    text_field: str,
    id_field: str | None,
    lang_field: str | None,
    lo: int = 0,
    hi: int | None = None,
):
    """Yield (default id, text value or MISSING, id, lang) of one file or piece of it (a byte
    range of a plain .jsonl, row groups ``[lo, hi)`` of a parquet file); errors name the file."""
    try:
        if fmt == "txt":
            with open(path, "rb") as f:
                yield f"{path}:0", f.read(), None, None
        elif fmt == "jsonl":
            for _, default, rec in jsonl_pieces(path, lo, hi):
                ident = rec.get(id_field) if id_field else None
                lang = rec.get(lang_field) if lang_field else None
                yield default, rec.get(text_field, MISSING), ident, lang
        elif fmt == "parquet":
            pf = pq.ParquetFile(path)
            cols = [c for c in (text_field, id_field, lang_field) if c]
            for col in cols:
                if col not in pf.schema_arrow.names:
                    raise CorpusError(f"{path}: no column {col!r} (has {pf.schema_arrow.names})")
            groups = list(range(lo, pf.num_row_groups if hi is None else hi))
            n = sum(pf.metadata.row_group(g).num_rows for g in range(lo))
            if not groups:
                return
            for batch in pf.iter_batches(columns=cols, batch_size=1024, row_groups=groups):
                d = batch.to_pydict()
                for j, text in enumerate(d[text_field]):
                    ident = d[id_field][j] if id_field else None
                    yield f"{path}:{n}", text, ident, d[lang_field][j] if lang_field else None
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


def unit_tables(
    unit: dict[str, Any], inputs: list[dict[str, Any]], settings: dict[str, Any]
) -> Iterator[pa.Table]:
    """One work unit -> tables of document rows in record order (split -1 = not kept), each
    holding about ``settings["block_bytes"]`` of text. Raises ``CorpusError`` naming the file."""
    seed, p = str(settings["seed"]).encode(), unit["pass"]
    rows: dict[str, list] = {k: [] for k in DOCS_SCHEMA.names}
    size = 0
    for piece in unit["pieces"]:
        u = inputs[piece["input"]]
        keep = min(1.0, u["weight"] - p)  # keep-probability of a document in this pass
        pass_key = f"{u['source']}/{p}".encode()
        fields = (u["text_field"], u["id_field"], u["lang_field"])
        recs = records(u["path"], u["format"], *fields, piece["lo"], piece["hi"])
        for default, value, ident, lang in recs:
            data, reason = to_bytes(value)
            split = -1
            if data is not None:
                key = b"id:" + str(ident).encode("utf-8", "replace") if ident is not None else data
                if keep < 1.0 and hash01(seed, b"pass", pass_key, key) >= keep:
                    data, reason = None, "sampled_out"
                else:
                    split = int(hash01(seed, b"split", key) < settings["val_fraction"])
            rows["data"].append(data)
            rows["split"].append(split)
            rows["reject"].append(reason)
            rows["ident"].append(str(ident) if ident is not None else default)
            rows["lang"].append(None if lang is None else str(lang))
            size += len(data) if data else 0
            if size >= settings["block_bytes"]:
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

    BOS/EOS are added by the packer (``aunet.packing.Packer.add_documents``) as it copies the
    bytes into its window buffer. ``nbytes``: the document's byte count (0 for a row without data).
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


def _pieces(i: int, inp: dict[str, Any], unit_bytes: int) -> list[dict[str, Any]]:
    """Slices of one input that a unit may hold: byte ranges of a plain .jsonl, runs of row
    groups of a parquet file, else the whole file (a compressed stream cannot be entered midway,
    so a .jsonl.gz is one piece however large)."""
    path, size = inp["path"], int(inp["bytes"])
    if inp["format"] == "jsonl" and path.lower().endswith(".jsonl") and size > unit_bytes:
        return [
            {
                "input": i,
                "lo": lo,
                "hi": min(lo + unit_bytes, size),
                "bytes": min(unit_bytes, size - lo),
            }
            for lo in range(0, size, unit_bytes)
        ]
    if inp["format"] == "parquet" and size > unit_bytes:
        try:
            md = pq.read_metadata(path)
        except (OSError, pa.ArrowException) as e:
            raise CorpusError(f"{path}: cannot read input: {e}") from e
        out, lo, acc = [], 0, 0
        for g in range(md.num_row_groups):
            acc += md.row_group(g).total_byte_size
            if acc >= unit_bytes or g == md.num_row_groups - 1:
                out.append({"input": i, "lo": lo, "hi": g + 1, "bytes": acc})
                lo, acc = g + 1, 0
        return out or [{"input": i, "lo": 0, "hi": None, "bytes": size}]
    return [{"input": i, "lo": 0, "hi": None, "bytes": size}]


def plan_units(inputs: list[dict[str, Any]], unit_bytes: int) -> list[dict[str, Any]]:
    """Work units: consecutive pieces of the inputs of about ``unit_bytes`` each, pass-major so
    that repeated passes never sit side by side. A function of the inputs and ``unit_bytes``
    only, never of the cluster: the units fix where windows stop (docs/data.md, Work units)."""
    passes = max((int(np.ceil(i["weight"])) for i in inputs), default=0)
    units: list[dict[str, Any]] = []
    for p in range(passes):
        pieces: list[dict[str, Any]] = []
        acc = 0
        for i, inp in enumerate(inputs):
            if p >= np.ceil(inp["weight"]):
                continue
            for piece in _pieces(i, inp, unit_bytes):
                pieces.append(piece)
                acc += piece["bytes"]
                if acc >= unit_bytes:
                    units.append({"pass": p, "pieces": pieces, "bytes": acc})
                    pieces, acc = [], 0
        if pieces:
            units.append({"pass": p, "pieces": pieces, "bytes": acc})
    return units
