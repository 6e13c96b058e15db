"""The entropy split strategy (aunet/entropy.py): a naive per-byte reference, codepoint handling
per script, prefix stability, one level per byte, fitting and resolving targets, determinism.

The rules under test: docs/design.md (Splitting: entropy-driven boundaries).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aunet.entropy import PAD, EntropyModel, EntropyStrategyError, abbreviate, fit, resolve
from aunet.splitting import Splitter

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "experiments" / "data" / "quickstart.jsonl.gz"
MASK64 = (1 << 64) - 1


def model_value(model: EntropyModel, t: float) -> str:
    return f"t={t:g} order={model.order} model={model.encode()} sha256={model.sha256}"


def random_model(order: int, buckets: int, seed: int) -> EntropyModel:
    rng = np.random.default_rng(seed)
    return EntropyModel(order, rng.integers(0, 129, buckets, dtype=np.uint8).tobytes())


def naive_levels(data: bytes, stages: list[tuple[EntropyModel, float]]) -> list[int]:
    """Byte by byte in plain Python: the context tuple, its hash, the codepoint test."""
    out = []
    for i in range(len(data)):
        ends = any(k <= i + 1 and _one_codepoint(data[i - k + 1 : i + 1]) for k in range(1, 5))
        level = 0
        for s, (model, t) in enumerate(stages):
            ctx = 0
            for j in range(model.order):
                p = i - j
                pad = p < 0 or any(data[q] == PAD for q in range(max(p, 0), i + 1))
                ctx |= (PAD if pad else data[p]) << (8 * j)
            bits = model.buckets.bit_length() - 1
            bucket = (((ctx + 1) * 0x9E3779B97F4A7C15) & MASK64) >> (64 - bits)
            if ends and model.table[bucket] >= t * 16:
                level = s + 1
        out.append(level)
    return out


def _one_codepoint(chunk: bytes) -> bool:
    try:
        return len(chunk.decode("utf-8")) == 1
    except UnicodeDecodeError:
        return False


MODELS = [random_model(3, 4096, 0), random_model(1, 256, 1), random_model(5, 1024, 2)]
STAGES = [
    [(MODELS[0], 4.0)],
    [(MODELS[1], 2.5), (MODELS[1], 6.0)],
    [(MODELS[2], 0.0), (MODELS[2], 7.5)],
]


def splitter_for(stages: list[tuple[EntropyModel, float]]) -> Splitter:
    return Splitter({f"entropy{i + 1}": model_value(m, t) for i, (m, t) in enumerate(stages)})


MIXED = st.text(
    st.sampled_from(list("ab \n.1中文日本語かなカナ\u0e01\u0e48\u0627\u0644😀\u200d👍é\u0301")),
    max_size=24,
)
BYTES = (
    MIXED.map(str.encode)
    | st.binary(max_size=24)
    | st.tuples(MIXED, st.binary(max_size=3)).map(
        lambda p: p[1] + p[0].encode() + p[1] + b"\xff" + p[0].encode()[1:]
    )
)


@pytest.mark.parametrize("stages", STAGES, ids=["o3", "o1-2stages", "o5-2stages"])
@settings(max_examples=40, deadline=None)
@given(data=BYTES)
def test_matches_naive_reference_and_is_prefix_stable(stages, data):
    sp = splitter_for(stages)
    assert sp.prefix_stable
    full = sp.levels(data)
    assert full.dtype == np.uint8 and full.shape == (len(data),)  # one level per byte
    assert full.tolist() == naive_levels(data, stages)
    lookback = sp.stages[-1].lookback
    assert lookback == max(stages[0][0].order, 4)
    for n in range(len(data) + 1):  # every byte prefix, as generation feeds them
        np.testing.assert_array_equal(sp.levels(data[:n]), full[:n])
        if n:  # the last `lookback` bytes fix the last byte's level
            assert sp.levels(data[max(0, n - lookback) : n])[-1] == full[n - 1]
    batch = sp.levels_batch(data + data[::-1], np.array([len(data), len(data)]))
    np.testing.assert_array_equal(batch, np.concatenate([full, sp.levels(data[::-1])]))


@pytest.mark.parametrize(
    ("text", "ends"),
    [
        ("中文ab", "..|..|||"),  # Chinese: 3-byte codepoints, the level on the last byte
        ("日本語とEnglish", "..|..|..|..|" + "|" * 7),  # Japanese mixed with Latin
        ("\u0e01\u0e48\u0e32", "..|..|..|"),  # Thai: consonant, tone mark, vowel
        ("\u0627\u0644\u0639", ".|.|.|"),  # Arabic: 2-byte codepoints
        ("😀\u200d👍", "...|..|...|"),  # emoji (4 bytes) joined by ZWJ (3 bytes)
        ("a\xe9", "|.|"),  # Latin-1 letter: 2 bytes
    ],
)
def test_golden_codepoint_ends_per_script(text, ends):
    """A model scoring every context 4 bits and t=4: a boundary on every codepoint's last byte."""
    flat = EntropyModel(2, bytes([64]) * 256)
    levels = Splitter({"entropy1": model_value(flat, 4.0)}).levels(text.encode())
    assert "".join("|" if v else "." for v in levels) == ends
    assert not Splitter({"entropy1": model_value(flat, 4.0625)}).levels(text.encode()).any()
    broken = text.encode()[:-1] + b"\xe4\xb8" + b"a"  # a cut codepoint and a truncated one
    got = Splitter({"entropy1": model_value(flat, 4.0)}).levels(broken)
    assert got.tolist() == [int(c == "|") for c in ends[:-1]] + [0, 0, 1]


