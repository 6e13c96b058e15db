"""Corpora -> packed byte windows with pooling levels: Ray tasks do the work, the driver commits.

``python -m pipelines.preprocess experiment.yaml [a.b=v | --set a.b=v ...] [--force]``

The driver plans work units from the inputs (``corpus.plan_units``: slices of about
``data.unit_bytes``, fixed by the inputs and that setting, never by the cluster), launches one Ray
task per unit (``pipelines.units.run_unit``: read, split, pack, write the unit's shards and then
its commit record, straight to the dataset's filesystem), collects the per-unit records (small
dicts), numbers the sequences by unit order and writes ``manifest.json`` last. No document passes
through the driver, so its share of the CPU stays a few record merges per unit and it does not cap
the cluster's throughput.

Windows never cross units, so each unit's shards depend on the unit alone: the dataset is
identical byte for byte on 1 CPU, 2 CPUs or 3 nodes. A rerun after a crash reuses every unit
whose commit record matches the unit's key and whose shards are present with their sizes, and
says how many in its summary line (docs/data.md, Resume).

``data.dataset_dir`` may be a local path or any ``pyarrow.fs`` URI (``s3://bucket/prefix``; the
endpoint and credentials from the usual ``AWS_*`` variables, forwarded to the tasks).

Reading, rejection reasons, source weights and the train/val split: ``pipelines.corpus``.

Length: the driver's whole story (plan, submit in a window, reuse, cap, merge, publish, progress)
reads top to bottom here; each piece is short and the ones that stand alone are already split out
(``corpus``, ``units``, ``storage``, ``entropy_fit``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aunet.packing import contraction_ratios
from pipelines import corpus, entropy_fit, storage, tokenizer, units
from pipelines.data import FORMAT_VERSION, MANIFEST, SPLITS, is_complete
from pipelines.paths import is_uri
from pipelines.progress import Cadence, duration, eta, rate, say

# Bumped whenever the bytes a unit writes change for the same inputs and settings: part of every
# unit's key and of the dataset's config_hash (a git commit would rebuild on every commit, and a
# ``ray job submit`` copy has none).
DATA_CODE_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"  # next to the manifest, in token-id datasets


@dataclass(frozen=True)
class DatasetInfo:
    """A published dataset: its location (a Path, or the URI string) and its manifest."""

    path: Path | str
    manifest: dict[str, Any]
    reused: bool

    @property
    def sequences(self) -> dict[str, int]:
        return {s: self.manifest["splits"][s]["sequences"] for s in SPLITS}


def _settings(spec: Any, tokenizer_sha256: str | None = None) -> dict[str, Any]:
    """What every unit's bytes depend on besides its own inputs (the tokenizer only when there
    is one: byte datasets keep their keys and hashes)."""
    d = spec.data
    return {
        "format_version": FORMAT_VERSION,
        "code": DATA_CODE_VERSION,
        "strategy": list(spec.model.split_strategy.items()),  # order = level
        **{k: getattr(d, k) for k in ("seq_len", "val_fraction", "seed", "shard_sequences")},
        **({"tokenizer": tokenizer_sha256} if tokenizer_sha256 is not None else {}),
    }


_INPUT_KEYS = ("source", "format", "sha256", "weight", "text_field", "id_field", "lang_field")


def config_hash(
    spec: Any, inputs: list[dict[str, Any]], tokenizer_sha256: str | None = None
) -> str:
    """What the dataset depends on: input contents and fields (not paths), strategy, packing,
    split settings, unit size, the data code version and the tokenizer's sha256, if any."""
    blob = {
        **_settings(spec, tokenizer_sha256),
        "inputs": [{k: i[k] for k in _INPUT_KEYS} for i in inputs],
        "max_documents": spec.data.max_documents,
        "unit_bytes": spec.data.unit_bytes,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def unit_key(settings: dict[str, Any], unit: dict[str, Any], inputs: list, cap: int | None) -> str:
    """A unit's identity: the settings, its pieces by input checksum and range, its cap."""
    pieces = [
        {**{k: inputs[p["input"]][k] for k in _INPUT_KEYS}, "lo": p["lo"], "hi": p["hi"]}
        for p in unit["pieces"]
    ]
    blob = {"settings": settings, "pass": unit["pass"], "pieces": pieces, "cap": cap}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


class _Runner:
    """Submits unit tasks in order (a bounded window of them), reusing committed units."""

    def __init__(
        self, spec: Any, inputs: list, root: str, block_bytes: int, force: bool, tok: Any = None
    ):
        import ray

        self.fs, self.base = storage.resolve(root)
        self.inputs, self.force = inputs, force
        self.units = corpus.plan_units(inputs, spec.data.unit_bytes)
        self.settings = _settings(spec, None if tok is None else tok.sha256)
        self.ctx = {
            "dataset": root,
            "strategy_json": json.dumps(dict(spec.model.split_strategy)),
            "seq_len": spec.data.seq_len,
            "shard_sequences": spec.data.shard_sequences,
            "seed": spec.data.seed,
            "val_fraction": spec.data.val_fraction,
            "block_bytes": block_bytes,
        }
        env = storage.forwarded_env()
        opts: dict[str, Any] = {"num_cpus": 1, "scheduling_strategy": "SPREAD"}
        if env:
            opts["runtime_env"] = {"env_vars": env}
        self.task = ray.remote(units.run_unit).options(**opts)
        self.inputs_ref = ray.put(inputs)
        self.tok_ref = None if tok is None else ray.put(tok.to_json())
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.window = max(4, 2 * cpus)  # enough queued to keep every slot busy
        self.listing = {s: storage.sizes(self.fs, storage.join(self.base, s)) for s in SPLITS}
        self.reused = 0
        self.reused_units: set[int] = set()
        self.cadence = Cadence(spec.data.progress_every, spec.train.progress_seconds)
        self.bytes_done = 0  # input bytes of the units run here (reused units cost nothing)

    def _progress(self, unit: int) -> None:
        """A ``preprocess:`` line when one is due: units done/total (reused ones included), the
        input bytes/s of the units run here, and the ETA of the rest at that pace."""
        done, total = unit + 1, len(self.units)
        if unit not in self.reused_units:
            self.bytes_done += self.units[unit]["bytes"]
        if not self.cadence.due(done, total):
            return
        t = max(self.cadence.elapsed(), 1e-9)
        left = sum(u["bytes"] for u in self.units[done:])
        parts = [f"units {done}/{total} ({done / total:.0%})"]
        if self.reused_units:
            parts.append(f"{len(self.reused_units)} reused")
        parts.append(rate(self.bytes_done / t, "B/s"))
        parts.append(f"ETA {duration(eta(t, self.bytes_done, self.bytes_done + left))}")
        say("preprocess: " + " | ".join(parts), sys.stderr)

    def _committed(self, i: int, key: str) -> dict[str, Any] | None:
        if self.force:
            return None
        rec = units.committed(self.fs, self.base, i, key)
        if rec is not None and units.shards_present(rec, self.listing):
            self.reused += 1
            self.reused_units.add(i)
            return rec
        return None

    def _submit(self, i: int, cap: int | None):
        key = unit_key(self.settings, self.units[i], self.inputs, cap)
        rec = self._committed(i, key)
        if rec is not None:
            return rec
        ctx = {**self.ctx, "key": key, "cap": cap}
        return self.task.remote(i, self.units[i], self.inputs_ref, ctx, self.tok_ref)

    def run(self, cap: int | None) -> list[dict[str, Any]]:
        """The records of the units the dataset is made of, in unit order.

        With ``cap`` (``data.max_documents``), units are taken in order until the cap: the unit
        that crosses it runs again with the rest of the cap as its own (its key includes it).
        """
        import ray

        results: dict[int, dict[str, Any]] = {}
        pending: dict[Any, int] = {}
        out: list[dict[str, Any]] = []
        nxt, written = 0, 0
        try:
            while len(out) < len(self.units):
                while len(pending) < self.window and nxt < len(self.units):
                    r = self._submit(nxt, None)
                    if isinstance(r, dict):
                        results[nxt] = r
                    else:
                        pending[r] = nxt
                    nxt += 1
                while len(out) in results:
                    rec = results.pop(len(out))
                    if "error" in rec:
                        raise corpus.CorpusError(rec["error"])
                    n = rec["documents"]["written"]
                    if cap is not None and written + n > cap:
                        r = self._submit(len(out), cap - written)
                        rec = r if isinstance(r, dict) else ray.get(r)
                        if "error" in rec:
                            raise corpus.CorpusError(rec["error"])
                        n = rec["documents"]["written"]
                    out.append(rec)
                    written += n
                    self._progress(len(out) - 1)
                    if cap is not None and written >= cap:
                        return out
                if pending and len(out) < len(self.units):
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        results[pending.pop(ref)] = ray.get(ref)
            return out
        finally:  # units past the cap (or after an error) must not write after the clean-up
            if pending:
                ray.wait(list(pending), num_returns=len(pending))


def _merge(records: list[dict[str, Any]], T: int, K: int) -> dict[str, Any]:
    """The manifest's statistics from the unit records; global sequence ids by unit order."""
    per_split: dict[str, dict[str, Any]] = {}
    for s in SPLITS:
        shards, start = [], 0
        tail = {"tokens": 0, "bytes": 0, "documents_lost": 0, "documents_cut": 0}
        tot = {"documents": 0, "bytes": 0, "tokens": 0, "sequences": 0}
        points, peak = np.zeros(K, np.int64), np.zeros(K, np.int64)
        for rec in records:
            r = rec["splits"][s]
            for k in tot:
                tot[k] += r[k]
            for k in tail:
                tail[k] += r["tail"][k]
            for sh in r["shards"]:
                shards.append({**sh, "unit": rec["unit"], "start": start})
                start += sh["sequences"]
            points += np.array(r["split_points"], np.int64).reshape(K)
            peak = np.maximum(
                peak, np.array(r["max_split_points_per_sequence"], np.int64).reshape(K)
            )
        per_split[s] = {
            **tot,
            "dropped_tail_tokens": tail["tokens"],
            "tail": tail,
            "shards": shards,
            "split_points": points.tolist(),
            "max_split_points_per_sequence": peak.tolist(),
            "contraction": contraction_ratios(tot["sequences"] * T, points),
        }
    docs = {
        k: sum(r["documents"][k] for r in records)
        for k in ("read", "written", "rejected", "sampled_out")
    }
    if docs["read"] != docs["written"] + docs["rejected"] + docs["sampled_out"] or docs[
        "written"
    ] != sum(v["documents"] for v in per_split.values()):
        raise AssertionError(f"count identity broken: {docs}")
    reasons: dict[str, int] = {}
    sample: list[dict[str, str]] = []
    langs: dict[str, dict[str, int]] = {}
    for rec in records:
        for k, v in rec["rejected"]["counts"].items():
            reasons[k] = reasons.get(k, 0) + v
        sample += rec["rejected"]["sample"][: units.REJECT_SAMPLE - len(sample)]
        for lang, st in rec["langs"].items():
            acc = langs.setdefault(lang, {"documents": 0, "bytes": 0, "rejected": 0})
            for k in acc:
                acc[k] += st[k]
    seqs = sum(v["sequences"] for v in per_split.values())
    points = sum(
        (np.array(v["split_points"], np.int64) for v in per_split.values()), np.zeros(K, np.int64)
    )
    return {
        "documents": docs,
        "bytes": sum(v["bytes"] for v in per_split.values()),
        "rejected": {"counts": reasons, "sample": sample},
        "splits": per_split,
        "split_points": points.tolist(),
        "contraction": contraction_ratios(seqs * T, points),
        "langs": langs,
    }


def _collect_garbage(fs: Any, base: str, records: list[dict[str, Any]]) -> None:
    """Delete shards and records the manifest will not list: units past a cap, units of an
    earlier build with other settings, ``.part`` files of a killed run."""
    keep = {s: {sh["file"] for r in records for sh in r["splits"][s]["shards"]} for s in SPLITS}
    keep["units"] = {units.record_path("", r["unit"]).rsplit("/", 1)[-1] for r in records}
    for d, names in keep.items():
        for name in storage.sizes(fs, storage.join(base, d)):
            if name not in names:
                storage.delete(fs, storage.join(base, d, name))


def _token_fields(
    fs: Any, base: str, tok: Any, location: str, records: list[dict[str, Any]]
) -> dict[str, Any]:
    """Token-id datasets: the tokenizer (copied next to the manifest, which names its sha256 and
    where it came from) and the train split's bytes per token, overall and per language (text
    bytes / text tokens, BOS/EOS excluded; docs/data.md, Token-id datasets)."""
    storage.write_bytes(fs, storage.join(base, TOKENIZER_FILE), tok.to_json().encode("utf-8"))
    totals: dict[str, dict[str, int]] = {}
    for rec in records:
        for key, acc in rec.get("text_tokens", {}).get("train", {}).items():
            t = totals.setdefault(key, {"bytes": 0, "tokens": 0})
            t["bytes"] += acc["bytes"]
            t["tokens"] += acc["tokens"]
    bpt = {k: v["bytes"] / v["tokens"] for k, v in totals.items() if v["tokens"]}
    return {
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "pattern": tok.pattern,
            "source": location,
        },
        "bytes_per_token": {"all": bpt.pop("all", None), **dict(sorted(bpt.items()))},
        "text_tokens": {"train": totals},
    }


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


