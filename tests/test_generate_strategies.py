"""Cached generation == a naive re-run for the script and entropy split strategies.

Both are prefix-stable (docs/design.md, Prefix stability), so the cached generator may give each
new byte the level computed on its prefix; the naive generator of tests/test_generate.py
recomputes every level from the whole prefix and runs the full forward on it.
"""

from __future__ import annotations

import pytest
import torch
from test_generate import make_model, naive_greedy, naive_levels, naive_logits

from aunet.entropy import fit, resolve
from aunet.generate import Generator, generate

PROMPTS = [
    b"Hello there, my frie",
    "如果你不想用你自己的主用户账户来进行下面的练习操".encode(),
    "日本語のテキストとEnglish wo".encode(),
    b"caf\xc3",
    b"",
]
CONT = (
    "nd. 它是一个用户名为 fish 的账号。カタカナ語 12345 and the lazy dog \n more  "
    "words\xe9 ok; ภาษาไทย سلام 😀!\n"
).encode()
TRAIN = [(p + CONT) * 3 for p in PROMPTS] + [b"the quick brown fox jumps over the lazy dog " * 9]


def entropy_strategy() -> dict[str, str]:
    resolved, _ = resolve({"entropy1": "rate=0.3 order=2", "entropy2": "rate=0.08"}, TRAIN)
    return resolved


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["script", "entropy"])
def test_cached_generation_equals_naive_rerun(kind: str) -> None:
    strategy = (
        {"script1": "1@1 han=2 kana=2", "script2": "2@1 han=5"}
        if kind == "script"
        else entropy_strategy()
    )
    model = make_model(2, "multilinear", seed=3, strategy=strategy)
    feeds = [CONT, CONT[5:], CONT[:30], CONT[11:], CONT[2:60]]
    gen = Generator(model)
    logits = [[row] for row in gen.prefill(PROMPTS, max_new_bytes=1)]
    for i in range(max(map(len, feeds))):
        rows = [b for b, f in enumerate(feeds) if i < len(f)]
        step = gen.step([feeds[b][i] for b in rows], rows)
        for j, b in enumerate(rows):
            logits[b].append(step[j])
    reached = set()
    for b, (prompt, fed) in enumerate(zip(PROMPTS, feeds)):
        levels = naive_levels(model, prompt, fed)
        assert gen.levels[b] == levels
        reached |= set(levels[len(prompt) + 1 :])
        ref = naive_logits(model, prompt, fed, rerun=b == 2)  # one row: a forward per prefix
        torch.testing.assert_close(torch.stack(logits[b]), ref, atol=1e-4, rtol=0)
    assert reached == {0, 1, 2}, "every stage must advance during decoding"
    for prompt in PROMPTS[1:3]:
        out = generate(model, prompt, 16, temperature=0.0)
        assert out == naive_greedy(model, prompt, 16)


def test_entropy_model_fits_the_prompts() -> None:
    """The strategy above is a real fit: boundaries follow the model's entropies, not every byte."""
    from aunet.splitting import Splitter

    sp = Splitter(entropy_strategy())
    levels = sp.levels(CONT)
    assert 0 < (levels >= 2).sum() < (levels >= 1).sum() < len(CONT) / 2
    assert fit(TRAIN, order=2).sha256 == sp.stages[0].entropy.model.sha256
