"""aunet/tokenizer.py: exact byte round trip, real compression, and HF's encoding == a naive BPE."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from aunet.tokenizer import PATTERNS, BPETokenizer, byte_to_char, utf8_runs

DATA = Path(__file__).resolve().parents[1] / "experiments" / "data"


def corpus(name: str = "quickstart.jsonl.gz") -> list[bytes]:
    with gzip.open(DATA / name, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"].encode("utf-8") for line in f]


@pytest.fixture(scope="module")
def docs() -> list[bytes]:
    return corpus()


@pytest.fixture(scope="module")
def tok(docs) -> BPETokenizer:
    # A third of the corpus keeps training to ~3 s on the shared cores.
    return BPETokenizer.train(docs[::3], 4096)


ADVERSARIAL = [
    b"",
    b"\x00",
    b"\x00" * 50,
    bytes(range(256)),
    bytes(range(255, -1, -1)) * 3,
    b"\xff\xfe\xfd",
    b"abc\xc3",  # truncated 2-byte sequence at the end
    b"\xc3abc",  # lead byte without continuation
    b"\x80\x80 the \xbf",  # stray continuations
    b"\xed\xa0\x80\xed\xb0\x80",  # UTF-8 of lone surrogates (invalid)
    b"\xc0\xaf\xe0\x80\xaf",  # overlongs
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    "😀 emoji 👩‍👩‍👧 and CJK 日本語の文章".encode(),
    b"line\r\nline\rline\n\n\r\n",
    b"a" * 20000,
    b" " * 5000 + b"x",
    "é".encode() * 3000,
    b"  's 'LL 123456789 ...!!!\t\t\n",
]


def test_byte_level_table_is_hf_alphabet():
    from tokenizers import pre_tokenizers

    table = byte_to_char()
    assert len(set(table)) == 256
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())


def test_utf8_runs_partition():
    data = b"ok\xffstill \xe6\x97\xa5\xe6\x97 end\x00"
    runs = utf8_runs(data)
    assert b"".join(p for _, p in runs) == data
    assert [ok for ok, _ in runs] == [True, False, True, False, True]  # maximal: runs alternate
    for ok, piece in runs:
        if ok:
            piece.decode("utf-8")
        else:  # ASCII is always valid, so an invalid piece holds none
            assert all(b >= 0x80 for b in piece)
    assert utf8_runs(b"") == [] and utf8_runs(b"\xff") == [(False, b"\xff")]


def test_ids_layout(tok):
    assert tok.token_bytes[:256] == [bytes([b]) for b in range(256)]
    n = len(tok.token_bytes)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (n, n + 1, n + 2, n + 3)
    assert tok.vocab_size == 4096  # the corpus third has more than enough pairs
    assert tok.token_lengths.shape == (tok.vocab_size,) and tok.token_lengths.dtype == np.int64
    assert tok.token_lengths.tolist() == [len(t) for t in tok.token_bytes] + [0, 0, 0]
    assert tok.decode([tok.bos_id, 104, tok.eos_id, tok.pad_id]) == b"h"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_round_trip_shipped_corpus(tok):
    for name in ("quickstart.jsonl.gz", "quickstart_val.jsonl.gz"):
        docs = corpus(name)
        encoded = tok.encode_batch(docs)
        for d, ids in zip(docs, encoded, strict=True):
            assert ids.dtype == np.int64
            assert tok.decode(ids) == d


@pytest.mark.parametrize("data", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_round_trip_adversarial(tok, data, pattern):
    t = tok if pattern == "gpt2" else _llama(tok)
    ids = t.encode(data)
    assert t.decode(ids) == data
    assert ids.dtype == np.int64 and ((ids >= 0) & (ids < len(t.token_bytes))).all()
    assert [x.tolist() for x in t.encode_batch([data, b"x", data])] == [
        ids.tolist(),
        [120],
        ids.tolist(),
    ]


_LLAMA: dict[str, BPETokenizer] = {}


def _llama(tok: BPETokenizer) -> BPETokenizer:
    """The same merges under the LLaMA-3 regex: enough to exercise its pre-tokenizer."""
    if "t" not in _LLAMA:
        _LLAMA["t"] = BPETokenizer(tok.token_bytes, tok.merges, "llama3")
    return _LLAMA["t"]


def test_invalid_bytes_are_byte_ids(tok):
    ids = tok.encode(b"the\xffthe")
    assert 255 in ids.tolist()
    assert tok.encode(b"\xff\xfe").tolist() == [255, 254]


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=300)
    | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass"))
)
def test_round_trip_property(tok, data):
    assert tok.decode(tok.encode(data)) == data


def test_merges_compress_english(tok):
    with gzip.open(DATA / "quickstart_val.jsonl.gz", "rt", encoding="utf-8") as f:
        english = [r["text"].encode() for r in map(json.loads, f) if r["lang"] == "en"]
    assert english
    n_bytes = sum(len(d) for d in english)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(english))
    assert n_bytes / n_tokens > 2.0, n_bytes / n_tokens  # held-out text: 3.4 here


def naive_encode(tok: BPETokenizer, data: bytes) -> list[int]:
    """Slow, obvious BPE: UTF-8 runs, regex pre-tokens, merge the lowest-rank pair until none."""
    rank = {pair: r for r, pair in enumerate(tok.merges)}
    index = {t: i for i, t in enumerate(tok.token_bytes)}
    out: list[int] = []
    for ok, piece in utf8_runs(data):
        if not ok:
            out.extend(piece)
            continue
        for word in regex.findall(PATTERNS[tok.pattern], piece.decode("utf-8")):
            ids = list(word.encode("utf-8"))
            while len(ids) > 1:
                pairs = [
                    (rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(ids, ids[1:]))
                ]
                best, i = min(pairs)
                if best == len(rank):
                    break
                merged = index[tok.token_bytes[ids[i]] + tok.token_bytes[ids[i + 1]]]
                ids = ids[:i] + [merged] + ids[i + 2 :]
            out.extend(ids)
    return out


def test_encode_equals_naive_reference(tok, docs):
    rng = random.Random(0)
    sample = []
    for d in rng.sample(docs, 40):  # slices keep the pure-Python reference fast
        start = rng.randrange(max(1, len(d) - 600))
        sample.append(d[start : start + 600])
    sample += ADVERSARIAL[:14]
    sample += [bytes(rng.randrange(256) for _ in range(200)) for _ in range(100)]
    sample += [rng.choice(docs)[:300] + b"\xff" + rng.choice(docs)[-300:] for _ in range(100)]
    assert len(sample) >= 250
    for t in (tok, _llama(tok)):
        for data, ids in zip(sample, t.encode_batch(sample), strict=True):
            assert ids.tolist() == naive_encode(t, data), data[:60]


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    back = BPETokenizer.load(path)
    assert back.sha256 == tok.sha256 and back.to_json() == tok.to_json()
    assert back.token_bytes == tok.token_bytes and back.merges == tok.merges
    sample = corpus("quickstart_val.jsonl.gz")[:5]
    assert [x.tolist() for x in back.encode_batch(sample)] == [
        x.tolist() for x in tok.encode_batch(sample)
    ]
    assert json.loads(path.read_text())["format"] == "aunet-bpe"


def test_load_rejects_bad_files(tok, tmp_path):
    doc = json.loads(tok.to_json())
    cases = {
        "not json": "{",
        "other format": json.dumps({**doc, "format": "x"}),
        "pattern": json.dumps({**doc, "pattern": "nope"}),
        "merge": json.dumps({**doc, "merges": [*doc["merges"], [0, 10**6]]}),
        "specials": json.dumps({**doc, "specials": {"bos": 1, "eos": 2, "pad": 3}}),
        "duplicate": json.dumps({**doc, "tokens": [*doc["tokens"], doc["tokens"][0]]}),
    }
    for name, text in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        with pytest.raises(ValueError, match=str(path)):
            BPETokenizer.load(path)


def test_training_is_deterministic(docs):
    part = docs[::9]
    a = BPETokenizer.train(part, 1024)
    b = BPETokenizer.train(iter(part), 1024)
    assert a.sha256 == b.sha256
    c = BPETokenizer.train(part, 1024, pattern="llama3")
    assert c.sha256 != a.sha256 and c.pattern == "llama3"
    assert a.vocab_size == 1024


def test_training_decodes_invalid_utf8_for_training_only():
    texts = [b"ab\xffab\xffab\xffab", b"\x00\x00\x00\x00"]
    t = BPETokenizer.train(texts, 300)
    for d in texts:
        assert t.decode(t.encode(d)) == d


def test_train_rejects_bad_settings():
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train([b"abc"], 259)
    with pytest.raises(ValueError, match="pattern"):
        BPETokenizer.train([b"abc"], 1000, pattern="gpt4")
