"""The GPU path checked on CPU: attention dispatch (FlexAttention's eager path against SDPA and a
float64 naive loop), static-shape padding and recompiles, activation checkpointing, bf16, and the
memory estimator. The GPU figures themselves come from tests/gpu/run.sh (docs/performance.md)."""

from __future__ import annotations

import pytest
import torch
from reference import attention_ref

from aunet.config import AUNetConfig
from aunet.layers import attention, resolve_backend
from aunet.model import AUNet


def small_config(**kw) -> AUNetConfig:
    base = dict(
        dimensions=[16, 32],
        layers=[1, 2],
        head_dims=[8, 8],
        sliding_windows=[8, 16],
        max_seqlens=[-1, -1],
        multiple_of=16,
    )
    base.update(kw)
    return AUNetConfig(**base)


def batch(B: int, T: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bytes with random levels (boundaries of every level at varying density)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (B, T), generator=g)
    levels = torch.randint(0, K + 1, (B, T), generator=g)
    return tokens, levels


# ---------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("length, window", [(37, 5), (200, 64), (130, 129)])
def test_flex_equals_sdpa_and_naive(length, window):
    """Flex (eager reference path, float64) == the masked/blocked SDPA path == naive loops."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, length, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ref = attention_ref(q, k, v, window)
    flex = attention(q, k, v, window, backend="flex")
    sdpa = attention(q, k, v, window, backend="sdpa")
    torch.testing.assert_close(flex, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(sdpa, ref, atol=1e-12, rtol=1e-12)


def test_backend_resolution_and_model_logits():
    """auto is SDPA on CPU; a whole model gives the same float64 logits with Flex and SDPA."""
    assert resolve_backend("auto", "cpu", torch.float32) == "sdpa"
    assert resolve_backend("flex", "cpu") == "flex"
    with pytest.raises(ValueError, match="attention"):
        resolve_backend("xformers", "cpu")
    torch.manual_seed(0)
    model = AUNet(small_config()).double()
    tokens, levels = batch(2, 48, 1, seed=1)
    with torch.no_grad():  # Flex has no CPU backward; its gradients are checked on GPU only
        assert model.set_attention("sdpa", "cpu") == "sdpa"
        a = model(tokens, levels)
        assert model.set_attention("flex", "cpu") == "flex"
        b = model(tokens, levels)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
