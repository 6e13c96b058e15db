"""aunet.packing against naive references: BOS/EOS framing, the overlapping-window packer, stats."""

from __future__ import annotations

import numpy as np
import pytest

from aunet.config import BOS_ID, EOS_ID
from aunet.packing import (
    Packer,
    contraction_ratios,
    encode_document,
    split_point_counts,
    windows,
)


def _naive_windows(docs, T):
    """The official packer by definition: one flat stream, window k = stream[k*T : k*T + T + 1]."""
    stream = [t for d in docs for t in d]
    out, k = [], 0
    while k * T + T + 1 <= len(stream):
        out.append(stream[k * T : k * T + T + 1])
        k += 1
    return out, len(stream)


def _random_docs(rng, n, max_len):
    docs = []
    for _ in range(n):
        data = rng.integers(0, 256, rng.integers(1, max_len)).astype(np.uint8).tobytes()
        lev = rng.integers(0, 3, len(data)).astype(np.uint8)
        docs.append(encode_document(data, lev, top_level=2))
    return docs


def test_encode_document_frames_with_bos_top_and_eos_zero():
    tok, lev = encode_document(b"ab\xff", np.array([0, 1, 0], np.uint8), top_level=3)
    assert tok.dtype == np.uint16 and lev.dtype == np.uint8
    assert tok.tolist() == [BOS_ID, 97, 98, 255, EOS_ID]
    assert lev.tolist() == [3, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="levels has 2 entries for 3 bytes"):
        encode_document(b"abc", np.zeros(2, np.uint8), 1)


@pytest.mark.parametrize("T,chunk", [(1, 1), (5, 2), (16, 3)])
def test_add_documents_equals_adding_each_encoded_document(T, chunk):
    rng = np.random.default_rng(T)
    lengths = rng.integers(0, 60, 80)  # some straddle chunk boundaries, some span several
    lengths[[0, 7, 79]] = 0  # empty documents still get BOS and EOS
    data = rng.integers(0, 256, lengths.sum()).astype(np.uint8)
    lev = rng.integers(0, 3, lengths.sum()).astype(np.uint8)
    cuts = np.concatenate([[0], np.cumsum(lengths)])
    ref, fast = Packer(T, chunk=chunk), Packer(T, chunk=chunk)
    want, got = [], []
    for a, b in zip(cuts, cuts[1:]):
        want += ref.add(*encode_document(data[a:b].tobytes(), lev[a:b], top_level=2))
    for lo, hi in [(0, 30), (30, 31), (31, 80)]:  # runs of documents, as the pipeline sends them
        a, b = cuts[lo], cuts[hi]
        got += fast.add_documents(data[a:b], lev[a:b], lengths[lo:hi], top_level=2)
    want.append(ref.finish())
    got.append(fast.finish())
    assert len(got) == len(want) > 3
    for g, w in zip(got[:-1], want[:-1]):
        assert g[0].dtype == np.uint16 and g[1].dtype == np.uint8
        np.testing.assert_array_equal(g[0], w[0])
        np.testing.assert_array_equal(g[1], w[1])
    (g_last, g_drop), (w_last, w_drop) = got[-1], want[-1]
    assert g_drop == w_drop and (g_last is None) == (w_last is None)
    if w_last is not None:
        np.testing.assert_array_equal(g_last[0], w_last[0])
        np.testing.assert_array_equal(g_last[1], w_last[1])
    assert fast.tokens_in == ref.tokens_in == lengths.sum() + 2 * len(lengths)
    with pytest.raises(ValueError, match="lengths summing to"):
        fast.add_documents(data, lev, lengths[:-2], 2)


@pytest.mark.parametrize("T,chunk,max_len", [(1, 1, 5), (7, 1, 30), (16, 3, 100), (64, 4, 20)])
def test_packer_matches_naive_stream_cut(T, chunk, max_len):
    rng = np.random.default_rng(T * 100 + chunk)
    docs = _random_docs(rng, 40, max_len)
    packer = Packer(T, chunk=chunk)
    got_tok, got_lev = [], []
    for tok, lev in docs:
        for ct, cl in packer.add(tok, lev):
            assert len(ct) == chunk * T + 1  # full chunks only, before finish
            tw, lw = windows(ct, cl, T)
            got_tok += tw.tolist()
            got_lev += lw.tolist()
    last, dropped = packer.finish()
    if last is not None:
        tw, lw = windows(*last, T)
        got_tok += tw.tolist()
        got_lev += lw.tolist()
    want_tok, n_stream = _naive_windows([d[0].tolist() for d in docs], T)
    want_lev, _ = _naive_windows([d[1].tolist() for d in docs], T)
    assert got_tok == want_tok and got_lev == want_lev
    assert packer.windows_out == len(want_tok)
    # no byte lost between windows: window k+1's first input is window k's last target
    for a, b in zip(got_tok, got_tok[1:]):
        assert b[0] == a[-1]
    assert n_stream == len(want_tok) * T + 1 + dropped
    assert 0 <= dropped <= T


def test_packer_short_stream_drops_everything_and_validates():
    p = Packer(10)
    assert p.add(np.array([BOS_ID, 1, EOS_ID]), np.array([1, 0, 0])) == []
    assert p.finish() == (None, 3)
    with pytest.raises(ValueError):
        Packer(0)
    with pytest.raises(ValueError, match="3 tokens but 2 levels"):
        Packer(4).add(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="not n\\*4 \\+ 1"):
        windows(np.zeros(6, np.uint16), np.zeros(6, np.uint8), 4)


def test_one_huge_document_packs_into_many_windows():
    data = bytes(range(256)) * 100  # 25.6 kB, one document
    tok, lev = encode_document(data, np.zeros(len(data), np.uint8), 1)
    p = Packer(1000, chunk=8)
    chunks = p.add(tok, lev)
    last, dropped = p.finish()
    n = sum((len(c[0]) - 1) // 1000 for c in [*chunks, last])
    assert n == (len(tok) - 1) // 1000 == p.windows_out
    assert dropped == len(tok) - 1 - n * 1000


def test_split_point_counts_and_contraction_naive():
    rng = np.random.default_rng(0)
    lev = rng.integers(0, 4, 1000).astype(np.uint8)
    got = split_point_counts(lev, 3)
    assert got.tolist() == [int((lev >= s).sum()) for s in (1, 2, 3)]
    assert split_point_counts(lev, 0).tolist() == []
    assert contraction_ratios(1000, got) == [1000 / c for c in got.tolist()]
    assert contraction_ratios(10, np.array([0])) == [None]
