"""Corpora -> packed byte windows with pooling levels: a Ray Data pipeline with an atomic publish.

``python -m pipelines.preprocess experiment.yaml [a.b=v | --set a.b=v ...] [--force]``

Stages: one Ray Data map task per (input file, pass) reads its records and runs the Splitter on
each whole document (``corpus.read_encode_unit``, the expensive part; parallel over files, so a
corpus in one file is split by one task) and ships bytes + levels; the driver consumes the
documents in input order (``preserve_order``), adds BOS/EOS as it copies them into the packer
(``aunet.packing.Packer.add_documents``), which cuts each split's stream into shard-sized slices,
and hands every slice to a writer thread that materialises its windows and writes the shard.
The cut is sequential over one stream: doing it inside Ray Data would tie window boundaries to
block boundaries, which move with the parallelism. Everything upstream of the
driver is a pure function of the record, so shards are identical byte for byte whatever the CPU
count or block size, and their names (``shard-00000.parquet``) depend only on their position in
the stream.

Reading, rejection reasons, source weights and the train/val split: ``pipelines.corpus``.

Length: the planning of work units, the Ray Data pipeline, the driver's packing and writer
threads, and the atomic publish (with stale-version clean-up) are one program whose pieces
share the dataset's invariants (order, names, counts); split apart, each would need the others'
internals. About 450 lines.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
import warnings
from concurrent.futures import FIRST_COMPLETED, Executor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from aunet.packing import Packer, contraction_ratios, windows
from pipelines import corpus, entropy_fit
from pipelines.data import FORMAT_VERSION, MANIFEST, SPLITS, is_complete, write_shard
from pipelines.paths import is_uri

REJECT_SAMPLE = 20  # rejected document ids kept in the manifest
# Blocks a map task may yield before the driver's executor has pulled them (Ray Data's default,
# 2, stalls the task between pulls: on one core the 53 MB benchmark left the CPU idle 1.5 s of
# 6.4 s with 2, 3.5 s with 1, none with 8). A block is ~2 bytes per text byte of ``block_bytes``.
GEN_BUFFER_BLOCKS = 8


@dataclass(frozen=True)
class DatasetInfo:
    """A published dataset: its directory (a symlink to the version dir) and its manifest."""

    path: Path
    manifest: dict[str, Any]
    reused: bool

    @property
    def sequences(self) -> dict[str, int]:
        return {s: self.manifest["splits"][s]["sequences"] for s in SPLITS}


def _write_chunk(path: str, tok: np.ndarray, lev: np.ndarray, seq_len: int, start: int, K: int):
    """A stream slice -> one shard; also its split points over the window inputs.

    Runs in a driver thread (numpy copies and the Parquet encoder release the GIL): the shards
    land in the driver's local dataset directory whatever node the map tasks ran on, and no Ray
    task competes with Ray Data's for CPU slots (a writer task waiting for a slot that paused map
    tasks hold, while the driver waits for the writer, would deadlock).
    """
    tw, lw = windows(tok, lev, seq_len)
    entry = write_shard(Path(path), tw, lw, start)
    inputs = lw[:, :-1]  # split points of what the model reads: each window's T inputs
    per_seq = np.zeros((len(lw), K), dtype=np.int64)  # K = 0 for a byte-level baseline
    for s in range(1, K + 1):
        per_seq[:, s - 1] = (inputs >= s).sum(1)
    return entry, per_seq.sum(0).astype(np.int64), per_seq.max(0, initial=0).astype(np.int64)


class _Split:
    """Driver side of one split: cuts the stream into shard slices and hands them to writers."""

    def __init__(self, out: Path, seq_len: int, shard_rows: int, K: int, writer: Executor):
        self.dir, self.T, self.K, self.writer = out, seq_len, K, writer
        self.dir.mkdir(parents=True)
        self.packer = Packer(seq_len, chunk=shard_rows)
        self.futures: list = []
        self.inflight: list = []
        self.next_index = self.documents = self.text_bytes = 0

    def add(self, data: np.ndarray, levels: np.ndarray, lengths: np.ndarray) -> None:
        """Documents' bytes and levels back to back (``lengths`` [n]); BOS/EOS added here."""
        self.documents += len(lengths)
        self.text_bytes += len(data)
        for tok, lev in self.packer.add_documents(data, levels, lengths, self.K):
            self._submit(tok, lev)

    def _submit(self, tok: np.ndarray, lev: np.ndarray) -> None:
        while len(self.inflight) >= 4:  # backpressure: bound the slices held in memory
            done, pending = wait(self.inflight, return_when=FIRST_COMPLETED)
            self.inflight = list(pending)
        name = str(self.dir / f"shard-{len(self.futures):05d}.parquet")
        n = (len(tok) - 1) // self.T
        self.futures.append(
            self.writer.submit(_write_chunk, name, tok, lev, self.T, self.next_index, self.K)
        )
        self.inflight.append(self.futures[-1])
        self.next_index += n

    def finish(self) -> dict[str, Any]:
        last, dropped = self.packer.finish()
        if last is not None:
            self._submit(*last)
        done = [f.result() for f in self.futures]
        seqs, tokens = self.packer.windows_out, self.packer.tokens_in
        if seqs != self.next_index or tokens != (seqs * self.T + 1 if seqs else 0) + dropped:
            raise AssertionError(f"{self.dir.name}: packer lost tokens ({tokens} in, {seqs} seqs)")
        points = sum((d[1] for d in done), np.zeros(self.K, np.int64))
        peak = np.max([d[2] for d in done], axis=0) if done else np.zeros(self.K, np.int64)
        return {
            "documents": self.documents,
            "bytes": self.text_bytes,
            "tokens": tokens,
            "sequences": seqs,
            "dropped_tail_tokens": dropped,
            "shards": [d[0] for d in done],
            "split_points": points.tolist(),
            "max_split_points_per_sequence": peak.tolist(),
            "contraction": contraction_ratios(seqs * self.T, points),
        }


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


