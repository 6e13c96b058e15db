"""The packed dataset on disk, and the training-side reader.

Layout (written by ``pipelines.preprocess``)::

    <dataset>/manifest.json           written last: a dataset without it is incomplete
    <dataset>/{train,val}/shard-00000.parquet ...
        tokens  fixed_size_list<uint16>[T+1]   inputs = [:-1], targets = [1:] (uint32: BPE ids
                                               over 65536, docs/data.md, Token-id datasets)
        levels  fixed_size_list<uint8>[T+1]    pooling level of each token (BOS = K, EOS = 0)
        index   int64                          sequence id within its work unit (see below)

The global sequence id of a row is its position in the split, shards taken in manifest order
(``start`` in each shard entry is the id of its first row); the ``index`` column holds the id
within the row's work unit, since a task writes its shards before the unit's global start is
known (docs/data.md, Layout). Datasets may live on any ``pyarrow.fs`` URI (``pipelines.storage``).

Reading for training streams (``ShardReader``): a worker's memory does not grow with the corpus.
Global batches are drawn from a permutation of the whole split seeded by (seed, epoch), so the rows
of one batch are scattered over all shards and no sequential order exists to stream in; access is
random per batch. A row id maps to (shard, row in shard) through the manifest's ``start``s
(``searchsorted``), a batch's rows are grouped by Parquet row group (256 rows, as written by
``write_shard``), and each group is read on demand through ``pyarrow.fs`` (a local path or any
URI: Parquet reads just that group's byte range) and decoded into a small bounded LRU. Parquet
row groups were kept rather than converting to memory-mapped Arrow IPC: the shard format stays
the one preprocessing writes (no second copy of the corpus, no conversion step per node), it
works unchanged on object stores where memory mapping does not exist, and the cost, decoding up
to 256 rows per row wanted, is a few milliseconds per batch against a model step of hundreds
(tests/benchmarks/reader.py measures both). A background thread reads the next batches while the
current one trains; all reading happens on that thread, so the cache needs no lock.
Rank r of W takes rows [r B/W, (r+1) B/W) of every global batch, so the global batch does not depend
on W. ``DataPosition`` (epoch, next batch) is all the state there is: a checkpoint that stores
``batch.position`` resumes at the first batch it has not seen, with no repeat and no skip.
``load_split`` (a whole split in memory) remains as the obvious reference the tests compare with.

Length: the shard format, the manifest checks, the in-memory reference and the streaming reader
share one module (about 560 lines) because the reader's correctness is defined against the other
three; splitting them would only add an import edge between two halves of one contract.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import storage

if TYPE_CHECKING:  # torch is imported where batches are built: preprocessing tasks skip it
    import torch

    from aunet.tokenizer import BPETokenizer


class DatasetError(ValueError):
    """A dataset on storage does not match its manifest (a damaged or swapped file): the command
    lines report it in one line (``pipelines.cli``)."""


FORMAT_VERSION = 2  # 2: per-unit shards, windows never cross units
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int | None) -> type:
    """The ``tokens`` column's type: uint16 for bytes (None) and vocabularies up to 65536 ids,
    else uint32 (docs/data.md, Token-id datasets)."""
    return np.uint16 if vocab_size is None or vocab_size <= 1 << 16 else np.uint32


def manifest_token_dtype(manifest: dict[str, Any]) -> type:
    """``token_dtype`` of a dataset: its tokenizer's vocabulary, or bytes."""
    tok = manifest.get("tokenizer")
    return token_dtype(tok["vocab_size"] if isinstance(tok, dict) else None)


