"""Token-id datasets: pipelines.tokenizer and pipelines.preprocess with a ``tokenizer:`` section.

Windows are decoded back to the documents, bytes/token is recounted with the naive BPE of
tests/test_tokenizer.py, and the shards are byte-identical on 1 and 2 CPUs.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
from test_preprocess import digest, make_spec, write_jsonl
from test_tokenizer import naive_encode

from aunet.tokenizer import BPETokenizer
from pipelines import preprocess as pp
from pipelines import tokenizer as ptok
from pipelines import units
from pipelines.cli import expected_error
from pipelines.corpus import hash01
from pipelines.data import (
    DatasetError,
    ShardReader,
    load_split,
    manifest_tokenizer,
    read_manifest,
    token_dtype,
)
from pipelines.spec import ExperimentSpec, load_spec

WORDS = ["alpha", "beta", "gamma", "the", "there", "then", "ε", "日本語", "12345", "!!", "\n"]
VAL_FRACTION = 0.25


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def corpus_records(n: int = 160) -> list[dict]:
    rng = np.random.default_rng(1)
    recs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, rng.integers(1, 50)))
        recs.append({"id": f"d{i}", "text": text, "lang": ["en", "de", "ja"][i % 3]})
    recs[5]["text"] = "x"  # one-token documents and long ones alike
    return recs


def bpe_spec(tmp: Path, vocab_size: int = 320, **data) -> ExperimentSpec:
    src = [{"path": str(tmp / "c.jsonl"), "id_field": "id", "lang_field": "lang"}]
    settings = {"val_fraction": VAL_FRACTION, "unit_bytes": 2500, "shard_sequences": 4, **data}
    raw = make_spec(tmp, src, **settings).to_dict()
    raw["model"] = {"dimensions": [8], "layers": [1], "head_dims": [8], "strategy": {}}
    raw["tokenizer"] = {"vocab_size": vocab_size}
    return ExperimentSpec.from_dict(raw, source="test")


def split_of(rec: dict) -> str:
    """The train/val assignment, recomputed (docs/data.md, Reading corpora)."""
    return "val" if hash01(b"0", b"split", b"id:" + rec["id"].encode()) < VAL_FRACTION else "train"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokds")
    recs = corpus_records()
    write_jsonl(tmp / "c.jsonl", recs)
    spec = bpe_spec(tmp)
    return tmp, recs, spec, pp.preprocess(spec)


def unit_streams(path: Path, split: str) -> list[tuple[dict, np.ndarray]]:
    """(unit record, the unit's stream with the windows' one-token overlaps undone), unit order."""
    tok, _ = load_split(path, split)
    shards = read_manifest(path)["splits"][split]["shards"]
    unit_of_row = np.repeat([s["unit"] for s in shards], [s["sequences"] for s in shards])
    out = []
    for rec_file in sorted((path / "units").glob("u*.json")):
        rec = json.loads(rec_file.read_text())
        t = tok[unit_of_row == rec["unit"]]
        for a, b in zip(t, t[1:]):
            assert a[-1] == b[0]
        stream = np.concatenate([t[0], t[1:, 1:].ravel()]) if len(t) else np.zeros(0, np.int64)
        out.append((rec, stream))
    return out


def test_tokenizer_trains_on_the_training_split_only(built):
    tmp, recs, spec, info = built
    train = [r["text"].encode() for r in recs if split_of(r) == "train"]
    assert 0 < len(train) < len(recs)
    naive = BPETokenizer.train(train, 320)
    tok = manifest_tokenizer(info.path)
    assert tok.sha256 == naive.sha256 == info.manifest["tokenizer"]["sha256"]
    assert (Path(info.path) / "tokenizer.json").read_text() == tok.to_json()
    assert info.manifest["tokenizer"]["source"] == ptok.tokenizer_path(spec)
    m = info.manifest["tokenizer"]
    assert (m["vocab_size"], m["bos_id"], m["eos_id"], m["pad_id"], m["pattern"]) == (
        tok.vocab_size,
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
        "gpt2",
    )


@pytest.mark.parametrize("split", ["train", "val"])
def test_windows_decode_back_to_the_documents(built, split):
    """Per unit: whole documents decode to their source, a cut one to a prefix of it, and every
    document's bytes are in a window or counted in the tail."""
    tmp, recs, spec, info = built
    tok = manifest_tokenizer(info.path)
    want = [r["text"].encode() for r in recs if split_of(r) == split]
    tokens, levels = load_split(info.path, split)
    assert tokens.dtype == np.uint16 and not levels.any() and len(tokens) > 3
    i = 0
    n_units = 0
    for rec, stream in unit_streams(Path(info.path), split):
        r = rec["splits"][split]
        docs = want[i : i + r["documents"]]
        i += r["documents"]
        n_units += 1
        if not len(stream):
            assert r["sequences"] == 0 and r["tail"]["bytes"] == sum(map(len, docs))
            continue
        assert stream[0] == tok.bos_id
        starts = np.flatnonzero(stream == tok.bos_id).tolist() + [len(stream)]
        pieces = [stream[a:b] for a, b in zip(starts, starts[1:])]
        whole = [p for p in pieces if p[-1] == tok.eos_id]
        cut = [p for p in pieces if p[-1] != tok.eos_id]
        assert len(cut) == r["tail"]["documents_cut"] <= 1
        assert len(whole) + len(cut) + r["tail"]["documents_lost"] == len(docs)
        for p, d in zip(whole, docs):
            assert p[1:-1].tolist() == tok.encode(d).tolist()
            assert tok.decode(p) == d  # BOS/EOS decode to nothing
        seen = sum(len(tok.decode(p)) for p in pieces)
        if cut:
            assert docs[len(whole)].startswith(tok.decode(cut[0]))
        assert seen + r["tail"]["bytes"] == r["bytes"] == sum(map(len, docs))
        assert len(stream) + r["tail"]["tokens"] == sum(len(tok.encode(d)) + 2 for d in docs)
    assert i == len(want) and n_units == info.manifest["units"]["used"] > 2
    s = info.manifest["splits"][split]
    assert s["bytes"] == sum(map(len, want)) and s["documents"] == len(want)


