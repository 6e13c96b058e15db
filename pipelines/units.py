"""One preprocessing work unit, start to finish, inside one Ray task: read, split, pack, write.

A unit (``corpus.plan_units``: a fixed slice of the inputs) is read into document rows, split
(``corpus.encode_batch``, with the Splitter built from the strategy JSON here, in the task), packed
per train/val split into windows of ``T + 1`` (``aunet.packing.Packer``, BOS/EOS added as it
copies) and written as its own shards, ``<split>/u<unit>-<k>.parquet``, straight to the dataset's
filesystem. Then, after its shards, the task writes its commit record ``units/u<unit>.json``: the
unit's statistics, its shards with sizes and hashes, its ``key`` (a hash of what the unit's
bytes depend on) and the Ray node that ran it (for the record only). The driver gets the same
dict back; nothing of the data passes through it.

With a tokenizer (the spec's ``tokenizer:``) the documents are encoded to BPE ids first and the
same packing writes ids (docs/data.md, Token-id datasets).

Windows never cross units, so a unit's output depends on the unit alone: the dataset is the same
byte for byte whatever ran where. What a unit's stream cannot fill (its tail) is counted in the
record (docs/data.md, Work units and tails). A rerun reuses a unit whose record exists, has the
same ``key`` and whose shards are present with their sizes (``committed``).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import pyarrow as pa

from aunet.packing import Packer, windows
from aunet.tokenizer import BPETokenizer
from pipelines import corpus, storage
from pipelines.data import SPLITS, token_dtype, write_shard

REJECT_SAMPLE = 20  # rejected document ids kept per unit (and in the manifest)


def record_path(base: str, unit: int) -> str:
    return storage.join(base, "units", f"u{unit:06d}.json")


def shard_name(unit: int, k: int) -> str:
    return f"u{unit:06d}-{k:04d}.parquet"


def committed(fs: Any, base: str, unit: int, key: str) -> dict[str, Any] | None:
    """The unit's commit record if there is one for ``key``, else None (its shards are checked
    against one listing per split by the caller: ``shards_present``)."""
    raw = storage.read_bytes(fs, record_path(base, unit))
    try:
        rec = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    if not isinstance(rec, dict) or rec.get("key") != key:
        return None
    return rec


def shards_present(rec: dict[str, Any], listing: dict[str, dict[str, int]]) -> bool:
    """Every shard of a record is in ``listing`` (split -> name -> size) with its size."""
    return all(
        listing[s].get(sh["file"]) == sh["bytes"]
        for s in SPLITS
        for sh in rec["splits"][s]["shards"]
    )


def _runs(split: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(split, first row, end row, documents) of each run of kept rows with the same split.

    Rows of other splits end a run; rejected rows (-1) inside one do not (they hold no bytes).
    """
    kept = np.flatnonzero(split >= 0)
    if not len(kept):
        return []
    vals = split[kept]
    cut = np.flatnonzero(np.diff(vals)) + 1
    starts, ends = np.r_[0, cut], np.r_[cut, len(kept)]
    return [
        (int(vals[a]), int(kept[a]), int(kept[b - 1]) + 1, int(b - a)) for a, b in zip(starts, ends)
    ]