def write_shard(
    fs: pafs.FileSystem,
    path: str,
    tokens: np.ndarray,
    levels: np.ndarray,
    start: int,
    token_dtype: type = np.uint16,
) -> dict[str, Any]:
    """Write windows ``tokens``/``levels`` [n, T+1] with ids ``start..start+n-1`` to ``path`` on
    ``fs``; return its manifest entry (name, rows, size, SHA-256 of the file). ``token_dtype``:
    uint16, or uint32 for a vocabulary over 65536 ids (``token_dtype()``).

    The file is encoded in memory and sent in one write: its size and hash are known without
    reading it back, and an object store gets one upload.
    """
    n, width = tokens.shape
    table = pa.table(
        {
            "tokens": pa.FixedSizeListArray.from_arrays(
                pa.array(tokens.astype(token_dtype, copy=False).ravel()), width
            ),
            "levels": pa.FixedSizeListArray.from_arrays(
                pa.array(levels.astype(np.uint8, copy=False).ravel()), width
            ),
            "index": pa.array(np.arange(start, start + n, dtype=np.int64)),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(  # no dictionary/statistics: they cost more than the compression here
        table,
        sink,
        compression="zstd",
        compression_level=1,
        use_dictionary=False,
        write_statistics=False,
        use_byte_stream_split=True,
        row_group_size=256,
    )
    buf = sink.getvalue()
    with fs.open_output_stream(path) as f:
        f.write(buf)
    name = path.rsplit("/", 1)[-1]
    return {
        "file": name,
        "sequences": n,
        "bytes": buf.size,
        "sha256": hashlib.sha256(buf).hexdigest(),
    }


def _manifest(path: str | os.PathLike) -> tuple[pafs.FileSystem, str, dict[str, Any] | None]:
    fs, base = storage.resolve(str(path))
    raw = storage.read_bytes(fs, storage.join(base, MANIFEST))
    try:
        return fs, base, None if raw is None else json.loads(raw)
    except ValueError:
        return fs, base, None


def is_complete(path: str | os.PathLike) -> bool:
    """True iff ``path`` (a directory or URI) holds a finished dataset: a manifest, and every
    shard it lists present with its recorded size (one listing per split directory)."""
    try:
        fs, base, manifest = _manifest(path)
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        return False
    if manifest.get("format_version") != FORMAT_VERSION:
        return False
    try:
        for split in SPLITS:
            present = storage.sizes(fs, storage.join(base, split))
            for shard in manifest["splits"][split]["shards"]:
                if present.get(shard["file"]) != shard["bytes"]:
                    return False
    except (KeyError, TypeError, OSError):
        return False
    return True


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete dataset; a clear error for a missing or half-written one."""
    if not is_complete(path):
        raise FileNotFoundError(
            f"{path}: not a complete dataset (no valid {MANIFEST} or shards missing); "
            "run `python -m pipelines.preprocess <experiment.yaml>`"
        )
    return _manifest(path)[2]  # type: ignore[return-value]


def manifest_tokenizer(
    path: str | os.PathLike, manifest: dict[str, Any] | None = None
) -> BPETokenizer | None:
    """The dataset's ``BPETokenizer`` (``tokenizer.json`` next to the manifest), None for a byte
    dataset. The file must hash to the manifest's ``tokenizer.sha256``: ids mean nothing under
    another vocabulary, so a mismatch is an error, never a warning."""
    from aunet.tokenizer import BPETokenizer

    manifest = manifest if manifest is not None else read_manifest(path)
    entry = manifest.get("tokenizer")
    if entry is None:
        return None
    fs, base = storage.resolve(str(path))
    where = f"{path}/{entry['file']}"
    raw = storage.read_bytes(fs, storage.join(base, entry["file"]))
    if raw is None:
        raise FileNotFoundError(f"{where}: missing; the manifest names it (rebuild the dataset)")
    try:
        tok = BPETokenizer.from_json(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"{where}: {e}") from None
    if tok.sha256 != entry["sha256"] or tok.vocab_size != entry["vocab_size"]:
        raise DatasetError(
            f"{where}: sha256 {tok.sha256[:12]} (vocab {tok.vocab_size}) is not the manifest's "
            f"{entry['sha256'][:12]} (vocab {entry['vocab_size']}): the shards were written with "
            "another tokenizer; rebuild with `python -m pipelines.preprocess <spec> --force`"
        )
    return tok


def _shard_files(path: str | os.PathLike, split: str) -> list[str]:
    """Shard locations of a split in manifest order: local paths, or URIs for a remote dataset."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = read_manifest(path)
    root = str(path)
    join = storage.join if "://" in root else os.path.join
    return [join(root, split, s["file"]) for s in manifest["splits"][split]["shards"]]


def _expected_index(shards: list[dict[str, Any]]) -> np.ndarray:
    """The ``index`` column a split's shards hold: ids within their work unit, consecutive over
    the unit's shards (a task numbers its windows before it knows the unit's global start)."""
    parts, unit, k = [], None, 0
    for s in shards:
        if s.get("unit") != unit:
            unit, k = s.get("unit"), 0
        parts.append(np.arange(k, k + s["sequences"], dtype=np.int64))
        k += s["sequences"]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def load_split(path: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """All windows of a split: (tokens [N, T+1] uint16 or uint32, levels [N, T+1] uint8), in id
    order."""
    manifest = read_manifest(path)
    width, dtype = manifest["seq_len"] + 1, manifest_token_dtype(manifest)
    files = _shard_files(path, split)
    if not files:
        return np.zeros((0, width), dtype), np.zeros((0, width), np.uint8)
    fs, base = storage.resolve(str(path))
    names = [storage.join(base, split, s["file"]) for s in manifest["splits"][split]["shards"]]
    table = pq.read_table(names, filesystem=fs, memory_map=isinstance(fs, pafs.LocalFileSystem))

    def column(name: str, dtype) -> np.ndarray:
        chunks = [c.values.to_numpy(zero_copy_only=False) for c in table.column(name).chunks]
        return np.concatenate(chunks).astype(dtype, copy=False).reshape(-1, width)

    tokens, levels = column("tokens", dtype), column("levels", np.uint8)
    index = table.column("index").to_numpy()
    if not np.array_equal(index, _expected_index(manifest["splits"][split]["shards"])):
        raise ValueError(f"{path}/{split}: sequence ids do not match the manifest's shards")
    return tokens, levels


def ray_dataset(path: str | os.PathLike, split: str = "train"):
    """The split as a ``ray.data.Dataset`` (columns tokens, levels, index) for ``TorchTrainer``."""
    import ray.data

    files = _shard_files(path, split)
    if not files:
        raise ValueError(f"{path}: split {split!r} has no sequences")
    return ray.data.read_parquet(files)


@dataclass(frozen=True)
class DataPosition:
    """Where the next batch comes from: ``epoch`` and batch index in it. Save it in checkpoints."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> DataPosition:
        return cls(epoch=int(d["epoch"]), batch=int(d["batch"]))


@dataclass(frozen=True)
class Batch:
    """One rank's part of a global batch; ``tokens, levels, targets = batch`` unpacks the tensors.

    tokens, levels, targets, target_levels: int64 [B/W, T]; ids: global sequence ids [B/W] of the
    split; position: the position *after* this batch (store it with a checkpoint taken after this
    step). ``target_levels`` (the levels of the targets) feed the model's auxiliary level loss
    when ``lambda_level > 0`` (paper, Section 2); ``model_inputs`` gives all four in forward order.
    """

    tokens: torch.Tensor
    levels: torch.Tensor
    targets: torch.Tensor
    ids: np.ndarray
    position: DataPosition
    target_levels: torch.Tensor | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.tokens, self.levels, self.targets))

    def model_inputs(self) -> tuple[torch.Tensor, ...]:
        """(tokens, levels, targets, target_levels): the arguments of ``AUNet.forward``."""
        return (self.tokens, self.levels, self.targets, self.target_levels)


def _batch(tok: np.ndarray, lev: np.ndarray, ids: np.ndarray, pos: DataPosition) -> Batch:
    """A batch from the windows ``tok``/``lev`` [b, T+1] of the sequences ``ids`` [b]."""
    import torch

    t = torch.from_numpy(tok.astype(np.int64))  # [b, T+1]
    lv = torch.from_numpy(lev.astype(np.int64))
    return Batch(t[:, :-1], lv[:, :-1], t[:, 1:], ids.astype(np.int64), pos, lv[:, 1:])


def _local_rows(batch_size: int, rank: int, world_size: int) -> slice:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(f"global batch size {batch_size} is not a multiple of {world_size} ranks")
    per = batch_size // world_size
    return slice(rank * per, (rank + 1) * per)


class ShardReader:
    """Rows of one split by global id, read on demand by Parquet row group (module docstring).

    At most ``max_row_groups`` decoded row groups are held (``held``; ``peak_held`` is the most
    ever held, what the memory test counts), plus the footers of at most ``max_open`` open shards.
    Not thread-safe: one thread reads (the prefetch thread of ``TrainBatches``/``val_batches``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str,
        *,
        max_row_groups: int = 64,
        max_open: int = 8,
        manifest: dict[str, Any] | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        manifest = manifest if manifest is not None else read_manifest(path)
        shards = manifest["splits"][split]["shards"]
        self.path, self.split, self.width = str(path), split, manifest["seq_len"] + 1
        self.dtype = manifest_token_dtype(manifest)
        self.fs, base = storage.resolve(str(path))
        self.files = [storage.join(base, split, s["file"]) for s in shards]
        self.names = [s["file"] for s in shards]
        counts = np.array([s["sequences"] for s in shards], dtype=np.int64)
        self.starts = np.cumsum(counts) - counts  # global id of each shard's first row
        for s, want in zip(shards, self.starts):
            if s.get("start", want) != want:
                raise ValueError(
                    f"{path}/{split}/{s['file']}: manifest start {s['start']} != {want}"
                )
        self.num_sequences = int(counts.sum())
        first = _expected_index(shards)  # the unit-local id of each shard's first row
        self.unit_first = np.zeros(len(shards), np.int64)
        self.unit_first[counts > 0] = first[self.starts[counts > 0]]
        self.counts = counts
        self.max_row_groups, self.max_open = max(1, max_row_groups), max(1, max_open)
        self._groups: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # LRU (dict order)
        self._open: dict[int, tuple[pq.ParquetFile, np.ndarray]] = {}  # shard -> (file, bounds)
        self.peak_held = 0
        self.row_groups_read = 0

    @property
    def held(self) -> int:
        return len(self._groups)

    def _file(self, shard: int) -> tuple[pq.ParquetFile, np.ndarray]:
        """The open shard and its row-group bounds [g+1] (cumulative rows), LRU over shards."""
        hit = self._open.pop(shard, None)
        if hit is None:
            f = pq.ParquetFile(self.fs.open_input_file(self.files[shard]))
            md = f.metadata
            sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
            hit = (f, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
            if hit[1][-1] != self.counts[shard]:
                raise ValueError(
                    f"{self.path}/{self.split}/{self.names[shard]}: {hit[1][-1]} rows, "
                    f"manifest says {self.counts[shard]}"
                )
            if len(self._open) >= self.max_open:
                self._open.pop(next(iter(self._open)))
        self._open[shard] = hit
        return hit

    def _group(self, shard: int, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded row group ``g`` of ``shard``: (tokens, levels) [rows, T+1], ids checked."""
        key = (shard, g)
        hit = self._groups.pop(key, None)
        if hit is None:
            f, bounds = self._file(shard)
            table = f.read_row_group(g, columns=["tokens", "levels", "index"])

            def column(name: str, dtype) -> np.ndarray:
                chunks = [
                    c.values.to_numpy(zero_copy_only=False) for c in table.column(name).chunks
                ]
                return np.concatenate(chunks).astype(dtype, copy=False).reshape(-1, self.width)

            hit = (column("tokens", self.dtype), column("levels", np.uint8))
            first = self.unit_first[shard] + bounds[g]
            want = np.arange(first, first + len(hit[0]), dtype=np.int64)
            if not np.array_equal(table.column("index").to_numpy(), want):
                raise ValueError(
                    f"{self.path}/{self.split}/{self.names[shard]}: row group {g} sequence ids "
                    "do not match the manifest's shards"
                )
            self.row_groups_read += 1
            while len(self._groups) >= self.max_row_groups:
                self._groups.pop(next(iter(self._groups)))
        self._groups[key] = hit
        self.peak_held = max(self.peak_held, len(self._groups))
        return hit

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows of the sequences ``ids`` [b] (global ids, any order): tokens, levels [b, T+1]."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_sequences):
            raise IndexError(f"sequence ids outside 0..{self.num_sequences - 1}")
        tok = np.empty((len(ids), self.width), self.dtype)
        lev = np.empty((len(ids), self.width), np.uint8)
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        local = ids - self.starts[shard]
        for s in np.unique(shard):  # each shard's and row group's rows together: one read each
            mine = np.flatnonzero(shard == s)
            bounds = self._file(int(s))[1]
            group = np.searchsorted(bounds, local[mine], side="right") - 1
            for g in np.unique(group):
                sel = mine[group == g]
                gt, gl = self._group(int(s), int(g))
                tok[sel] = gt[local[sel] - bounds[g]]
                lev[sel] = gl[local[sel] - bounds[g]]
        return tok, lev


def _prefetched(jobs: Iterator[Any], fetch, depth: int) -> Iterator[Any]:
    """``fetch(job)`` for each job, computed ``depth`` jobs ahead on one background thread."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aunet-reader")
    pending: deque = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(fetch, job))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=False)


class TrainBatches:
    """Endless, resumable, rank-sharded global batches over a split (see the module docstring).

    ``arrays`` (tokens, levels of the whole split, as ``load_split`` returns) reads from memory
    instead of the shards; otherwise a ``ShardReader`` holds at most ``max_row_groups`` row groups
    and ``prefetch`` batches are read ahead in the background.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        position: DataPosition | None = None,
        split: str = "train",
        arrays: tuple[np.ndarray, np.ndarray] | None = None,
        max_row_groups: int = 64,
        prefetch: int = 2,
    ):
        self.local = _local_rows(batch_size, rank, world_size)
        if arrays is not None:
            self.reader, self.arrays = None, arrays
            n = len(arrays[0])
        else:
            self.reader = ShardReader(path, split, max_row_groups=max_row_groups)
            self.arrays, n = None, self.reader.num_sequences
        if n < batch_size:
            raise ValueError(f"{path}: split {split!r} has {n} sequences < batch size {batch_size}")
        self.num_sequences, self.prefetch = n, max(0, prefetch)
        self.batch_size, self.seed = batch_size, seed
        self.batches_per_epoch = n // batch_size  # the last partial batch of an epoch is dropped
        self.position = position or DataPosition()
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, permutation) of global_ids
        if self.position.batch >= self.batches_per_epoch:
            raise ValueError(f"position {self.position} past the {self.batches_per_epoch} batches")

    def global_ids(self, position: DataPosition) -> np.ndarray:
        """Sequence ids of the global batch at ``position`` (all ranks together), [B]."""
        if self._perm is None or self._perm[0] != position.epoch:  # once per epoch, not per step
            rng = np.random.default_rng([self.seed, position.epoch])
            self._perm = (position.epoch, rng.permutation(self.num_sequences))
        perm = self._perm[1]
        b = position.batch * self.batch_size
        return perm[b : b + self.batch_size]

    def _plan(self, pos: DataPosition) -> Iterator[tuple[np.ndarray, DataPosition]]:
        """(this rank's ids, position after the batch) from ``pos`` on: ids only, no data."""
        perm_epoch, perm = None, None
        while True:
            if perm_epoch != pos.epoch:
                perm = np.random.default_rng([self.seed, pos.epoch]).permutation(self.num_sequences)
                perm_epoch = pos.epoch
            b = pos.batch * self.batch_size
            rows = perm[b : b + self.batch_size][self.local]
            nxt = pos.batch + 1
            pos = (
                DataPosition(pos.epoch, nxt)
                if nxt < self.batches_per_epoch
                else DataPosition(pos.epoch + 1, 0)
            )
            yield rows, pos

    def _fetch(self, job: tuple[np.ndarray, DataPosition]) -> Batch:
        rows, pos = job
        if self.reader is None:
            tok, lev = self.arrays[0][rows], self.arrays[1][rows]
        else:
            tok, lev = self.reader.rows(rows)
        return _batch(tok, lev, rows, pos)

    def __iter__(self) -> Iterator[Batch]:
        jobs = self._plan(self.position)
        stream = (
            _prefetched(jobs, self._fetch, self.prefetch)
            if self.prefetch and self.reader is not None
            else map(self._fetch, jobs)
        )
        for batch in stream:
            self.position = batch.position
            yield batch


def val_batches(
    path: str | os.PathLike,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
    split: str = "val",
    max_row_groups: int = 16,
) -> Iterator[Batch]:
    """Validation batches in id order (fixed); a last partial batch is cut to a multiple of W rows
    and shared evenly, so every rank yields the same number of batches. Read like training
    (``ShardReader``, one batch ahead), so memory does not grow with the split either."""
    _local_rows(batch_size, rank, world_size)
    reader = ShardReader(path, split, max_row_groups=max_row_groups)
    n = reader.num_sequences

    def jobs() -> Iterator[tuple[np.ndarray, DataPosition]]:
        for i, start in enumerate(range(0, n, batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            size = min(batch_size, n - start) // world_size * world_size
            if size == 0:
                return
            per = size // world_size
            yield np.arange(start + rank * per, start + (rank + 1) * per), DataPosition(0, i + 1)

    def fetch(job: tuple[np.ndarray, DataPosition]) -> Batch:
        tok, lev = reader.rows(job[0])
        return _batch(tok, lev, job[0], job[1])

    yield from _prefetched(jobs(), fetch, 1)
