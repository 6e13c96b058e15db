"""Evaluation library tests against naive per-document / per-choice computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aunet.config import BOS_ID, AUNetConfig
from aunet.evaluation import (
    CHAR_TASKS,
    ChoiceItem,
    encode_with_levels,
    make_char_tasks,
    score_char_tasks,
    score_choices,
    score_texts,
    sliding_windows,
    splitter_for,
)
from aunet.model import AUNet
from aunet.splitting import Splitter

DOCS = [
    b"The cat sat on the mat. It was a sunny day,\nand the birds sang.",
    "Les chats dorment. 猫が寝ている。 Done!".encode(),
    b"short",
]


def tiny(K: int = 1) -> AUNet:
    torch.manual_seed(0)
    cfg = AUNetConfig(
        dimensions=[32, 64][: K + 1],
        layers=[1, 1][: K + 1],
        head_dims=[8, 16][: K + 1],
        sliding_windows=[16, None][: K + 1],
        max_seqlens=[-1, 12][: K + 1],
        multiple_of=16,
    )
    return AUNet(cfg).eval()


def naive_doc_nats(model: AUNet, doc: bytes, context: int) -> float:
    """Each byte scored alone: the model sees the last `context` tokens before it."""
    K = model.config.num_stages
    toks, lvls = encode_with_levels(doc, splitter_for(model.config), K)
    total = 0.0
    for j in range(1, len(toks)):
        lo = max(0, j - context + 1)
        t = torch.tensor([toks[lo:j]])
        lv = torch.tensor([lvls[lo:j]])
        with torch.no_grad():
            logp = F.log_softmax(model(t, lv)[0, -1].double(), -1)
        total -= float(logp[toks[j]])
    return total


def test_sliding_windows_cover_each_byte_once_with_context():
    for n, context, stride in [(5, 8, 4), (40, 8, 3), (41, 16, 15), (100, 10, 1)]:
        seen = []
        for start, end, first in sliding_windows(n, context, stride):
            assert end - start <= context and first - start >= min(first, context - stride)
            seen += list(range(first, end))
        assert seen == list(range(1, n + 1))
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 8, 8)


@pytest.mark.parametrize("K", [0, 1])
def test_bits_per_byte_equals_naive_when_document_fits(K):
    model = tiny(K)
    scores = score_texts(model, DOCS, context=256, batch_size=2)
    for doc, s in zip(DOCS, scores):
        ref = naive_doc_nats(model, doc, 256)
        assert s.num_bytes == len(doc)
        assert math.isclose(s.nats, ref, rel_tol=1e-5, abs_tol=1e-4)
        assert math.isclose(s.bits_per_byte, ref / math.log(2) / len(doc), rel_tol=1e-5)


def test_sliding_window_stride_one_equals_naive_full_context():
    model = tiny(1)
    doc = DOCS[0]
    (s,) = score_texts(model, [doc], context=20, stride=1, batch_size=16)
    assert s.num_bytes == len(doc)
    assert math.isclose(s.nats, naive_doc_nats(model, doc, 20), rel_tol=1e-5, abs_tol=1e-4)
    (s2,) = score_texts(model, [doc], context=20, stride=10)
    assert s2.num_bytes == len(doc) and abs(s2.nats - s.nats) < 0.2 * s.nats


def naive_choice_loglik(model: AUNet, ctx: str, choice: str) -> float:
    K = model.config.num_stages
    toks, lvls = encode_with_levels((ctx + choice).encode(), splitter_for(model.config), K)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([toks]), torch.tensor([lvls]))[0].double(), -1)
    c0 = len(ctx.encode()) + 1  # index of the first choice token
    return float(sum(logp[j - 1, toks[j]] for j in range(c0, len(toks))))


ITEMS = [
    ChoiceItem("The sky is", (" blue.", " made of cheese.", " green."), 0),
    ChoiceItem("Two plus two equals", (" five", " four"), 1),
    ChoiceItem("Water is", (" dry.", " wet.", " loud."), 1),
]


def test_choice_scores_agree_with_naive():
    model = tiny(1)
    res = score_choices(model, ITEMS, batch_size=3)
    for it, row in zip(ITEMS, res.loglik):
        for ch, ll in zip(it.choices, row):
            assert math.isclose(ll, naive_choice_loglik(model, it.context, ch), abs_tol=1e-4)
    for it, row, p, pn in zip(ITEMS, res.loglik, res.pred, res.pred_norm):
        assert p == max(range(len(row)), key=row.__getitem__)
        norm = [v / len(c.removeprefix(" ")) for v, c in zip(row, it.choices)]  # lm-eval
        assert pn == max(range(len(norm)), key=norm.__getitem__)


def test_fine_tuned_model_picks_gold():
    model = tiny(1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    splitter = splitter_for(model.config)
    seqs = [
        encode_with_levels((it.context + it.choices[it.gold]).encode(), splitter, 1) for it in ITEMS
    ]
    for _ in range(30):
        for toks, lvls in seqs:
            t, lv = torch.tensor([toks]), torch.tensor([lvls])
            out = model(t[:, :-1], lv[:, :-1], t[:, 1:])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    res = score_choices(model.eval(), ITEMS)
    assert res.pred == [it.gold for it in ITEMS] and res.accuracy == 1.0


WORDS = [
    *("apple", "banana", "cherry", "dragon", "eagle", "forest"),
    *("garden", "harbor", "island", "jungle", "kettle", "lemon"),
]


@pytest.mark.parametrize("task", CHAR_TASKS)
def test_char_tasks_reproducible_and_correct(task):
    a = make_char_tasks(WORDS, task, n=5, seed=7)
    assert a == make_char_tasks(WORDS, task, n=5, seed=7)
    assert a != make_char_tasks(WORDS, task, n=5, seed=8)
    for ex in a:
        assert ex.prompt.count("\n") == 3 and ex.prompt.endswith(": ")
        word = ex.prompt.rsplit(" ", 2)[-2].rstrip(":")
        if task == "reverse":
            assert ex.answer == word[::-1]
        if task == "spell":
            assert ex.answer.replace(" ", "") == word
    # an oracle that answers correctly scores 1, one that echoes the prompt scores 0
    answers = {e.prompt: e.answer for e in a}
    assert (
        score_char_tasks(a, lambda ps, n: [(answers[p.decode()] + "\n").encode() for p in ps]) == 1
    )
    assert score_char_tasks(a, lambda ps, n: [p[-n:] for p in ps]) == 0


def test_bos_is_top_level():
    toks, lvls = encode_with_levels(b"hi there", Splitter({"word1": "1@1", "word2": "2@1"}), 2)
    assert toks[0] == BOS_ID and lvls[0] == 2 and len(toks) == len(lvls) == 9