def test_bytes_per_token_against_a_naive_recount(built):
    tmp, recs, spec, info = built
    tok = manifest_tokenizer(info.path)
    n_bytes: dict[str, int] = {}
    n_tokens: dict[str, int] = {}
    for r in recs:
        if split_of(r) != "train":
            continue
        d = r["text"].encode()
        for key in ("all", r["lang"]):
            n_bytes[key] = n_bytes.get(key, 0) + len(d)
            n_tokens[key] = n_tokens.get(key, 0) + len(naive_encode(tok, d))
    want = {k: n_bytes[k] / n_tokens[k] for k in n_bytes}
    got = info.manifest["bytes_per_token"]
    assert set(got) == {"all", "en", "de", "ja"}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k
    assert got["all"] > 1.5  # merges compress even at 320 ids


def test_reuse_and_identity(built, capsys):
    tmp, recs, spec, info = built
    again = pp.preprocess(spec)
    assert again.reused and again.manifest["config_hash"] == info.manifest["config_hash"]
    # Another vocabulary: another dataset directory, another tokenizer file.
    other = bpe_spec(tmp, vocab_size=300)
    assert other.dataset_hash() != spec.dataset_hash()
    assert ptok.tokenizer_path(other) != ptok.tokenizer_path(spec)
    # Packing settings do not retrain the tokenizer; they do change the dataset.
    packed = spec.with_overrides({"data.seq_len": 12})
    assert ptok.tokenizer_path(packed) == ptok.tokenizer_path(spec)
    assert packed.dataset_hash() != spec.dataset_hash()
    byte_raw = spec.to_dict()
    byte_raw["tokenizer"] = None
    byte_spec = ExperimentSpec.from_dict(byte_raw, source="t")
    assert byte_spec.dataset_hash() != spec.dataset_hash()
    assert "tokenizer" not in pp._settings(byte_spec)  # byte unit keys are unchanged


