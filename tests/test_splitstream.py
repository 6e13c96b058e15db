"""Incremental levels (``Splitter.stream``) against the naive definition: each byte's level is
``levels(prefix ending there)[-1]`` (docs/design.md, Generation: incremental levels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_entropy import MODELS, model_value
from test_generate import make_model, naive_greedy, naive_logits

from aunet import splitstream
from aunet.generate import Generator, generate
from aunet.splitting import Splitter, register_strategy

# Nasty pieces: invalid and truncated UTF-8, CRLF and blank runs before newlines, digit and
# punctuation runs, Han / kana / Thai runs with combining marks, escapes mid-chain.
PIECES = [b" ", b"  ", b"\t", b"\n", b"\r\n", b"\r\n\r\n", b" \r\n", b"\r", b"\x0b", b"\x85"]
PIECES += [b"a", b"word", b"Z", b"1", b"234", b"..", b",", b"!!!", b"(", b"\xff", b"\x80", b"\xc0"]
PIECES += [b"\xe4", b"\xe4\xb8", b"\xed\xa0\x80", b"\xf0\x9f", b"\xf4\x90\x80\x80", b"\xc3"]
PIECES += [s.encode() for s in ["日本語", "中文字", "々", "カタカナ", "ー", "ひら", "\u3099", "。"]]
PIECES += [s.encode() for s in ["ภาษาไทย", "ที่", "\u0e31", "é", "😀", "\u3000", "٣", "²"]]
NASTY = st.lists(st.sampled_from(PIECES), max_size=30).map(b"".join) | st.binary(max_size=30)
STRATEGIES = [
    {"word1": "1@1"},
    {"word1": "1@1", "word2": "2@1"},
    {"word": "2@2-3"},
    {"script1": "1@1 han=2 thai=3", "script2": "2@1 kana=2"},
    {"script": "1@2 han=1 thai=1"},
    {"word1": "1@1", "script2": "3@1 thai=2 han=3"},
]


pytestmark = pytest.mark.usefixtures("one_thread")


def naive_stream(sp: Splitter, data: bytes) -> np.ndarray:
    return np.array([sp.levels(data[: i + 1])[-1] for i in range(len(data))], np.uint8)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
@settings(max_examples=60, deadline=None)
@given(data=NASTY, cuts=st.lists(st.integers(0, 30), max_size=3))
def test_stream_equals_levels_of_each_prefix(strategy, data, cuts):
    sp = Splitter(strategy)
    stream = sp.stream()
    cuts = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})  # pushes of any size
    got = np.concatenate(
        [np.zeros(0, np.uint8)] + [stream.push(data[a:b]) for a, b in zip(cuts, cuts[1:])]
    )
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, naive_stream(sp, data))


def test_stream_examples():
    sp = Splitter({"word1": "1@1", "word2": "2@1"})
    # the whitespace-before-newline case: the match starts on the blank, known only once the
    # newline arrives, so generation gives both 0 where levels() of the whole text gives 2 0
    assert sp.stream().push(b" \n-").tolist() == [0, 0, 2]
    assert sp.levels(b" \n-").tolist() == [2, 0, 2]
    # a truncated character is 0 until it completes; then its last byte carries the level
    han = Splitter({"script1": "1@1 han=1"}).stream()
    assert han.push("日本".encode()).tolist() == [0, 0, 1, 0, 0, 1]


class _Lookback:
    """A stage kind with a bounded context: a boundary on the byte after every 'x'."""

    lookback = 2


def test_resplit_fallback_custom_and_lookback(monkeypatch):
    register_strategy("xafter", r"(?<=x).")
    sp = Splitter({"word1": "1@1", "xafter": ""})
    data = b"ax bxx  cx\xffxdx y"
    assert sp.stream().push(data).tolist() == naive_stream(sp, data).tolist()
    # with a `lookback`, only that many trailing bytes are re-split
    seen = []
    real = Splitter.levels

    def spy(self, d):
        seen.append(len(d))
        return real(self, d)

    stream = sp.stream()
    stage = stream._resplit[0][1].stages[0]
    monkeypatch.setattr(Splitter, "levels", spy)
    monkeypatch.setattr(stream, "_resplit", [(1, stream._resplit[0][1], _Lookback.lookback)])
    assert stage.kind == "xafter"
    out = stream.push(b"ax" * 100)
    assert max(seen) == 2 and out.tolist()[-2:] == [2, 0]


def test_stream_work_is_linear():
    """4 KB of generated text: one rule update per codepoint, never a re-split (counted)."""
    sp = Splitter({"script1": "1@1 han=2", "script2": "2@1"})
    calls = []
    stream = sp.stream()
    real = stream._codepoint
    stream._codepoint = lambda cp: calls.append(cp) or real(cp)
    text = ("the quick 日本語 fox, 12345\r\n" * 200).encode()[:4096]
    levels = stream.push(text)
    assert len(calls) == len(text.decode())  # one call per codepoint: O(1) per byte
    assert not stream._resplit
    tail = [sp.levels(text[:n])[-1] for n in range(len(text) - 200, len(text) + 1)]
    np.testing.assert_array_equal(levels[-201:], tail)


def test_generation_never_resplits(monkeypatch):
    """Cached generation splits each prompt once; every fed byte's level comes from the stream."""
    model = make_model(2, "multilinear", seed=1, strategy={"script1": "1@1 han=2", "word2": "2@1"})
    calls = []
    real = Splitter.levels
    monkeypatch.setattr(Splitter, "levels", lambda self, d: calls.append(len(d)) or real(self, d))
    gen = Generator(model)
    gen.prefill([b"ab", "日本".encode()], 100)
    fed = ("語 the fox, 12\r\n" * 10).encode()[:100]
    for t in fed:
        gen.step([t, t])
    assert calls == [2, 6]
    monkeypatch.undo()
    assert (
        gen.levels[0][3:]
        == naive_stream(Splitter(model.config.split_strategy), b"ab" + fed)[2:].tolist()
    )