def test_long_han_run_linear_and_exact():
    """1.2 MB of Han in one run: whole == per-piece with the lookback as context."""
    han = ("中文日本語" * 80_000).encode()
    model = fit([han[:30_000] + b"abc def"], order=3, buckets=1024)
    sp = Splitter({"entropy1": model_value(model, 0.0625)})
    full = sp.levels(han)
    assert full.shape == (len(han),) and full[2::3].all() and not full[0::3].any()
    lb = sp.stages[0].lookback
    for cut in (1 << 19, 777_777):
        np.testing.assert_array_equal(
            sp.levels(han[cut - lb : cut + 900])[lb:], full[cut : cut + 900]
        )


def corpus_docs(limit: int = 200) -> list[bytes]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"].encode() for line in f][:limit]


def test_fit_resolve_nesting_and_determinism():
    docs = corpus_docs()
    strategy = {"entropy1": "rate=0.25", "entropy2": "contraction=12 order=3"}
    resolved, report = resolve(strategy, docs)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    again, report2 = resolve(strategy, shuffled)  # counts do not depend on document order
    assert again == resolved and report2 == report
    stages = report["stages"]
    assert stages["entropy1"]["threshold_bits"] <= stages["entropy2"]["threshold_bits"]
    sp = Splitter(resolved)
    levels = sp.levels_batch(b"".join(docs), np.array([len(d) for d in docs]))
    for k, s in (("entropy1", 1), ("entropy2", 2)):
        assert (levels >= s).mean() == pytest.approx(stages[k]["fit_rate"], abs=1e-12)
    assert abs(stages["entropy1"]["fit_rate"] - 0.25) < 0.02
    assert abs(stages["entropy2"]["fit_rate"] - 1 / 12) < 0.01
    # Naive table check: one bucket's add-alpha entropy from its counts, in float64.
    model = fit(docs[:20], order=2, buckets=256)
    from aunet.entropy import ALPHA, context_buckets

    counts = np.zeros((256, 256))
    for d in docs[:20]:
        raw = np.frombuffer(d, np.uint8)
        for b, nxt in zip(context_buckets(raw, 2, 256)[:-1].tolist(), raw[1:].tolist()):
            counts[b, nxt] += 1
    p = (counts + ALPHA) / (counts.sum(1, keepdims=True) + 256 * ALPHA)
    want = np.rint(-(p * np.log2(p)).sum(1) * 16)
    np.testing.assert_array_equal(np.frombuffer(model.table, np.uint8), want)
    # A separate interpreter (other hash seed) fits and splits the same.
    code = (
        "import gzip,json,hashlib,numpy as np;from aunet.entropy import resolve;"
        "from aunet.splitting import Splitter;"
        f"d=[json.loads(l)['text'].encode() for l in gzip.open({str(CORPUS)!r},'rt')][:200];"
        f"r,_=resolve({strategy!r},d);print(json.dumps(r))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert json.loads(out.stdout) == resolved, out.stderr


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ({"entropy1": "rate=0.2"}, "'entropy1'.*not resolved.*preprocessing"),
        ({"entropy1": "rate=0.2 foo=1"}, "'entropy1'.*'foo=1' is not one of"),
        ({"entropy1": "t=3.3 model=eJw= sha256=00"}, "'entropy1'.*multiple of 1/16"),
        ({"entropy1": "t=3 model=@@ sha256=00"}, "'entropy1'.*not base64"),
    ],
)
def test_bad_values_name_the_key(strategy, message):
    with pytest.raises(EntropyStrategyError, match=message):
        Splitter(strategy)


def test_resolve_refusals_and_damage():
    docs = corpus_docs(20)
    with pytest.raises(EntropyStrategyError, match="'entropy2'.*must nest"):
        resolve({"entropy1": "rate=0.05", "entropy2": "rate=0.3"}, docs)
    with pytest.raises(EntropyStrategyError, match="'entropy2'.*all entropy stages share"):
        resolve({"entropy1": "rate=0.3 order=2", "entropy2": "rate=0.1 order=3"}, docs)
    with pytest.raises(EntropyStrategyError, match="'entropy1'.*exactly one of"):
        resolve({"entropy1": "rate=0.3 contraction=3"}, docs)
    with pytest.raises(EntropyStrategyError, match="'entropy1'.*rate in"):
        resolve({"entropy1": "rate=1.5"}, docs)
    resolved, _ = resolve({"word1": "1@1", "entropy2": "rate=0.05"}, docs)
    assert resolved["word1"] == "1@1"
    damaged = resolved["entropy2"].replace("sha256=", "sha256=f")[:-1]
    with pytest.raises(EntropyStrategyError, match="'entropy2'.*sha256.*damaged"):
        Splitter({"word1": "1@1", "entropy2": damaged})
    short = abbreviate(json.dumps(resolved))  # what MLflow params show
    assert len(short) < 150 and resolved["entropy2"].split("sha256=")[1] in short
    sp = Splitter(resolved)  # mixed kinds: word boundaries at level 1, entropy ones at 2
    assert sp.prefix_stable and sp.levels(docs[0]).max() == 2
