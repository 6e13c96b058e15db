"""pipelines.preprocess on a real local Ray: formats, determinism, bad input, atomicity, reuse."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
from netutil import free_port

from aunet.config import BOS_ID, EOS_ID
from aunet.entropy import resolve
from aunet.splitting import Splitter
from pipelines import preprocess as pp
from pipelines import units
from pipelines.corpus import hash01
from pipelines.data import MANIFEST, is_complete, load_split, read_manifest
from pipelines.entropy_fit import dataset_spec
from pipelines.schema import SpecError
from pipelines.spec import ExperimentSpec

REPO = Path(__file__).resolve().parents[1]
STRATEGY = {"word1": "1@1", "word2": "2@1"}


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def make_spec(tmp: Path, sources: list[dict], **data) -> ExperimentSpec:
    raw = {
        "name": "t",
        "data": {
            "sources": sources,
            "seq_len": 16,
            "val_fraction": 0.0,
            "dataset_dir": str(tmp / "ds"),
            **data,
        },
        "model": {
            "dimensions": [8, 16, 32],
            "layers": [1, 1, 1],
            "head_dims": [8, 8, 8],
            "strategy": STRATEGY,
        },
        "train": {"steps": 1},
        "tracking": {},
        "resources": {"storage_path": str(tmp)},
    }
    return ExperimentSpec.from_dict(raw, source="test")


def write_jsonl(path: Path, records: list, compression: str | None = None) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()
    if compression:
        with pa.CompressedOutputStream(str(path), compression) as f:
            f.write(text)
    else:
        path.write_bytes(text)
    return path


def expected_stream(docs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Naive reference: the concatenation of [BOS] + bytes + [EOS] with Splitter levels."""
    sp, tok, lev = Splitter(STRATEGY), [], []
    for d in docs:
        tok += [BOS_ID, *d, EOS_ID]
        lev += [len(STRATEGY), *sp.levels(d).tolist(), 0]
    return np.array(tok), np.array(lev)


