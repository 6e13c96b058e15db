"""The packed dataset on disk, and the training-side reader.

Layout (written by ``pipelines.preprocess``)::

    <dataset>/manifest.json           written last: a dataset without it is incomplete
    <dataset>/{train,val}/shard-00000.parquet ...
        tokens  fixed_size_list<uint16>[T+1]   inputs = [:-1], targets = [1:]
        levels  fixed_size_list<uint8>[T+1]    pooling level of each token (BOS = K, EOS = 0)
        index   int64                          sequence id within its work unit (see below)

The global sequence id of a row is its position in the split, shards taken in manifest order
(``start`` in each shard entry is the id of its first row); the ``index`` column holds the id
within the row's work unit, since a task writes its shards before the unit's global start is
known (docs/data.md, Layout). Datasets may live on any ``pyarrow.fs`` URI (``pipelines.storage``).

The reader keeps a whole split in memory (the datasets this platform trains on are small; a split of
N windows costs 3 (T+1) N bytes) and draws global batches from a permutation seeded by
(seed, epoch).
Rank r of W takes rows [r B/W, (r+1) B/W) of every global batch, so the global batch does not depend
on W. ``DataPosition`` (epoch, next batch) is all the state there is: a checkpoint that stores
``batch.position`` resumes at the first batch it has not seen, with no repeat and no skip.
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

FORMAT_VERSION = 2  # 2: per-unit shards, windows never cross units
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def write_shard(
    fs: pafs.FileSystem, path: str, tokens: np.ndarray, levels: np.ndarray, start: int
) -> dict[str, Any]:
    """Write windows ``tokens``/``levels`` [n, T+1] with ids ``start..start+n-1`` to ``path`` on
    ``fs``; return its manifest entry (name, rows, size, SHA-256 of the file).

    The file is encoded in memory and sent in one write: its size and hash are known without
    reading it back, and an object store gets one upload.
    """
    n, width = tokens.shape
    table = pa.table(
        {
            "tokens": pa.FixedSizeListArray.from_arrays(
                pa.array(tokens.astype(np.uint16, copy=False).ravel()), width
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
    """All windows of a split: (tokens [N, T+1] uint16, levels [N, T+1] uint8), in id order."""
    manifest = read_manifest(path)
    width = manifest["seq_len"] + 1
    files = _shard_files(path, split)
    if not files:
        return np.zeros((0, width), np.uint16), np.zeros((0, width), np.uint8)
    fs, base = storage.resolve(str(path))
    names = [storage.join(base, split, s["file"]) for s in manifest["splits"][split]["shards"]]
    table = pq.read_table(names, filesystem=fs, memory_map=isinstance(fs, pafs.LocalFileSystem))

    def column(name: str, dtype) -> np.ndarray:
        chunks = [c.values.to_numpy(zero_copy_only=False) for c in table.column(name).chunks]
        return np.concatenate(chunks).astype(dtype, copy=False).reshape(-1, width)

    tokens, levels = column("tokens", np.uint16), column("levels", np.uint8)
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

    tokens, levels, targets: int64 [B/W, T]; ids: global sequence ids [B/W] of the split;
    position: the position *after* this batch (store it with a checkpoint taken after this step).
    """

    tokens: torch.Tensor
    levels: torch.Tensor
    targets: torch.Tensor
    ids: np.ndarray
    position: DataPosition

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.tokens, self.levels, self.targets))


def _batch(tok: np.ndarray, lev: np.ndarray, rows: np.ndarray, pos: DataPosition) -> Batch:
    import torch

    t = torch.from_numpy(tok[rows].astype(np.int64))  # [B, T+1]
    lv = torch.from_numpy(lev[rows, :-1].astype(np.int64))
    return Batch(t[:, :-1], lv, t[:, 1:], rows.astype(np.int64), pos)


def _local_rows(batch_size: int, rank: int, world_size: int) -> slice:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(f"global batch size {batch_size} is not a multiple of {world_size} ranks")
    per = batch_size // world_size
    return slice(rank * per, (rank + 1) * per)


class TrainBatches:
    """Endless, resumable, rank-sharded global batches over a split (see the module docstring)."""

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
    ):
        self.local = _local_rows(batch_size, rank, world_size)
        self.tokens, self.levels = arrays if arrays is not None else load_split(path, split)
        n = len(self.tokens)
        if n < batch_size:
            raise ValueError(f"{path}: split {split!r} has {n} sequences < batch size {batch_size}")
        self.batch_size, self.seed = batch_size, seed
        self.batches_per_epoch = n // batch_size  # the last partial batch of an epoch is dropped
        self.position = position or DataPosition()
        if self.position.batch >= self.batches_per_epoch:
            raise ValueError(f"position {self.position} past the {self.batches_per_epoch} batches")

    def global_ids(self, position: DataPosition) -> np.ndarray:
        """Sequence ids of the global batch at ``position`` (all ranks together), [B]."""
        rng = np.random.default_rng([self.seed, position.epoch])
        perm = rng.permutation(len(self.tokens))
        b = position.batch * self.batch_size
        return perm[b : b + self.batch_size]

    def __iter__(self) -> Iterator[Batch]:
        pos, perm_epoch, perm = self.position, None, None
        while True:
            if perm_epoch != pos.epoch:
                perm = np.random.default_rng([self.seed, pos.epoch]).permutation(len(self.tokens))
                perm_epoch = pos.epoch
            b = pos.batch * self.batch_size
            rows = perm[b : b + self.batch_size][self.local]
            nxt = pos.batch + 1
            pos = (
                DataPosition(pos.epoch, nxt)
                if nxt < self.batches_per_epoch
                else DataPosition(pos.epoch + 1, 0)
            )
            self.position = pos
            yield _batch(self.tokens, self.levels, rows, pos)


def val_batches(
    path: str | os.PathLike,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
    split: str = "val",
) -> Iterator[Batch]:
    """Validation batches in id order (fixed); a last partial batch is cut to a multiple of W rows
    and shared evenly, so every rank yields the same number of batches."""
    _local_rows(batch_size, rank, world_size)
    tokens, levels = load_split(path, split)
    n = len(tokens)
    for i, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        size = min(batch_size, n - start) // world_size * world_size
        if size == 0:
            return
        per = size // world_size
        rows = np.arange(start + rank * per, start + (rank + 1) * per)
        yield _batch(tokens, levels, rows, DataPosition(0, i + 1))