SCRIPT_PROMPTS = ["日本語の文章です。".encode(), "ภาษาไทย ".encode(), b"plain text, then \xe4\xb8"]


def test_cached_generation_equals_naive_rerun_for_script_strategy():
    strategy = {"script1": "1@1 han=2 thai=3 kana=2", "script2": "2@1"}
    model = make_model(2, "repeat", seed=6, strategy=strategy)
    for prompt in SCRIPT_PROMPTS[1:]:
        out = generate(model, prompt, 12, temperature=0.0)
        assert out == naive_greedy(model, prompt, 12)
    # forced continuation through Han, kana and Thai runs, a truncated character, CRLF runs
    fed = "漢字かなカナ ภาษาไทยที่ \r\n\r\n x".encode() + b"\xe4\xb8 \xff end"
    gen = Generator(model)
    cached = [gen.prefill([SCRIPT_PROMPTS[0]], len(fed))[0]] + [gen.step([t])[0] for t in fed]
    torch.testing.assert_close(
        torch.stack(cached), naive_logits(model, SCRIPT_PROMPTS[0], fed, rerun=False)
    )
    assert {2, 1} <= set(gen.levels[0][len(SCRIPT_PROMPTS[0]) + 1 :])


def test_module_says_where_the_rules_live():
    assert "aunet/splitting.py" in (splitstream.__doc__ or "")


ENTROPY_VALUE = model_value(MODELS[0], 4.0)


@settings(max_examples=40, deadline=None)
@given(data=NASTY)
def test_stream_entropy_stages_resplit_only_their_lookback(data):
    """Entropy stages (aunet/entropy.py) declare ``lookback``: the stream re-splits that tail only
    and still equals per-prefix levels, mixed with a word stage kept incrementally."""
    sp = Splitter({"word1": "1@1", "entropy2": ENTROPY_VALUE})
    stream = sp.stream()
    assert [i for i, _, lookback in stream._resplit if lookback] == [1]
    np.testing.assert_array_equal(stream.push(data), naive_stream(sp, data))
