"""``AUModel``: save -> load gives identical logits; ``score`` and ``bits_per_byte`` equal a naive
float64 per-byte loop; ``to`` moves and casts in place; text prompts are their UTF-8 bytes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from reference import tiny_aunet

from aunet.api import AUModel
from aunet.evaluation import encode_with_levels, splitter_for
from aunet.model import AUNet

TEXTS = ["The cat sat on the mat.", "Les chats dorment. 猫が寝ている。", "x"]


def tiny_model(seed: int = 0) -> AUNet:
    return tiny_aunet(32, seed)


def naive_nats(model: AUNet, text: bytes, context: int) -> float:
    """Each byte scored alone in float64, seeing at most the ``context - 1`` tokens before it."""
    toks, lvls = encode_with_levels(text, splitter_for(model.config), model.config.num_stages)
    total = 0.0
    for j in range(1, len(toks)):
        lo = max(0, j - context + 1)
        with torch.no_grad():
            logits = model(torch.tensor([toks[lo:j]]), torch.tensor([lvls[lo:j]]))[0, -1]
        total -= float(F.log_softmax(logits.double(), -1)[toks[j]])
    return total


def test_save_then_load_gives_identical_logits(tmp_path):
    model = AUModel(tiny_model())
    model.context = 48
    out = model.save_pretrained(tmp_path / "ckpt", metadata={"step": 3})
    payload = json.loads((out / "config.json").read_text())
    assert payload["weights_sha256"] and payload["metadata"] == {"step": 3, "plan": {"seq_len": 48}}
    loaded = AUModel.from_pretrained(out)
    assert loaded.context == 48
    toks, lvls = encode_with_levels(TEXTS[1].encode(), splitter_for(model.config), 1)
    x, lv = torch.tensor([toks]), torch.tensor([lvls])
    with torch.no_grad():
        assert torch.equal(model.model(x, lv), loaded.model(x, lv))


def test_score_and_bits_per_byte_equal_a_naive_loop():
    model = AUModel(tiny_model())
    scores = [model.score(t, context=64) for t in TEXTS]  # every text fits: full context
    for text, s in zip(TEXTS, scores):
        ref = naive_nats(model.model, text.encode(), 64)
        assert s.num_bytes == len(text.encode())
        assert math.isclose(s.nats, ref, rel_tol=1e-5, abs_tol=1e-4)
    assert model.score(TEXTS[1].encode(), context=64).nats == scores[1].nats  # str == its bytes
    total_bits = sum(naive_nats(model.model, t.encode(), 64) for t in TEXTS) / math.log(2)
    want = total_bits / sum(len(t.encode()) for t in TEXTS)  # summed bits / summed bytes
    assert math.isclose(model.bits_per_byte(TEXTS, context=64), want, rel_tol=1e-5)


def test_long_text_is_scored_over_sliding_windows():
    """stride 1: every byte sees exactly ``context - 1`` tokens, as in the naive loop."""
    model = AUModel(tiny_model())
    text = TEXTS[0] * 2
    s = model.score(text, context=12, stride=1)
    assert math.isclose(s.nats, naive_nats(model.model, text.encode(), 12), rel_tol=1e-5)


def test_default_context_is_the_checkpoint_seq_len_else_the_byte_capacity():
    model = AUModel(tiny_model())
    with pytest.raises(ValueError, match="context: unknown"):
        model.score("abc")
    model.context = 16
    assert model.score(TEXTS[0]).nats == model.score(TEXTS[0], context=16).nats
    capped = tiny_model()
    capped = AUModel(AUNet(capped.config.replace(max_seqlens=[16, 8])))
    assert capped.scoring_context(None) == 16


def test_to_returns_self_and_casts():
    model = AUModel(tiny_model())
    assert model.to("cpu", torch.float64) is model
    assert model.model.tok_embeddings.weight.dtype == torch.float64
    assert model.to(dtype=torch.float32).device == torch.device("cpu")
    with pytest.raises(ValueError, match="floating-point"):
        model.to(dtype=torch.int8)


def test_text_prompts_are_their_utf8_bytes():
    model = AUModel(tiny_model())
    one = model.generate("caf\u00e9 au", max_new_bytes=8, temperature=0.0)
    assert one == model.generate("caf\u00e9 au".encode(), max_new_bytes=8, temperature=0.0)
    both = model.generate(["ab", b"cd"], max_new_bytes=4, temperature=0.0)
    assert both == model.generate([b"ab", b"cd"], max_new_bytes=4, temperature=0.0)
    with pytest.raises(TypeError, match="expected str or bytes"):
        model.generate([3], max_new_bytes=2)


def test_an_int8_model_is_not_saved(tmp_path):
    from aunet.api import quantize_int8

    model = AUModel(quantize_int8(tiny_model()))
    with pytest.raises(ValueError, match="INT8"):
        model.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()