def stored_stream(path: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Undo the one-token overlap of consecutive windows of a unit (window k+1 starts at window
    k's end); units' streams back to back (windows never cross units)."""
    tok, lev = load_split(path, split)
    shards = read_manifest(path)["splits"][split]["shards"]
    unit_of_row = np.repeat([s["unit"] for s in shards], [s["sequences"] for s in shards])
    join = lambda x: np.concatenate([x[0], x[1:, 1:].ravel()]) if len(x) else x.ravel()  # noqa: E731
    parts_t, parts_l = [], []
    for u in dict.fromkeys(unit_of_row.tolist()):
        t, lv = tok[unit_of_row == u], lev[unit_of_row == u]
        for a, b in zip(t, t[1:]):
            assert a[-1] == b[0]
        parts_t.append(join(t))
        parts_l.append(join(lv))
    if not parts_t:
        return tok.ravel(), lev.ravel()
    return np.concatenate(parts_t), np.concatenate(parts_l)


def assert_stream(path: Path, docs: list[bytes], seq_len: int = 16, split: str = "train"):
    want_tok, want_lev = expected_stream(docs)
    tok, lev = stored_stream(path, split)
    n = (len(want_tok) - 1) // seq_len * seq_len + 1 if len(want_tok) > seq_len else 0
    assert len(tok) == n
    np.testing.assert_array_equal(tok, want_tok[:n])
    np.testing.assert_array_equal(lev, want_lev[:n])  # levels == Splitter.levels recomputed


def digest(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*.parquet"))
    }


def test_all_formats_in_order_with_levels(tmp_path):
    docs = [f"document {i}: some words, and more words.\n".encode() * (i + 1) for i in range(8)]
    (tmp_path / "a.txt").write_bytes(docs[0])
    write_jsonl(tmp_path / "b.jsonl", [{"text": docs[1].decode()}, {"text": docs[2].decode()}])
    write_jsonl(tmp_path / "c.jsonl.gz", [{"text": docs[3].decode()}], "gzip")
    write_jsonl(tmp_path / "d.jsonl.zst", [{"text": docs[4].decode()}], "zstd")
    pq.write_table(pa.table({"body": [d.decode() for d in docs[5:8]]}), tmp_path / "e.parquet")
    sources = [
        {"path": str(tmp_path / n)} for n in ("a.txt", "b.jsonl", "c.jsonl.gz", "d.jsonl.zst")
    ]
    sources.append({"path": str(tmp_path / "e.parquet"), "text_field": "body"})
    info = pp.preprocess(make_spec(tmp_path, sources))
    m = info.manifest
    assert m["documents"] == {"read": 8, "written": 8, "rejected": 0, "sampled_out": 0}
    assert m["bytes"] == sum(map(len, docs))
    assert [i["format"] for i in m["inputs"]] == ["txt", "jsonl", "jsonl", "jsonl", "parquet"]
    assert m["inputs"][0]["sha256"] == hashlib.sha256(docs[0]).hexdigest()
    assert is_complete(info.path) and m["units"]["planned"] == m["units"]["used"] == 1
    assert_stream(info.path, docs)
    tok, lev = load_split(info.path)
    counts = [int((lev[:, :-1] >= s).sum()) for s in (1, 2)]
    assert m["split_points"] == counts
    assert m["contraction"] == [len(tok) * 16 / c for c in counts]


def test_deterministic_whatever_block_size(tmp_path, capsys):
    """Many units, tiny blocks inside the tasks: the same shards byte for byte. (1 CPU vs 3
    nodes: tests/test_preprocess_cluster.py.) Progress lines every 3 units and at the end."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "ε", "日本", "12345", "!!", "\n"]
    for f in range(3):
        recs = [
            {"id": f"{f}-{i}", "text": " ".join(rng.choice(words, rng.integers(1, 60)))}
            for i in range(60)
        ]
        write_jsonl(tmp_path / f"p{f}.jsonl", recs)
    src = [{"path": str(tmp_path / "p*.jsonl"), "id_field": "id"}]
    spec = make_spec(
        tmp_path,
        src,
        val_fraction=0.3,
        shard_sequences=7,
        unit_bytes=4000,
        progress_every=3,
    )
    spec = spec.with_overrides({"train.progress_seconds": 1e6})
    a = pp.preprocess(spec)
    first = digest(a.path)
    capsys.readouterr()
    b = pp.preprocess(spec, force=True, block_bytes=64)
    assert not b.reused and first == digest(b.path) and len(first) > 4
    n = b.manifest["units"]["planned"]
    assert n > 6 and b.manifest["units"]["reused"] == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("preprocess: units")]
    want = [*range(3, n, 3), n]
    assert [int(x.split()[2].split("/")[0]) for x in lines] == want, lines
    assert all(f"/{n} (" in x and "B/s | ETA " in x for x in lines), lines
    assert f"units {n}/{n} (100%) |" in lines[-1] and lines[-1].endswith(" | ETA 0m00s")
    assert b.manifest["splits"]["val"]["sequences"] > 0
    assert pp.preprocess(spec).reused


def test_runs_cover_each_split_in_order():
    rng = np.random.default_rng(1)
    for _ in range(200):
        split = rng.choice([-1, 0, 1], rng.integers(0, 30), p=[0.2, 0.5, 0.3]).astype(np.int8)
        runs = units._runs(split)
        for (s, a, b, n), nxt in zip(runs, runs[1:] + [None]):
            rows = np.flatnonzero(split[a:b] >= 0)
            assert set(split[a:b][rows]) == {s} and n == len(rows)
            assert split[a] == s and split[b - 1] == s  # runs start and end on kept rows
            assert nxt is None or (nxt[0] != s and nxt[1] >= b)
        for s in (0, 1):  # naive reference: the rows of split s, in order
            got = [a + i for t, a, b, _ in runs if t == s for i in np.flatnonzero(split[a:b] == s)]
            assert got == np.flatnonzero(split == s).tolist()


def test_train_and_val_streams_with_rejected_rows_between(tmp_path):
    from pipelines.corpus import hash01

    rng = np.random.default_rng(2)
    recs, kept = [], []
    for i in range(300):
        if i % 7 == 3:
            recs.append({"id": i, "text": ""})  # rejected rows inside runs of both splits
            continue
        text = " ".join(rng.choice(["ab", "cd", "efg", "日本", "\n"], rng.integers(1, 30)))
        recs.append({"id": i, "text": text})
        kept.append((i, text.encode()))
    write_jsonl(tmp_path / "m.jsonl", recs)
    spec = make_spec(
        tmp_path, [{"path": str(tmp_path / "m.jsonl"), "id_field": "id"}], val_fraction=0.4, seed=5
    )
    info = pp.preprocess(spec, block_bytes=300)  # many blocks, each with both splits
    in_val = {i: hash01(b"5", b"split", f"id:{i}".encode()) < 0.4 for i, _ in kept}
    assert 0 < sum(in_val.values()) < len(kept)
    for name, want in (("train", False), ("val", True)):
        docs = [d for i, d in kept if in_val[i] == want]
        assert info.manifest["splits"][name]["documents"] == len(docs)
        assert_stream(info.path, docs, split=name)


def test_bad_input_counts_and_levels(tmp_path):
    txt_bad = b"caf\xc3\xa9 \xff\xfe broken \xc3 utf-8\x00 with NUL\x00 bytes\n"
    (tmp_path / "bad.txt").write_bytes(txt_bad)
    (tmp_path / "empty.txt").write_bytes(b"")
    big = ("x" * 1000 + " ") * 5000  # a 5 MB one-line document
    good = ["中文文本，測試。 又一句话。", "مرحبا بالعالم، هذا نص عربي.", big, "ok\x00nul"]
    recs = [
        {"id": 0, "text": good[0], "lang": "zh"},
        {"id": 1, "text": "", "lang": "en"},
        {"id": 2, "lang": "en"},
        '{"id": 3, "text": "lone \\ud800 surrogate"}',
        {"id": 4, "text": good[1], "lang": "ar"},
        {"id": 5, "text": 17},
        {"id": 6, "text": None},
        {"id": 7, "text": good[2], "lang": "en"},
        {"id": 8, "text": good[3]},
    ]
    write_jsonl(tmp_path / "r.jsonl", recs)
    sources = [
        {"path": str(tmp_path / "*.txt")},
        {"path": str(tmp_path / "r.jsonl"), "id_field": "id", "lang_field": "lang"},
    ]
    m = pp.preprocess(make_spec(tmp_path, sources, seq_len=4096)).manifest
    d = m["documents"]
    assert d["read"] == 11 == d["written"] + d["rejected"] + d["sampled_out"]
    assert d["written"] == 5
    assert m["rejected"]["counts"] == {
        "empty": 2,
        "missing_field": 2,
        "invalid_unicode": 1,
        "not_text": 1,
    }
    sample = {(s["id"], s["reason"]) for s in m["rejected"]["sample"]}
    assert ("3", "invalid_unicode") in sample and ("2", "missing_field") in sample
    assert m["langs"]["zh"] == {"documents": 1, "bytes": len(good[0].encode()), "rejected": 0}
    assert m["langs"]["en"] == {"documents": 1, "bytes": len(big), "rejected": 2}
    docs = [txt_bad] + [g.encode() for g in good]
    assert_stream(Path(m["inputs"][0]["path"]).parent / "ds", docs, seq_len=4096)
    lev = Splitter(STRATEGY).levels(txt_bad)
    assert lev[txt_bad.index(b"\xff")] == 0 and lev[txt_bad.index(b"\xfe")] == 0


def test_input_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        pp.preprocess(make_spec(tmp_path, [{"path": str(tmp_path / "nope.jsonl")}]))
    with pytest.raises(FileNotFoundError, match="glob matches no file"):
        pp.preprocess(make_spec(tmp_path, [{"path": str(tmp_path / "*.jsonl")}]))
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n')[:-6] + b"garbage")
    with pytest.raises(Exception, match="bad.jsonl.gz: cannot read input"):
        pp.preprocess(make_spec(tmp_path, [{"path": str(tmp_path / "bad.jsonl.gz")}]))
    write_jsonl(tmp_path / "j.jsonl", [{"text": "fine"}, "{not json"])
    with pytest.raises(Exception, match="j.jsonl: line 2: invalid JSON"):
        pp.preprocess(make_spec(tmp_path, [{"path": str(tmp_path / "j.jsonl")}]))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(Exception, match="p.parquet: no column 'text'"):
        pp.preprocess(make_spec(tmp_path, [{"path": str(tmp_path / "p.parquet")}]))
    assert not is_complete(tmp_path / "ds")


def test_weights_passes_and_max_documents(tmp_path):
    docs = [f"doc number {i} here." for i in range(40)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs[:20]])
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in docs[20:]])
    src = [
        {"path": str(tmp_path / "a.jsonl"), "weight": 2.5},
        {"path": str(tmp_path / "b.jsonl"), "weight": 1.0},
    ]
    m = pp.preprocess(make_spec(tmp_path, src, seq_len=8)).manifest
    d = m["documents"]
    assert d["read"] == 20 * 3 + 20 and d["read"] == d["written"] + d["sampled_out"]
    assert 0 < d["sampled_out"] < 20 and d["written"] == 40 + 20 + 20 - d["sampled_out"]
    tok, _ = stored_stream(tmp_path / "ds")
    # pass-major order: pass 0 of a, then b, then pass 1 of a: copies are never adjacent
    first_b = bytes(tok[tok < 256].astype(np.uint8)).find(docs[20].encode())
    assert 0 < first_b < bytes(tok[tok < 256].astype(np.uint8)).find(docs[0].encode(), 1)
    m = pp.preprocess(make_spec(tmp_path, src, seq_len=8, max_documents=7)).manifest
    assert m["documents"]["written"] == 7 and m["documents"]["read"] == 7