def _binary(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A large_binary column -> (values uint8, offsets int64 [rows + 1]), views without a copy."""
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    bufs = column.buffers()
    offsets = np.frombuffer(bufs[1], np.int64)[column.offset : column.offset + len(column) + 1]
    values = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return values, offsets


class _SplitWriter:
    """One train/val stream of a unit: packs documents and writes each full chunk as a shard.

    With a tokenizer (``tok``) the documents are token ids: positions count tokens, ``bytes``
    counts the text they stand for, and the last ``T + 2`` positions' byte lengths are kept so
    the tail's bytes are exact even for a document cut inside it (docs/data.md, Token-id
    datasets).
    """

    def __init__(
        self, fs: Any, base: str, split: str, unit: int, T: int, rows: int, K: int, tok: Any = None
    ):
        self.fs, self.dir, self.unit, self.T, self.K = fs, storage.join(base, split), unit, T, K
        self.tok = tok
        self.dtype = token_dtype(None if tok is None else tok.vocab_size)
        specials = {} if tok is None else {"bos_id": tok.bos_id, "eos_id": tok.eos_id}
        self.packer = Packer(T, chunk=rows, dtype=self.dtype, **specials)
        self.shards: list[dict[str, Any]] = []
        self.lengths: list[np.ndarray] = []
        self.byte_lengths: list[np.ndarray] = []
        self.recent = np.zeros(0, np.int64)  # byte length of the stream's last T + 2 positions
        self.points = np.zeros(K, np.int64)
        self.peak = np.zeros(K, np.int64)
        self.sequences = 0
        self.fs.create_dir(self.dir, recursive=True)

    def add(
        self,
        data: np.ndarray,
        levels: np.ndarray,
        lengths: np.ndarray,
        byte_lengths: np.ndarray | None = None,
    ) -> None:
        """Documents back to back: ``data`` bytes (or ids) [N], ``levels`` [N], ``lengths`` [n]
        positions per document, ``byte_lengths`` [n] text bytes per document (ids only)."""
        lengths = np.asarray(lengths, np.int64)
        self.lengths.append(lengths)
        if self.tok is not None:
            self.byte_lengths.append(np.asarray(byte_lengths, np.int64))
            doc = np.repeat(np.arange(len(lengths)), lengths)
            pos = np.zeros(int(lengths.sum()) + 2 * len(lengths), np.int64)
            pos[np.arange(len(data)) + 2 * doc + 1] = self.tok.token_lengths[data]
            self.recent = np.concatenate([self.recent, pos])[-(self.T + 2) :]
        for tok, lev in self.packer.add_documents(data, levels, lengths, self.K):
            self._write(tok, lev)

    def _write(self, tok: np.ndarray, lev: np.ndarray) -> None:
        tw, lw = windows(tok, lev, self.T)
        name = storage.join(self.dir, shard_name(self.unit, len(self.shards)))
        self.shards.append(write_shard(self.fs, name, tw, lw, self.sequences, self.dtype))
        self.sequences += len(tw)
        inputs = lw[:, :-1]  # split points of what the model reads: each window's T inputs
        for s in range(1, self.K + 1):
            per_seq = (inputs >= s).sum(1)
            self.points[s - 1] += int(per_seq.sum())
            self.peak[s - 1] = max(int(self.peak[s - 1]), int(per_seq.max(initial=0)))

    def finish(self) -> dict[str, Any]:
        last, dropped = self.packer.finish()
        if last is not None:
            self._write(*last)
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        tokens = int((lengths + 2).sum())
        n, T = self.sequences, self.T
        if n != self.packer.windows_out or tokens != (n * T + 1 if n else 0) + dropped:
            raise AssertionError(f"unit {self.unit}: packer lost tokens ({tokens} in, {n} seqs)")
        tail = tail_counts(lengths, n * T + 1 if n else 0)
        text_bytes = int(lengths.sum())
        if self.tok is not None:
            text_bytes = int(sum(int(b.sum()) for b in self.byte_lengths))
            if tail["tokens"] > len(self.recent):
                raise AssertionError(f"unit {self.unit}: a tail of {tail['tokens']} > T + 2")
            tail["bytes"] = int(self.recent[len(self.recent) - tail["tokens"] :].sum())
        return {
            "documents": len(lengths),
            "bytes": text_bytes,
            "tokens": tokens,
            "sequences": n,
            "tail": tail,
            "shards": self.shards,
            "split_points": self.points.tolist(),
            "max_split_points_per_sequence": self.peak.tolist(),
        }


def tail_counts(lengths: np.ndarray, covered: int) -> dict[str, int]:
    """What of a unit's stream no window holds: stream positions ``>= covered`` (docs/data.md).

    Document ``i`` occupies positions ``[s_i, s_i + L_i + 2)`` (BOS, bytes, EOS). ``tokens``: the
    positions past ``covered``; ``bytes``: text bytes among them; ``documents_lost``: documents
    with no position in any window (BOS at or past ``covered``); ``documents_cut``: documents
    with positions on both sides of ``covered``.
    """
    ends = np.cumsum(lengths + 2)
    starts = ends - (lengths + 2)
    total = int(ends[-1]) if len(ends) else 0
    first_byte, end_byte = starts + 1, starts + 1 + lengths
    lost_bytes = np.clip(end_byte - np.maximum(first_byte, covered), 0, None)
    return {
        "tokens": total - covered,
        "bytes": int(lost_bytes.sum()),
        "documents_lost": int((starts >= covered).sum()),
        "documents_cut": int(((starts < covered) & (ends > covered)).sum()),
    }


class _Counts:
    """Document accounting of a unit, checked at the end: read == written + rejected + sampled."""

    def __init__(self) -> None:
        self.read = self.written = 0
        self.reasons: dict[str, int] = {}
        self.sample: list[dict[str, str]] = []
        self.langs: dict[str, dict[str, int]] = {}

    def add(self, batch: pa.Table, cap: int | None) -> tuple[pa.Table, bool]:
        """Count a batch of document rows; cut it at the ``cap``-th written document."""
        split = batch.column("split").to_numpy()
        stop = False
        if cap is not None and self.written + int((split >= 0).sum()) >= cap:
            kept = np.flatnonzero(split >= 0)
            last = int(kept[cap - self.written - 1]) if cap > self.written else -1
            batch, split, stop = batch.slice(0, last + 1), split[: last + 1], True
        cols = {c: batch.column(c).to_pylist() for c in ("reject", "ident", "lang", "nbytes")}
        for sp, reason, ident, lang, n in zip(split, *cols.values()):
            if lang is not None:
                st = self.langs.setdefault(lang, {"documents": 0, "bytes": 0, "rejected": 0})
            if sp >= 0:
                if lang is not None:
                    st["documents"] += 1
                    st["bytes"] += n
                continue
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
            if reason != "sampled_out":
                if lang is not None:
                    st["rejected"] += 1
                if len(self.sample) < REJECT_SAMPLE:
                    self.sample.append({"id": ident, "reason": reason})
        self.read += len(split)
        self.written += int((split >= 0).sum())
        return batch, stop


def run_unit(
    index: int,
    unit: dict[str, Any],
    inputs: list[dict[str, Any]],
    ctx: dict[str, Any],
    tokenizer_json: str | None = None,
) -> dict[str, Any]:
    """The Ray task: unit ``index`` -> its shards and commit record; returns the record.

    ``ctx``: dataset location, strategy JSON, seq_len, shard_sequences, seed, val_fraction,
    block_bytes, the unit's ``key`` and document ``cap`` (``data.max_documents`` left for this
    unit, or None). ``tokenizer_json``: a ``BPETokenizer``'s JSON for token-id shards, None for
    bytes. A ``CorpusError`` comes back as ``{"error": message}``: the driver raises it
    as one line naming the file, where a raised exception would be retried and logged by Ray.
    """
    import time

    t0 = time.perf_counter()
    try:
        record = _run_unit(index, unit, inputs, ctx, tokenizer_json)
    except corpus.CorpusError as e:
        return {"error": str(e)}
    return {**record, "seconds": time.perf_counter() - t0}


@functools.lru_cache(maxsize=2)
def _tokenizer(text: str) -> BPETokenizer:
    """Built once per worker process for the units it runs (HF builds its merge table)."""
    return BPETokenizer.from_json(text)


def _token_runs(
    writers: list[_SplitWriter], tok: BPETokenizer, batch: pa.Table, text: dict[str, Any]
) -> None:
    """Token-id path of a batch: encode its kept documents, pack each split's runs, and count
    text bytes and tokens per split and language (``text``; bytes/token in the manifest)."""
    split = batch.column("split").to_numpy()
    docs = batch.column("data").to_pylist()
    nbytes = batch.column("nbytes").to_numpy().astype(np.int64)
    langs = batch.column("lang").to_pylist()
    kept = np.flatnonzero(split >= 0)
    encoded = tok.encode_batch([docs[i] for i in kept.tolist()])
    ntok = np.zeros(len(split), np.int64)
    ntok[kept] = [len(e) for e in encoded]
    ids = np.concatenate(encoded) if encoded else np.zeros(0, np.int64)
    offsets = np.zeros(len(split) + 1, np.int64)
    np.cumsum(ntok, out=offsets[1:])
    for i in kept.tolist():
        per = text.setdefault(SPLITS[split[i]], {})
        for key in ("all", langs[i]) if langs[i] is not None else ("all",):
            acc = per.setdefault(key, {"bytes": 0, "tokens": 0})
            acc["bytes"] += int(nbytes[i])
            acc["tokens"] += int(ntok[i])
    for s, start, stop_row, _ in _runs(split):
        a, b = int(offsets[start]), int(offsets[stop_row])
        mine = split[start:stop_row] == s
        writers[s].add(
            ids[a:b],
            np.zeros(b - a, np.uint8),
            ntok[start:stop_row][mine],
            nbytes[start:stop_row][mine],
        )


def _run_unit(
    index: int,
    unit: dict[str, Any],
    inputs: list[dict[str, Any]],
    ctx: dict[str, Any],
    tokenizer_json: str | None = None,
) -> dict[str, Any]:
    fs, base = storage.resolve(ctx["dataset"])
    K = len(json.loads(ctx["strategy_json"]))
    tok = None if tokenizer_json is None else _tokenizer(tokenizer_json)
    writers = [
        _SplitWriter(fs, base, s, index, ctx["seq_len"], ctx["shard_sequences"], K, tok)
        for s in SPLITS
    ]
    counts = _Counts()
    text: dict[str, Any] = {}  # split -> "all" | lang -> text bytes and tokens (token ids only)
    for table in corpus.unit_tables(unit, inputs, ctx):
        batch = corpus.encode_batch(table, ctx["strategy_json"])
        batch, stop = counts.add(batch, ctx["cap"])
        if tok is not None:
            _token_runs(writers, tok, batch, text)
            if stop:
                break
            continue
        data, offsets = _binary(batch.column("data"))
        levels, lev_offsets = _binary(batch.column("levels"))
        split = batch.column("split").to_numpy()
        base_off = int(offsets[0]) if len(offsets) else 0
        if not np.array_equal(offsets - base_off, lev_offsets - int(lev_offsets[0])):
            raise AssertionError(f"unit {index}: data and levels are not aligned")
        for s, start, stop_row, _ in _runs(split):
            a, b = int(offsets[start]), int(offsets[stop_row])
            lengths = np.diff(offsets[start : stop_row + 1])[split[start:stop_row] == s]
            la = a - base_off + int(lev_offsets[0])
            writers[s].add(data[a:b], levels[la : la + b - a], lengths)
        if stop:
            break
    per_split = {s: w.finish() for s, w in zip(SPLITS, writers)}
    sampled = counts.reasons.pop("sampled_out", 0)
    rejected = sum(counts.reasons.values())
    written = sum(v["documents"] for v in per_split.values())
    if counts.read != counts.written + rejected + sampled or counts.written != written:
        raise AssertionError(
            f"unit {index}: count identity broken: read {counts.read}, written {counts.written}, "
            f"rejected {rejected}, sampled out {sampled}"
        )
    import ray

    record = {
        "unit": index,
        "key": ctx["key"],
        "node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
        "documents": {
            "read": counts.read,
            "written": counts.written,
            "rejected": rejected,
            "sampled_out": sampled,
        },
        "rejected": {"counts": counts.reasons, "sample": counts.sample},
        "langs": counts.langs,
        "splits": per_split,
        **({"text_tokens": text} if tok is not None else {}),
    }
    storage.write_bytes(fs, record_path(base, index), json.dumps(record).encode())
    return record
