"""Continuous batching (``aunet.decoding.Decoder``, ``Generator.add``/``keep``): rows that join a
running generation, or outlive the rows they started with, get the numbers and bytes they would
get alone (the naive full forward; ``generate``)."""

from __future__ import annotations

import pytest
import torch
from test_generate import CONT, PROMPTS, make_model, naive_logits

from aunet.decoding import Decoder, Sampling, decode_rows
from aunet.generate import Generator, draw, generate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("K, kw", [(0, {}), (2, {}), (2, {"sliding_windows": None}), (3, {})])
def test_rows_joining_and_leaving_match_full_forward(K: int, kw: dict) -> None:
    """Rows join at steps 0, 3 and 9 (each announcing a different cache size), two leave early;
    every row's logits equal one full forward over its own text."""
    model = make_model(K, seed=5, **kw)
    joins = {0: [0, 1], 3: [2], 9: [3, 1]}  # step -> PROMPTS indices (a prompt may come twice)
    feeds = {0: CONT, 1: CONT[5:20], 2: CONT[9:], 3: CONT[30:70], 4: CONT[2:50]}
    gen = Generator(model)
    rows: list[int] = []  # request id of each Generator row
    prompt_of, got = {}, {}
    for i in range(len(CONT) + 1):
        for p in joins.get(i, []):
            rid = len(prompt_of)
            prompt_of[rid] = PROMPTS[p]
            got[rid] = [gen.add([PROMPTS[p]], 1 + 4 * rid)[0]]  # caches must grow / pad
            rows.append(rid)
        live = [j for j, rid in enumerate(rows) if len(got[rid]) - 1 < len(feeds[rid])]
        gen.keep(live)
        rows = [rows[j] for j in live]
        if not rows:
            break
        logits = gen.step([feeds[rid][len(got[rid]) - 1] for rid in rows])
        for j, rid in enumerate(rows):
            got[rid].append(logits[j])
    assert len(got) == 5
    for rid, out in got.items():
        fed = feeds[rid][: len(out) - 1]
        assert len(fed) == len(feeds[rid])
        ref = naive_logits(model, prompt_of[rid], fed, rerun=False)
        torch.testing.assert_close(torch.stack(out), ref, atol=1e-4, rtol=0)


def test_staggered_requests_equal_direct_generate() -> None:
    """Requests added to a running Decoder (and one dropped mid-way) return ``generate``'s bytes."""
    model = make_model(2, seed=6)
    reqs = [
        (PROMPTS[0], Sampling(30, temperature=0.0)),
        (PROMPTS[1], Sampling(12, temperature=0.9, top_k=20, seed=3)),
        (PROMPTS[2], Sampling(25, temperature=1.0, top_p=0.8, seed=4, stop=b"e")),
        (PROMPTS[3], Sampling(0)),
        (b"late", Sampling(40, temperature=1.0, seed=5)),
        (PROMPTS[0], Sampling(8, temperature=1.0, seed=6)),
    ]
    arrive = {0: [0], 2: [1, 2], 5: [3], 11: [4], 13: [5]}
    dec = Decoder(model)
    got = {k: b"" for k in range(len(reqs))}
    finished, step = set(), 0
    while step <= max(arrive) or len(dec):
        new = arrive.get(step, [])
        dec.add([reqs[k][0] for k in new], [reqs[k][1] for k in new], new)
        if step == 15:
            dec.drop([4])  # a client went away: the others go on
        for k, (chunk, done) in dec.step().items():
            assert k not in finished
            got[k] += chunk
            if done:
                finished.add(k)
        step += 1
    assert finished == {0, 1, 2, 3, 5}
    for k, (p, s) in enumerate(reqs):
        kw = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, stop=s.stop, seed=s.seed)
        want = generate(model, p, s.max_new_bytes, **kw)
        assert got[k] == want if k != 4 else want.startswith(got[k]) and got[k]
    assert len(got[0]) == 30


def test_ignore_eos_rows_share_a_batch_with_ordinary_ones() -> None:
    """Rows with and without ignore_eos in one sampling group each get ``generate``'s bytes."""
    model = make_model(1, seed=4)
    settings = [
        Sampling(20, temperature=0.8, seed=1, ignore_eos=True),
        Sampling(20, temperature=0.8, seed=2),
        Sampling(20, temperature=0.0, ignore_eos=True),
    ]
    steps = list(decode_rows(model, PROMPTS[:3], settings))
    for b, s in enumerate(settings):
        got = b"".join(step[b] or b"" for step in steps)
        want = generate(
            model, PROMPTS[b], 20, temperature=s.temperature, seed=s.seed, ignore_eos=s.ignore_eos
        )
        assert got == want
    with pytest.raises(ValueError, match="ignore_eos"):
        Sampling(3, ignore_eos=1).check()


def test_decode_rows_and_bad_input() -> None:
    model = make_model(1, seed=2)
    settings = [Sampling(9, temperature=0.0), Sampling(0), Sampling(4, seed=1)]
    steps = list(decode_rows(model, PROMPTS[:3], settings))
    assert steps[0][1] == b"" and all(s[1] is None for s in steps[1:])
    assert len(steps) == 9 and steps[-1][2] is None
    joined = [b"".join(s[b] or b"" for s in steps) for b in range(3)]
    assert joined[0] == generate(model, PROMPTS[0], 9, temperature=0.0)
    assert joined[2] == generate(model, PROMPTS[2], 4, seed=1)
    with pytest.raises(ValueError, match="top_k"):
        Decoder(model).add([b"x"], [Sampling(3, top_k=0)], [0])
    with pytest.raises(ValueError, match="2 prompts, 1 settings"):
        Decoder(model).add([b"x", b"y"], [Sampling(3)], [0])


def test_draw_is_multinomial() -> None:
    """``draw`` (one batched argmax over per-row exponential draws) picks what
    ``torch.multinomial`` picks with the same generators, and leaves them in the same state."""
    torch.manual_seed(0)
    for seed in range(200):
        probs = (torch.randn(4, 258) * 3).softmax(-1)
        probs[:, ::3] = 0.0  # ids top-k / top-p / BOS masking removed
        one, ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(draw(probs, one), torch.multinomial(probs, 1, generator=ref)[:, 0])
        rows = [torch.Generator().manual_seed(seed * 7 + j) for j in range(4)]
        refs = [torch.Generator().manual_seed(seed * 7 + j) for j in range(4)]
        want = [int(torch.multinomial(probs[j : j + 1], 1, generator=refs[j])) for j in range(4)]
        assert draw(probs, rows).tolist() == want
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(rows, refs))