@pytest.mark.slow
def test_killed_run_resumes_from_committed_units(tmp_path, capsys):
    """SIGKILL a run half-way: nothing is complete; the rerun reuses the committed units (a
    damaged one excepted), says how many, and equals an uninterrupted run byte for byte."""
    rng = np.random.default_rng(3)
    words = ["words", "and", "more", "words.", "日本", "\n"]
    docs = [{"text": " ".join(rng.choice(words, 500))} for _ in range(500)]
    write_jsonl(tmp_path / "big.jsonl", docs)  # ~1.3 MB: ~40 units of 32 KB
    src = [{"path": str(tmp_path / "big.jsonl")}]
    spec = make_spec(tmp_path, src, unit_bytes=1 << 15, val_fraction=0.1, seq_len=64)
    spec_file = tmp_path / "exp.yaml"
    spec_file.write_text(json.dumps(spec.to_dict()))  # JSON is YAML
    address = ray.get_runtime_context().gcs_address  # join this module's cluster: fast start
    cmd = [sys.executable, "-m", "pipelines.preprocess", str(spec_file)]
    proc = subprocess.Popen(
        [*cmd, f"resources.ray_address={address}"],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    records = tmp_path / "ds" / "units"
    try:
        deadline = time.time() + 60
        while len(list(records.glob("*.json"))) < 6 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver: Ray then ends the job's tasks
        proc.wait()
    time.sleep(1.0)  # let Ray end the dead job's tasks
    final = tmp_path / "ds"
    done = sorted(records.glob("*.json"))
    assert not is_complete(final) and not (final / MANIFEST).exists()
    planned = len(pp.corpus.plan_units(pp.corpus.resolve_inputs(spec.data.sources), 1 << 15))
    assert 6 <= len(done) < planned, "the run was not killed half-way"
    rec = json.loads(done[0].read_text())  # damage one committed unit: it must run again
    damaged = final / "train" / rec["splits"]["train"]["shards"][0]["file"]
    damaged.write_bytes(damaged.read_bytes()[:-5])
    capsys.readouterr()
    info = pp.preprocess(spec)
    line = capsys.readouterr().err
    assert is_complete(final) and not info.reused
    units = info.manifest["units"]
    assert units["planned"] == units["used"] == planned and units["reused"] == len(done) - 1
    assert f"{planned} units ({units['reused']} reused)" in line
    clean = pp.preprocess(
        make_spec(
            tmp_path,
            src,
            unit_bytes=1 << 15,
            val_fraction=0.1,
            seq_len=64,
            dataset_dir=str(tmp_path / "clean"),
        )
    )
    assert clean.manifest["units"]["reused"] == 0
    assert digest(final) == digest(tmp_path / "clean") and len(digest(final)) > planned
    timing = ("created", "seconds", "mb_per_s", "units")
    assert [{k: v for k, v in i.manifest.items() if k not in timing} for i in (info, clean)][0] == {
        k: v for k, v in clean.manifest.items() if k not in timing
    }


def test_is_complete_rejects_partial_datasets(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "hello world " * 30}])
    info = pp.preprocess(make_spec(tmp_path, [{"path": str(tmp_path / "a.jsonl")}]))
    assert is_complete(info.path)
    shard = next((info.path / "train").glob("*.parquet"))
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])  # truncated shard
    assert not is_complete(info.path)
    shard.write_bytes(data)
    (info.path / MANIFEST).write_text('{"complete": true')  # half-written manifest
    assert not is_complete(info.path)
    assert not is_complete(tmp_path / "missing")
    again = pp.preprocess(make_spec(tmp_path, [{"path": str(tmp_path / "a.jsonl")}]))
    assert not again.reused and is_complete(again.path)