def _block_runs(batch: pa.Table):
    """A block -> (split, bytes, levels, document lengths) of each run of ``_runs``.

    A run's bytes are contiguous in the block's buffers: these are views, which the packer copies
    into its chunk buffer at once, so it never holds the block (views into the object store kept
    alive cost the driver ~5x more system time).
    """
    data, offsets = _binary(batch.column("data"))
    levels, lev_offsets = _binary(batch.column("levels"))
    split = batch.column("split").to_numpy()
    for s, start, stop, _ in _runs(split):
        a, b = int(offsets[start]), int(offsets[stop])
        if (a, b) != (int(lev_offsets[start]), int(lev_offsets[stop])):
            raise AssertionError(f"rows {start}:{stop}: data and levels are not aligned")
        lengths = np.diff(offsets[start : stop + 1])[split[start:stop] == s]
        yield s, data[a:b], levels[a:b], lengths


def _binary(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A large_binary column -> (values uint8, offsets int64 [rows + 1]), views without a copy."""
    if isinstance(column, pa.ChunkedArray):  # a block's column: one chunk (combining copies it)
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    bufs = column.buffers()
    offsets = np.frombuffer(bufs[1], np.int64)[column.offset : column.offset + len(column) + 1]
    values = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return values, offsets


@contextlib.contextmanager
def _ray_data_settings(progress: bool):
    """This pipeline's DataContext options, restored afterwards (the context is process-wide)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    opts = ctx.execution_options
    names = (
        "enable_progress_bars",
        "print_on_execution_start",
        "target_max_block_size",
        "op_resource_reservation_enabled",
    )
    old = [getattr(ctx, n) for n in names]
    old_order = opts.preserve_order
    opts.preserve_order = True  # stream order = input order, whatever the CPUs
    ctx.enable_progress_bars = ctx.print_on_execution_start = progress
    ctx.target_max_block_size = 4 << 20  # keep reader blocks small so splitting spreads out
    # Ray 2.60's per-operator reservations run this one-operator pipeline ~1.2 tasks at a time on
    # 2 CPUs (12 tasks of 0.3 s: 3.0 s; 1.9 s without). The driver bounds what is in flight anyway.
    ctx.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        opts.preserve_order = old_order
        for n, v in zip(names, old):
            setattr(ctx, n, v)


class _Counts:
    """Per-run document accounting, checked at the end: read == written + rejected + sampled."""

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
            last = (
                int(np.flatnonzero(split >= 0)[cap - self.written - 1])
                if cap > self.written
                else -1
            )
            batch, split, stop = batch.slice(0, last + 1), split[: last + 1], True
        cols = {c: batch.column(c).to_pylist() for c in ("reject", "ident", "lang", "nbytes")}
        for sp, reason, ident, lang, n in zip(split, *cols.values()):
            st = self.langs.setdefault(lang, {"documents": 0, "bytes": 0, "rejected": 0})
            if sp >= 0:
                st["documents"] += 1
                st["bytes"] += n
                continue
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
            if reason != "sampled_out":
                st["rejected"] += 1
                if len(self.sample) < REJECT_SAMPLE:
                    self.sample.append({"id": ident, "reason": reason})
        self.read += len(split)
        self.written += int((split >= 0).sum())
        return batch, stop


def build(spec: Any, inputs: list[dict[str, Any]], out: Path, block_bytes: int) -> dict:
    """Run the pipeline into ``out`` (train/, val/); return the manifest's statistics part."""
    import ray

    threads = int(min(8, max(2, ray.cluster_resources().get("CPU", 1) // 2)))
    with ThreadPoolExecutor(threads, thread_name_prefix="shard-writer") as writer:
        return _build(spec, inputs, out, block_bytes, writer)


def _build(
    spec: Any, inputs: list[dict[str, Any]], out: Path, block_bytes: int, writer: Executor
) -> dict:
    import ray.data

    data, strategy = spec.data, dict(spec.model.split_strategy)
    K, strategy_json = len(strategy), json.dumps(strategy)
    splits = [_Split(out / s, data.seq_len, data.shard_sequences, K, writer) for s in SPLITS]
    counts = _Counts()
    units = corpus.work_units(inputs, data, block_bytes)
    if units and data.max_documents != 0:
        with _ray_data_settings(progress=sys.stderr.isatty()):  # the Dataset copies the context
            ds = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=len(units))
            # One task per unit reads and splits it. (Two chained map_batches would be fused by
            # Ray Data into tasks of max(batch sizes) *units*: the whole corpus in one task.)
            with warnings.catch_warnings():  # the backpressure option has no named parameter
                warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
                ds = ds.map_batches(
                    corpus.read_encode_unit,
                    batch_size=1,
                    batch_format="numpy",
                    fn_kwargs={"strategy_json": strategy_json},
                    _generator_backpressure_num_objects=2 * GEN_BUFFER_BLOCKS,
                )
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                corpus.raise_error_rows(batch)  # a bad line or file: one error naming it
                batch, stop = counts.add(batch, data.max_documents)
                for s, data_run, levels_run, lengths in _block_runs(batch):
                    splits[s].add(data_run, levels_run, lengths)
                if stop:
                    break
    per_split = {s: sp.finish() for s, sp in zip(SPLITS, splits)}
    sampled = counts.reasons.pop("sampled_out", 0)
    rejected = sum(counts.reasons.values())
    if counts.read != counts.written + rejected + sampled or counts.written != sum(
        v["documents"] for v in per_split.values()
    ):
        raise AssertionError(
            f"count identity broken: read {counts.read}, written {counts.written}, "
            f"rejected {rejected}, sampled out {sampled}"
        )
    seqs = sum(v["sequences"] for v in per_split.values())
    points = sum(
        (np.array(v["split_points"], np.int64) for v in per_split.values()), np.zeros(K, np.int64)
    )
    counts.langs.pop(None, None)
    return {
        "documents": {
            "read": counts.read,
            "written": counts.written,
            "rejected": rejected,
            "sampled_out": sampled,
        },
        "bytes": sum(v["bytes"] for v in per_split.values()),
        "rejected": {"counts": counts.reasons, "sample": counts.sample},
        "splits": per_split,
        "split_points": points.reshape(K).tolist(),
        "contraction": contraction_ratios(seqs * data.seq_len, points.reshape(K)),
        "langs": counts.langs,
    }


def config_hash(spec: Any, inputs: list[dict[str, Any]]) -> str:
    """What the shards depend on: input contents and fields, strategy, packing, split settings."""
    d = spec.data
    keys = ("source", "format", "sha256", "weight", "text_field", "id_field", "lang_field")
    blob = {
        "format_version": FORMAT_VERSION,
        "inputs": [{k: i[k] for k in keys} for i in inputs],
        "strategy": list(spec.model.split_strategy.items()),  # order = level
        "data": {
            k: getattr(d, k)
            for k in ("seq_len", "val_fraction", "seed", "max_documents", "shard_sequences")
        },
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def code_version() -> dict[str, str | None]:
    from importlib import metadata

    try:
        version = metadata.version("aunet-platform")
    except metadata.PackageNotFoundError:
        version = None
    git = ["git", "-C", str(Path(__file__).resolve().parent.parent), "rev-parse", "HEAD"]
    try:
        commit = subprocess.run(git, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"package": version, "git_commit": commit or None}


def _clean_stale(final: Path) -> None:
    """Remove temp dirs of dead runs and version dirs the link no longer points at."""
    live = os.path.realpath(final) if final.is_symlink() else None
    for p in final.parent.glob(f".{final.name}.*"):
        kind, _, rest = p.name[len(final.name) + 2 :].partition("-")
        if kind == "tmp":
            try:
                os.kill(int(rest.split("-")[0]), 0)
                continue  # a run in progress
            except ProcessLookupError:
                pass
            except (PermissionError, ValueError):
                continue
        elif kind != "v" or str(p) == live:
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _publish(tmp: Path, final: Path, uid: str) -> None:
    """Rename the finished temp dir to a version dir, then swap the ``final`` symlink onto it."""
    version = final.parent / f".{final.name}.v-{uid}"
    os.rename(tmp, version)
    link = final.parent / f".{final.name}.link-{uid}"
    os.symlink(version.name, link)
    old = os.path.realpath(final) if final.is_symlink() else None
    if final.exists() and not final.is_symlink():  # a plain dir (e.g. copied in): replace it
        shutil.rmtree(final)
    os.replace(link, final)
    if old and os.path.isdir(old):
        shutil.rmtree(old, ignore_errors=True)


def _require_documents(spec: Any, stats: dict[str, Any]) -> None:
    """A dataset of 0 documents is refused: training on it would fail later, far from the cause
    (every source rejected, a wrong ``text_field``, weights of 0)."""
    d = stats["documents"]
    if d["written"] == 0:
        sources = ", ".join(str(s.path) for s in spec.data.sources)
        raise corpus.CorpusError(
            f"empty corpus: 0 documents from data.sources ({sources}): {d['read']} read, "
            f"rejected {stats['rejected']['counts'] or 'none'}; nothing published"
        )


def preprocess(spec: Any, force: bool = False, *, block_bytes: int = 2 << 20) -> DatasetInfo:
    """Build (or reuse) the dataset of ``spec.data``; Ray is started via ``init_ray`` if needed."""
    import ray

    inputs = corpus.resolve_inputs(spec.data.sources)
    chash = config_hash(spec, inputs)
    if is_uri(spec.dataset_dir()):
        raise ValueError(f"data.dataset_dir: {spec.dataset_dir()}: datasets are written locally")
    final = Path(spec.dataset_dir()).absolute()
    if not force and is_complete(final):
        manifest = json.loads((final / MANIFEST).read_text())
        if manifest.get("config_hash") == chash:
            _require_documents(spec, manifest)  # published before empty corpora were refused
            print(f"preprocess: reusing complete dataset {final}", file=sys.stderr)
            return DatasetInfo(final, manifest, reused=True)
    # Entropy split stages: fit the model on the training split, resolve targets to thresholds.
    target, (spec, entropy) = spec, entropy_fit.resolve_spec(spec, inputs, block_bytes)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(final)
    if not ray.is_initialized():
        from pipelines.runtime import init_ray

        init_ray(spec.resources)
    uid = uuid.uuid4().hex[:12]
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uid}"
    tmp.mkdir()
    t0 = time.perf_counter()  # throughput of the pipeline itself, without Ray's start-up
    try:
        stats = build(spec, inputs, tmp, block_bytes)
        _require_documents(spec, stats)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    manifest = {
        "format_version": FORMAT_VERSION,
        "complete": True,
        "config_hash": chash,
        "name": spec.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code_version": code_version(),
        "inputs": inputs,
        "strategy": list(target.model.split_strategy.items()),  # order = level
        **({"resolved_strategy": list(spec.model.split_strategy.items())} if entropy else {}),
        **({"entropy": entropy} if entropy else {}),
        "num_stages": len(spec.model.split_strategy),
        "seq_len": spec.data.seq_len,
        "val_fraction": spec.data.val_fraction,
        "seed": spec.data.seed,
        "max_documents": spec.data.max_documents,
        "shard_sequences": spec.data.shard_sequences,
        **stats,
        "seconds": round(seconds, 3),
        "mb_per_s": round(stats["bytes"] / 1e6 / seconds, 3),
    }
    part = tmp / (MANIFEST + ".part")  # the manifest is the last file written: it marks completion
    part.write_text(json.dumps(manifest, indent=1))
    os.replace(part, tmp / MANIFEST)
    _publish(tmp, final, uid)
    d = manifest["documents"]
    print(
        f"preprocess: {d['written']} documents, {stats['bytes'] / 1e6:.1f} MB in {seconds:.1f} s "
        f"({manifest['mb_per_s']:.1f} MB/s), {d['rejected']} rejected"
        f" {stats['rejected']['counts']} -> {final}",
        file=sys.stderr,
    )
    return DatasetInfo(final, manifest, reused=False)


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_main

    return run_main(_main, argv)


def _main(argv: list[str]) -> int:
    from pipelines.spec import help_text, load_spec

    ap = argparse.ArgumentParser(
        prog="python -m pipelines.preprocess",
        description=__doc__,
        epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("spec", help="experiment YAML")
    ap.add_argument("overrides", nargs="*", help="dotted overrides a.b=value")
    ap.add_argument(
        "--set", action="append", default=[], dest="sets", metavar="A.B=V", help="override a key"
    )
    ap.add_argument(
        "--force", action="store_true", help="rebuild even if a complete dataset exists"
    )
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    spec = load_spec(args.spec, [*args.overrides, *args.sets])
    info = preprocess(spec, force=args.force)
    print(info.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