def _old_layout(root: str) -> None:
    """A local dataset of format 1 is a symlink to a version directory: replace it by a plain
    directory (units are written in place and found again by later runs)."""
    if not is_uri(root) and os.path.islink(root):
        target = os.path.realpath(root)
        os.unlink(root)
        shutil.rmtree(target, ignore_errors=True)


def preprocess(spec: Any, force: bool = False, *, block_bytes: int = 2 << 20) -> DatasetInfo:
    """Build (or reuse) the dataset of ``spec.data``; Ray is started via ``init_ray`` if needed.

    ``force``: redo every unit. ``block_bytes``: text per table inside a unit's task (memory of
    one splitting call; no effect on the output).
    """
    import ray

    inputs = corpus.resolve_inputs(spec.data.sources)
    tok = tok_location = None
    if spec.tokenizer is not None:  # trained first (or found): its sha256 is part of the identity
        tok, tok_location, _ = tokenizer.ensure_tokenizer(spec, inputs, block_bytes=block_bytes)
    chash = config_hash(spec, inputs, None if tok is None else tok.sha256)
    root = spec.dataset_dir()
    path: Path | str = root if is_uri(root) else Path(root).absolute()
    root = str(path)
    fs, base = storage.resolve(root)
    if not force and is_complete(root):
        manifest = json.loads(storage.read_bytes(fs, storage.join(base, MANIFEST)) or b"{}")
        if manifest.get("config_hash") == chash:
            _require_documents(spec, manifest)  # published before empty corpora were refused
            print(f"preprocess: reusing complete dataset {root}", file=sys.stderr)
            return DatasetInfo(path, manifest, reused=True)
    # Entropy split stages: fit the model on the training split, resolve targets to thresholds.
    target, (spec, entropy) = spec, entropy_fit.resolve_spec(spec, inputs, block_bytes)
    _old_layout(root)
    fs.create_dir(base, recursive=True)
    storage.delete(fs, storage.join(base, MANIFEST))  # incomplete from here until the new one
    if not ray.is_initialized():
        from pipelines.runtime import init_ray

        init_ray(spec.resources)
    t0 = time.perf_counter()  # throughput of the pipeline itself, without Ray's start-up
    runner = _Runner(spec, inputs, root, block_bytes, force, tok)
    records = runner.run(spec.data.max_documents) if spec.data.max_documents != 0 else []
    K = len(spec.model.split_strategy)
    stats = _merge(records, spec.data.seq_len, K)
    _require_documents(spec, stats)
    _collect_garbage(fs, base, records)
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
        "num_stages": K,
        "seq_len": spec.data.seq_len,
        "val_fraction": spec.data.val_fraction,
        "seed": spec.data.seed,
        "max_documents": spec.data.max_documents,
        "shard_sequences": spec.data.shard_sequences,
        "unit_bytes": spec.data.unit_bytes,
        "units": {
            "planned": len(runner.units),
            "used": len(records),
            "reused": runner.reused,
            # run here (not reused): task wall seconds, summed; over ``seconds``: the concurrency
            "task_seconds": round(sum(r.get("seconds", 0.0) for r in records), 3),
        },
        **stats,
        **(_token_fields(fs, base, tok, tok_location, records) if tok is not None else {}),
        "seconds": round(seconds, 3),
        "mb_per_s": round(stats["bytes"] / 1e6 / seconds, 3),
    }
    # The manifest is the last file written: it marks completion.
    storage.write_bytes(fs, storage.join(base, MANIFEST), json.dumps(manifest, indent=1).encode())
    d = manifest["documents"]
    print(
        f"preprocess: {d['written']} documents, {stats['bytes'] / 1e6:.1f} MB in {seconds:.1f} s "
        f"({manifest['mb_per_s']:.1f} MB/s), {d['rejected']} rejected"
        f" {stats['rejected']['counts']}, {len(records)} units ({runner.reused} reused) -> {root}",
        file=sys.stderr,
    )
    return DatasetInfo(path, manifest, reused=False)


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