def test_byte_level_baseline_without_pooling_stages(tmp_path):
    """K = 0 (a plain byte Transformer): no split points, BOS level 0, bytes unchanged."""
    docs = ["one two three.", "vier fünf sechs"]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs])
    spec = make_spec(tmp_path, [{"path": str(tmp_path / "a.jsonl")}], seq_len=8)
    model = {"dimensions": [8], "layers": [1], "head_dims": [8], "strategy": {}}
    spec = ExperimentSpec.from_dict({**spec.to_dict(), "model": model}, source="test")
    m = pp.preprocess(spec).manifest
    assert m["split_points"] == [] and m["documents"]["written"] == 2
    tok, lev = stored_stream(tmp_path / "ds")
    expected = [256, *docs[0].encode(), 257, 256, *docs[1].encode(), 257]
    assert len(tok) >= 8 and tok.tolist() == expected[: len(tok)] and not lev.any()


ENTROPY_TARGET = {"entropy1": "rate=0.2 order=3", "entropy2": "contraction=12"}


def test_entropy_stages_fit_resolve_and_encode(tmp_path):
    """Entropy stages (docs/design.md, Splitting: entropy-driven boundaries): the fit reads the
    training split, the manifest records the resolved strategy, shards use it, deterministic."""
    per_lang: dict[str, list[dict]] = {}
    with gzip.open(
        REPO / "experiments" / "data" / "quickstart.jsonl.gz", "rt", encoding="utf-8"
    ) as f:
        for line in f:
            r = json.loads(line)
            if len(per_lang.setdefault(r["lang"], [])) < 8:
                per_lang[r["lang"]].append({"id": r["id"], "text": r["text"][:1500]})
    recs = [r for rs in per_lang.values() for r in rs]
    write_jsonl(tmp_path / "c.jsonl", recs)
    src = [{"path": str(tmp_path / "c.jsonl"), "id_field": "id"}]
    spec = make_spec(tmp_path, src, val_fraction=0.25, seed=3)
    spec = spec.with_overrides({"model.strategy": ENTROPY_TARGET})
    info = pp.preprocess(spec)
    m = info.manifest
    # The fit reads the training split only: the split hash recomputed here, naively.
    train = [r for r in recs if hash01(b"3", b"split", b"id:" + r["id"].encode()) >= 0.25]
    val = [r for r in recs if r not in train]
    assert 0 < len(val) < len(recs) and m["splits"]["val"]["documents"] == len(val)
    docs = [r["text"].encode() for r in train]
    resolved, report = resolve(ENTROPY_TARGET, docs)
    assert m["strategy"] == list(ENTROPY_TARGET.items())
    assert m["resolved_strategy"] == list(resolved.items())
    assert m["entropy"] == json.loads(json.dumps(report))
    stages = m["entropy"]["stages"]
    assert stages["entropy1"]["threshold_bits"] <= stages["entropy2"]["threshold_bits"]
    assert abs(stages["entropy1"]["fit_rate"] - 0.2) < 0.03
    # Shards: every training byte carries the resolved splitter's level (BOS K, EOS 0).
    sp, tok, lev = Splitter(resolved), [], []
    for d in docs:
        tok += [BOS_ID, *d, EOS_ID]
        lev += [2, *sp.levels(d).tolist(), 0]
    got_tok, got_lev = stored_stream(info.path)
    np.testing.assert_array_equal(got_tok, np.array(tok)[: len(got_tok)])
    np.testing.assert_array_equal(got_lev, np.array(lev)[: len(got_lev)])
    assert m["contraction"][0] == pytest.approx(5, rel=0.25)  # bytes per stage-1 position
    # Training and everything downstream of its checkpoints use the resolved strategy.
    assert dataset_spec(spec, m).model.split_strategy == resolved
    # A restart compares its checkpoint with the resolved spec (before Ray: from the manifest).
    from pipelines.train import _published_spec

    assert _published_spec(spec).model.split_strategy == resolved
    elsewhere = spec.with_overrides({"data.dataset_dir": str(tmp_path / "not-yet")})
    assert _published_spec(elsewhere) is None  # checked once preprocessing has resolved it
    # Same shards and the same fit with many tiny blocks.
    first = digest(info.path)
    again = pp.preprocess(spec, force=True, block_bytes=256)
    assert (
        digest(again.path) == first
        and again.manifest["resolved_strategy"] == m["resolved_strategy"]
    )
    bad = spec.with_overrides({"model.strategy": {"entropy1": "rate=0.05", "entropy2": "rate=0.2"}})
    bad = bad.with_overrides({"data.dataset_dir": str(tmp_path / "bad")})
    with pytest.raises(SpecError, match="model.strategy: strategy 'entropy2'.*must nest"):
        pp.preprocess(bad)


