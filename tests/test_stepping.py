"""Decode steps (aunet/stepping.py): the float32 fast path, the module fallbacks and the cache
rules they rely on, each against the full forward or the rule written out."""

from __future__ import annotations

import pytest
import torch
from test_generate import CONT, PROMPTS, make_model, naive_logits
from torch import nn

from aunet.generate import Generator
from aunet.stepping import StackStep

pytestmark = pytest.mark.usefixtures("one_thread")


def cached_logits(model: nn.Module, feed: bytes) -> list[torch.Tensor]:
    """Per prompt: logits after the prompt and after each fed byte, (len(feed) + 1, V)."""
    gen = Generator(model)
    steps = [gen.prefill(PROMPTS, max_new_bytes=1)]
    for t in feed:
        steps.append(gen.step([t] * len(PROMPTS)))
    return [torch.stack([s[b] for s in steps]) for b in range(len(PROMPTS))]


class _NotPlain(nn.Linear):
    """A linear the fast path does not recognise (as INT8 modules are not): run as a module."""


def _unplain(model: nn.Module) -> None:
    for name, child in list(model.named_children()):
        if type(child) is nn.Linear:
            new = _NotPlain(child.in_features, child.out_features, bias=False)
            new.weight = child.weight
            setattr(model, name, new)
        else:
            _unplain(child)


@pytest.mark.parametrize("K", [1, 2])
def test_module_linears_give_the_fused_products_numbers(K: int) -> None:
    fast = make_model(K)
    slow = make_model(K)
    _unplain(slow)
    step = StackStep(slow.trunk)
    assert step.blocks[0].wqkv is None and step.blocks[0].w13 is None
    assert StackStep(fast.trunk).blocks[0].wqkv is not None
    for a, b in zip(cached_logits(fast, CONT[:30]), cached_logits(slow, CONT[:30])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_float64_takes_the_module_path_and_matches_the_forward() -> None:
    """Non-float32 models (bf16 on a GPU; float64 here) rotate with cos/sin tables and norm with
    the modules: logits equal the full forward in float64 to 1e-10."""
    model = make_model(2).double()
    assert StackStep(model.trunk).rope(torch.tensor([3]), torch.float64)[2] is None
    got = cached_logits(model, CONT[:40])
    for b, prompt in enumerate(PROMPTS):
        ref = naive_logits(model, prompt, CONT[:40], rerun=False)
        torch.testing.assert_close(got[b], ref, atol=1e-10, rtol=0)


def test_a_generator_reads_the_weights_its_model_has_when_made() -> None:
    """The fused products are copies, rebuilt for a new Generator after an in-place change."""
    model = make_model(1)
    cached_logits(model, CONT[:5])  # fills the fused-weight cache
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    got = cached_logits(model, CONT[:20])
    for b, prompt in enumerate(PROMPTS):
        ref = naive_logits(model, prompt, CONT[:20], rerun=False)
        torch.testing.assert_close(got[b], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("K", [1, 2])
def test_attention_reads_every_written_slot_and_that_is_the_window(K: int) -> None:
    """``StackCache.visible`` takes every written slot; written out, the rule is: slots holding
    a position within the window of the row's newest position, and none past it. Rows advance
    at their own pace (some stop early), windows wrap and deep rings grow."""
    model = make_model(K, sliding_windows=[6, 5, 4][: K + 1])
    gen = Generator(model)
    gen.prefill(PROMPTS, max_new_bytes=1)
    feeds = [CONT, CONT[9:], CONT[:30], CONT[50:]]
    caches = [*gen.enc_caches, *gen.dec_caches, gen.trunk_cache]
    checked = 0
    for i in range(max(map(len, feeds))):
        rows = [b for b, f in enumerate(feeds) if i < len(f)]
        gen.step([feeds[b][i] for b in rows], rows)
        for cache in caches:
            sp = cache.slot_pos
            newest = sp.max(1, keepdim=True).values
            rule = (sp >= 0) & (sp <= newest)
            if cache.window is not None:
                rule &= sp > newest - cache.window
            all_rows = torch.arange(len(sp))
            assert torch.equal(cache.visible(all_rows, True), rule)
            sub = torch.tensor(rows[::2])
            assert torch.equal(cache.visible(sub, False), rule[sub])
            checked += 1
    assert checked > 100
    assert all(c.size == w for c, w in zip(gen.enc_caches, model.config.windows))