def test_manifest_tokenizer_verifies_the_file(built, tmp_path):
    _, _, _, info = built
    copy = tmp_path / "copy"
    shutil.copytree(info.path, copy)
    assert manifest_tokenizer(copy).sha256 == info.manifest["tokenizer"]["sha256"]
    BPETokenizer.train([b"other text entirely, other merges"] * 3, 300).save(
        copy / "tokenizer.json"
    )
    with pytest.raises(DatasetError, match="not the manifest's"):
        manifest_tokenizer(copy)
    assert expected_error(DatasetError("x")) is not None  # the command lines print one line
    (copy / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        manifest_tokenizer(copy)
    byte_manifest = {k: v for k, v in info.manifest.items() if k != "tokenizer"}
    assert manifest_tokenizer(copy, byte_manifest) is None  # a byte dataset has none


def test_max_documents_cuts_tokens_and_training_alike(built, tmp_path):
    _, recs, _, _ = built
    write_jsonl(tmp_path / "c.jsonl", recs)
    info = pp.preprocess(bpe_spec(tmp_path, max_documents=37))
    m = info.manifest
    first = recs[:37]
    assert m["documents"]["written"] == 37
    for s in ("train", "val"):
        assert m["splits"][s]["bytes"] == sum(
            len(r["text"].encode()) for r in first if split_of(r) == s
        )
    train = [r["text"].encode() for r in first if split_of(r) == "train"]
    assert m["tokenizer"]["sha256"] == BPETokenizer.train(train, 320).sha256


def test_cli_trains_prints_and_preprocess_reuses(tmp_path, capsys):
    import yaml

    write_jsonl(tmp_path / "c.jsonl", corpus_records(60))
    raw = bpe_spec(tmp_path, 300).to_dict()
    raw["data"].pop("dataset_dir")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    assert ptok.main([str(tmp_path / "spec.yaml")]) == 0
    out, err = capsys.readouterr()
    path = Path(out.strip())
    assert path.is_file() and path.parent.parent == tmp_path / "datasets" / "tokenizers"
    tok = BPETokenizer.load(path)
    assert f"sha256 {tok.sha256}" in err and "trained vocab_size 300" in err
    assert "bytes/token train " in err and " val " in err
    assert ptok.main([str(tmp_path / "spec.yaml")]) == 0
    assert "tokenizer: reused" in capsys.readouterr().err
    # Preprocess finds the CLI's file, trains nothing, and the manifest points at it.
    info = pp.preprocess(load_spec(tmp_path / "spec.yaml"))
    assert info.manifest["tokenizer"]["source"] == str(path)
    assert info.manifest["tokenizer"]["sha256"] == tok.sha256
    # A named file: used as is; a mismatching vocab_size is one error naming the key.
    named = [f"tokenizer.path={path}", "tokenizer.vocab_size=null"]
    assert ptok.main([str(tmp_path / "spec.yaml"), *named]) == 0
    assert capsys.readouterr().out.strip() == str(path)
    bad = [f"tokenizer.path={path}", "tokenizer.vocab_size=400"]
    assert ptok.main([str(tmp_path / "spec.yaml"), *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: tokenizer.vocab_size: 400, but {path} has 300"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tokenizer=null"], "tokenizer: the spec has no tokenizer section"),
        (["tokenizer.vocab_size=100"], "tokenizer.vocab_size: expected int in [260, 2**20]"),
        (["tokenizer.pattern=gpt4"], "tokenizer.pattern: expected str in (gpt2, llama3)"),
        (["model.strategy={word1: '1@1'}", "model.dimensions=[8, 8]", "model.layers=[1, 1]",
          "model.head_dims=[8, 8]"], "set model.strategy: {}"),
        (["tokenizer.path=nope.json"], "tokenizer.path: no such file"),
    ],
)  # fmt: skip
def test_cli_bad_input_is_one_line(tmp_path, capsys, overrides, message):
    import yaml

    write_jsonl(tmp_path / "c.jsonl", corpus_records(10))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(bpe_spec(tmp_path).to_dict()))
    assert ptok.main([str(tmp_path / "spec.yaml"), *overrides]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line, line


def test_variant_sets_a_vocabulary(tmp_path, capsys):
    import yaml

    write_jsonl(tmp_path / "c.jsonl", corpus_records(80))
    raw = bpe_spec(tmp_path).to_dict()
    raw["tokenizer"] = None
    raw["variants"] = {
        "bytes": {},
        "bpe": {"tokenizer.vocab_size": 280, "tokenizer.pattern": "llama3"},
        "bpe2": {"tokenizer.vocab_size": 270},
    }
    spec = ExperimentSpec.from_dict(raw, source="t").with_variant("bpe")
    assert (spec.tokenizer.vocab_size, spec.tokenizer.pattern) == (280, "llama3")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    assert ptok.main([str(tmp_path / "spec.yaml"), "variant=bpe"]) == 0
    (one,) = capsys.readouterr().out.split()
    assert BPETokenizer.load(one).pattern == "llama3"
    assert ptok.main([str(tmp_path / "spec.yaml")]) == 0  # every variant with a tokenizer
    both = capsys.readouterr().out.split()
    assert both[0] == one and [BPETokenizer.load(p).vocab_size for p in both] == [280, 270]


def test_writer_packs_uint32_ids_for_a_large_vocabulary(tmp_path):
    """Training a >65536-id vocabulary is too slow for a test: the writer gets a tokenizer-shaped
    vocabulary of 70000 ids (only its size, specials and per-id byte lengths are read)."""
    assert token_dtype(None) is np.uint16 and token_dtype(1 << 16) is np.uint16
    assert token_dtype((1 << 16) + 1) is np.uint32
    V = 70_000
    lengths = np.ones(V, np.int64)
    lengths[V - 3 :] = 0
    vocab = types.SimpleNamespace(
        vocab_size=V, bos_id=V - 3, eos_id=V - 2, pad_id=V - 1, token_lengths=lengths
    )
    fs = pafs.LocalFileSystem()
    w = units._SplitWriter(fs, str(tmp_path), "train", 0, 8, 2, 0, vocab)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, V - 3, n) for n in (5, 30, 1, 12)]
    w.add(np.concatenate(docs), np.zeros(sum(map(len, docs)), np.uint8), [len(d) for d in docs],
          [len(d) for d in docs])  # fmt: skip
    rec = w.finish()
    stream = np.concatenate([np.r_[V - 3, d, V - 2] for d in docs])
    n = rec["sequences"]
    assert n == (len(stream) - 1) // 8 and rec["tail"]["tokens"] == len(stream) - (n * 8 + 1)
    f = tmp_path / "train" / rec["shards"][0]["file"]
    assert str(pq.read_schema(f).field("tokens").type) == "fixed_size_list<element: uint32>[9]"
    start = 0
    for sh in rec["shards"]:
        sh.update(unit=0, start=start)
        start += sh["sequences"]
    manifest = {
        "seq_len": 8,
        "splits": {"train": {"shards": rec["shards"]}},
        "tokenizer": {"vocab_size": V},
    }
    rows, _ = ShardReader(tmp_path, "train", manifest=manifest).rows(np.arange(n))
    assert rows.dtype == np.uint32
    want = np.lib.stride_tricks.sliding_window_view(stream[: n * 8 + 1], 9)[::8]
    np.testing.assert_array_equal(rows, want)
    assert rows.max() > 1 << 16
    # The tail's bytes: 1 byte per text id past the last window, BOS/EOS none.
    assert rec["tail"]["bytes"] == int(lengths[stream[n * 8 + 1 :]].sum())


def test_same_shards_on_one_and_two_cpus(built, tmp_path):
    """Last in the module: it restarts Ray with 1 CPU (the fixture's session had 2)."""
    src, recs, spec, info = built
    write_jsonl(tmp_path / "c.jsonl", recs)
    two = digest(Path(info.path))
    ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    one = pp.preprocess(bpe_spec(tmp_path), force=True)
    assert digest(Path(one.path)) == two and len(two) > 6
    assert (Path(one.path) / "tokenizer.json").read_bytes() == (
        Path(info.path) / "tokenizer.json"
    ).read_bytes()
    assert one.manifest["bytes_per_token"] == info.manifest["bytes_per_token"]
    assert one.manifest["config_hash"] == info.manifest["config_hash"]