def test_work_units_read_every_record_once(tmp_path):
    """Byte ranges of a .jsonl and row-group runs of a parquet file, whatever the unit size:
    every record exactly once, in order, ids numbered from the file's start (no Ray)."""
    from pipelines import corpus

    rng = np.random.default_rng(4)
    texts = [
        " ".join(rng.choice(["é", "ab", "日本語", "x" * 40], rng.integers(1, 9))) for _ in range(60)
    ]
    lines = [
        json.dumps({"text": t}) + ("\n\n" if i % 7 == 0 else "\n") for i, t in enumerate(texts)
    ]
    (tmp_path / "a.jsonl").write_text("".join(lines))
    table = pa.table({"text": texts[:20]})
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=3)
    sources = [{"path": str(tmp_path / "a.jsonl")}, {"path": str(tmp_path / "b.parquet")}]
    spec = make_spec(tmp_path, sources)
    inputs = corpus.resolve_inputs(spec.data.sources)
    settings = {"seed": 0, "val_fraction": 0.0, "block_bytes": 50}
    for unit_bytes in (1, 37, 200, 1 << 20):
        got, ids = [], []
        plan = corpus.plan_units(inputs, unit_bytes)
        for unit in plan:
            for t in corpus.unit_tables(unit, inputs, settings):
                got += t.column("data").to_pylist()
                ids += t.column("ident").to_pylist()
        assert got == [t.encode() for t in texts + texts[:20]], unit_bytes
        assert ids[-20:] == [f"{inputs[1]['path']}:{n}" for n in range(20)]
        if unit_bytes == 1:
            assert len(plan) == inputs[0]["bytes"] + 7  # a range per byte, one per row group
        if unit_bytes == 1 << 20:
            assert len(plan) == 1 and ids[:2] == [
                f"{inputs[0]['path']}:0",
                f"{inputs[0]['path']}:2",
            ]


def test_tail_counts_against_a_naive_reference():
    rng = np.random.default_rng(5)
    for _ in range(300):
        lengths = rng.integers(0, 12, rng.integers(0, 8))
        doc = np.concatenate([np.full(n + 2, i) for i, n in enumerate(lengths)] + [np.zeros(0)])
        is_text = np.concatenate([[0, *[1] * n, 0] for n in lengths] + [np.zeros(0)]).astype(bool)
        covered = int(rng.integers(0, len(doc) + 1))
        out = doc[covered:]
        inside = set(doc[:covered].tolist())
        want = {
            "tokens": len(out),
            "bytes": int(is_text[covered:].sum()),
            "documents_lost": len(set(out.tolist()) - inside),
            "documents_cut": len(set(out.tolist()) & inside),
        }
        assert units.tail_counts(np.asarray(lengths, np.int64), covered) == want


@contextlib.contextmanager
def s3_server(monkeypatch: pytest.MonkeyPatch, bucket: str) -> Iterator[pafs.FileSystem]:
    """moto's standalone S3 server on a free loopback port, with ``bucket`` created; the
    ``AWS_*`` variables point pyarrow (and boto3) at it until the block ends. Yields the
    filesystem (paths ``bucket/...``)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for k, v in {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(k, v)
        deadline = time.time() + 30
        while True:
            try:
                fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?allow_bucket_creation=true")
                fs.create_dir(bucket)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        yield fs
    finally:
        server.terminate()
        server.wait()


def test_s3_compatible_storage(tmp_path, monkeypatch):
    """The dataset lives only in a bucket of an S3 server on loopback (moto's standalone server,
    reached by pyarrow's S3 client as a real S3): written by the tasks, complete, read back equal
    to the local build, reused, and resumed unit by unit."""
    import torch

    from pipelines.data import TrainBatches, val_batches

    with s3_server(monkeypatch, "bkt") as fs:
        recs = [{"text": f"doc {i}: " + "some words here. " * (i % 9 + 1)} for i in range(120)]
        write_jsonl(tmp_path / "c.jsonl", recs)
        src = [{"path": str(tmp_path / "c.jsonl")}]
        kw = {"unit_bytes": 1500, "val_fraction": 0.2, "shard_sequences": 20}
        uri = "s3://bkt/datasets/ds"
        info = pp.preprocess(make_spec(tmp_path, src, dataset_dir=uri, **kw))
        local = pp.preprocess(make_spec(tmp_path, src, **kw))
        assert info.path == uri and is_complete(uri) and not (tmp_path / "bkt").exists()
        for split in ("train", "val"):
            for a, b in zip(load_split(uri, split), load_split(local.path, split)):
                np.testing.assert_array_equal(a, b)
        streamed = [b for b, _ in zip(TrainBatches(uri, 4, seed=1), range(2))]  # row groups on S3
        for a, b in zip(streamed, TrainBatches(local.path, 4, seed=1)):
            np.testing.assert_array_equal(a.ids, b.ids)
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.target_levels, b.target_levels)
        for a, b in zip(val_batches(uri, 4, max_batches=2), val_batches(local.path, 4)):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.levels, b.levels)
        names = [i.path for i in fs.get_file_info(pafs.FileSelector("bkt/datasets/ds/units"))]
        assert len(names) == info.manifest["units"]["planned"] > 3
        assert pp.preprocess(make_spec(tmp_path, src, dataset_dir=uri, **kw)).reused
        fs.delete_file("bkt/datasets/ds/manifest.json")
        fs.delete_file(names[1])
        assert not is_complete(uri)
        again = pp.preprocess(make_spec(tmp_path, src, dataset_dir=uri, **kw))
        assert again.manifest["units"]["reused"] == len(names) - 1 and is_complete(uri)


def test_dataset_identity_from_contents_not_paths(tmp_path, monkeypatch):
    """A copy of the corpus elsewhere (a `ray job submit` working dir) finds the same dataset;
    changed contents do not. Checksums come from the local cache the second time."""
    from pipelines import corpus

    monkeypatch.setenv("AUNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(corpus, "_SHA_MEMO", {})
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        write_jsonl(tmp_path / d / "c.jsonl", [{"text": "same words here. " * 20}] * 3)

    def spec(d: str) -> ExperimentSpec:
        raw = make_spec(tmp_path, [{"path": str(tmp_path / d / "*.jsonl")}]).to_dict()
        raw["data"].pop("dataset_dir")
        return ExperimentSpec.from_dict(raw, source="test")

    first = pp.preprocess(spec("a"))
    assert spec("b").dataset_dir() == spec("a").dataset_dir() == str(first.path)
    assert pp.preprocess(spec("b")).reused
    cached = json.loads((tmp_path / "cache" / "sha256.json").read_text())
    assert {os.path.realpath(tmp_path / d / "c.jsonl") for d in "ab"} <= set(cached)
    write_jsonl(tmp_path / "b" / "c.jsonl", [{"text": "other words. " * 20}] * 3)
    assert spec("b").dataset_dir() != spec("a").dataset_dir()


def test_checksum_cache_survives_concurrent_writers(tmp_path):
    """Four processes hash files into one cache at once (pytest -n, jobs on one node): the cache
    is always whole JSON (each write is a rename), every entry is the file's true SHA-256, and no
    temporary file is left behind."""
    files = []
    for i in range(24):
        files.append(tmp_path / "in" / f"f{i}.txt")
        files[-1].parent.mkdir(exist_ok=True)
        files[-1].write_bytes(bytes([i]) * (1000 * i))
    code = (
        "import sys; from pipelines.corpus import cached_sha256\n"
        "for p in sys.argv[1:]: cached_sha256(p)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "AUNET_CACHE_DIR": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, *map(str, files[k::4])], env=env)
        for k in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    cached = json.loads((tmp_path / "cache" / "sha256.json").read_text())
    assert os.listdir(tmp_path / "cache") == ["sha256.json"]
    assert len(cached) >= 6  # at least the last writer's own files
    for path, (size, _, digest) in cached.items():
        assert (size, digest) == (
            os.path.getsize(path),
            hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        )
