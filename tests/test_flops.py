"""FLOP and parameter accounting against torch's own counters, the model, and the reference
values of docs/flops.md."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from aunet.config import UPSAMPLINGS, AUNetConfig
from aunet.flops import (
    attention_pairs,
    batch_size_bytes,
    compute_optimal,
    flops_breakdown,
    flops_per_byte,
    learning_rate,
    num_params,
    official_flops_per_byte,
    official_param_estimate,
    scaled,
    size_for_flops_per_byte,
    stage_lengths,
    steps_for_budget,
    train_flops,
)
from aunet.layers import window_mask
from aunet.model import AUNet
from aunet.splitting import Splitter

# docs/flops.md (Reference numbers): the official 2B configs (vocab 258, multiple_of 256,
# simple_indexed_matmul)
TWO_B_1LEVEL = AUNetConfig(
    dimensions=[512, 2048],
    layers=[3, 25],
    head_dims=[64, 128],
    sliding_windows=[512, 4096],
    max_seqlens=[8192, 3200],
    multiple_of=256,
)
TWO_B_2LEVEL = AUNetConfig(
    dimensions=[512, 2048, 3456],
    layers=[3, 6, 12],
    head_dims=[64, 128, 128],
    sliding_windows=[512, 4096, 4096],
    max_seqlens=[8192, 1600, 928],
    multiple_of=256,
)

WORDS = ["the", "of", "and", "a", "to", "in", "is", "was", "that", "for", "it", "with", "Hello"]


def english_like(n_bytes: int, seed: int) -> bytes:
    """Deterministic word soup with punctuation, digits and newlines (word splitter input)."""
    rng = random.Random(seed)
    out: list[str] = []
    while sum(map(len, out)) < n_bytes:
        w = rng.choice(WORDS + ["2024", "x1", "world"])
        out.append(w + rng.choice([" "] * 8 + [", ", ". ", "\n", "! "]))
    return "".join(out).encode()[:n_bytes]


def real_batch(config: AUNetConfig, T: int, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens, levels (B, T) from the real splitter of the config's strategy."""
    rows = [english_like(T, seed) for seed in range(B)]
    tokens = torch.tensor([list(r) for r in rows])
    if config.num_stages == 0:
        return tokens, torch.zeros_like(tokens)
    sp = Splitter(config.split_strategy)
    levels = torch.stack([torch.from_numpy(sp.levels(r).astype("int64")) for r in rows])
    return tokens, levels


SMALL = [
    AUNetConfig(dimensions=[64], layers=[2], head_dims=[16], sliding_windows=[32], multiple_of=32),
    AUNetConfig(
        dimensions=[32, 64],
        layers=[1, 2],
        head_dims=[16, 16],
        sliding_windows=[32, None],
        max_seqlens=[-1, 40],
        multiple_of=32,
    ),
    AUNetConfig(
        dimensions=[32, 64, 128],
        layers=[1, 1, 2],
        head_dims=[16, 16, 32],
        sliding_windows=[48, 64],
        upsampling="repeat",
        n_kv_heads=1,
    ),
    AUNetConfig(
        dimensions=[32, 64, 64, 128],
        layers=[1, 1, 0, 1],
        head_dims=[16, 16, 16, 32],
        max_seqlens=[-1, 60, -1, 20],
        upsampling="scatter",
    ),
    AUNetConfig(
        dimensions=[32, 64, 128],
        layers=[1, 1, 1],
        head_dims=[16, 16, 32],
        sliding_windows=[32, None, None],
        upsampling="nonparam_multilinear",
        ffn_dim_multiplier=1.3,
    ),
]


def counted_flops(model: AUNet, tokens: torch.Tensor, levels: torch.Tensor, math_sdpa: bool) -> int:
    """torch's FlopCounterMode over forward + loss.backward()."""
    counter = FlopCounterMode(display=False)
    with counter:
        if math_sdpa:
            with sdpa_kernel(SDPBackend.MATH):
                model(tokens, levels, targets=tokens).loss.backward()
        else:
            model(tokens, levels, targets=tokens).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("config", SMALL, ids=lambda c: f"K{c.num_stages}-{c.upsampling}")
def test_flops_match_torch_flop_counter(config: AUNetConfig) -> None:
    """Dense convention vs SDPA's MATH backend (full L x L bmm); 'none' vs the default CPU SDPA
    kernel, which flop_counter does not count. The issue asks for 10%; we count the same matmuls,
    so 2% catches a forgotten part (the head alone is ~4% here)."""
    torch.manual_seed(0)
    T, B = 256, 2
    model = AUNet(config)
    tokens, levels = real_batch(config, T, B)
    lengths = [p.length for p in model.plan(levels)]  # positions run per stage (padded)
    for convention, math_sdpa in (("dense", True), ("none", False)):
        got = counted_flops(model, tokens, levels, math_sdpa) / (B * T)
        ours = flops_per_byte(config, T, lengths, attention=convention)
        assert ours == pytest.approx(got, rel=0.02), convention
        model.zero_grad()


def test_capacities_give_the_lengths_the_model_runs() -> None:
    """Without stage_tokens, capped stages run min(C_s, L_{s-1}): what the model's plans do."""
    config = SMALL[1].replace(max_seqlens=[-1, 30])
    tokens, levels = real_batch(config, 256, 2)
    assert [p.length for p in AUNet(config).plan(levels)] == [30]
    assert stage_lengths(config, 256) == [256.0, 30.0]
    counted = counted_flops(AUNet(config), tokens, levels, math_sdpa=True) / 512
    assert flops_per_byte(config, 256, attention="dense") == pytest.approx(counted, rel=0.02)


@pytest.mark.parametrize(("length", "window"), [(1, None), (7, 3), (50, 50), (50, 51), (64, 16)])
def test_causal_pairs_match_the_models_mask(length: int, window: int | None) -> None:
    mask = window_mask(length, length, window, torch.device("cpu"))
    assert attention_pairs(length, window) == int(mask.sum())


def test_causal_attention_term_is_pairs_times_width() -> None:
    c = AUNetConfig(
        dimensions=[64, 128], layers=[2, 3], head_dims=[16, 32], sliding_windows=[8, None]
    )
    parts = flops_breakdown(c, 100, [20])
    expected = 12 * 64 * 4 * (36 + 92 * 8) + 12 * 128 * 3 * (20 * 21 / 2)
    assert parts["attention"] == pytest.approx(expected)
    dense = flops_breakdown(c, 100, [20], attention="dense")["attention"]
    assert dense == pytest.approx(12 * 64 * 4 * 100**2 + 12 * 128 * 3 * 20**2)


def test_default_lengths_and_bad_arguments() -> None:
    c = AUNetConfig(dimensions=[32, 64, 64], layers=[1, 1, 1], head_dims=[16, 16, 16])
    assert stage_lengths(c, 920) == pytest.approx([920, 920 / 5.4, 100])
    assert stage_lengths(c, 920, bytes_per_token=[2.0, 4.0]) == pytest.approx([920, 460, 230])
    with pytest.raises(ValueError, match="stage_tokens"):
        flops_per_byte(c, 920, [100])
    with pytest.raises(ValueError, match="attention"):
        flops_per_byte(c, 920, attention="flash")
    with pytest.raises(ValueError, match=r"max_seqlens\[1\]"):
        official_flops_per_byte(c, 920)


def _lambda(c: AUNetConfig) -> AUNetConfig:
    return c.replace(lambda_level=0.5)


PARAM_CONFIGS = [
    *(SMALL[2].replace(upsampling=u) for u in UPSAMPLINGS),
    *(SMALL[1].replace(upsampling=u) for u in UPSAMPLINGS),
    SMALL[0],
    SMALL[3],
    _lambda(SMALL[2]),
    AUNetConfig(dimensions=[48, 96], layers=[0, 1], head_dims=[16, 32], upsampling_positions=5),
]


@pytest.mark.parametrize("config", PARAM_CONFIGS, ids=lambda c: f"K{c.num_stages}-{c.upsampling}")
def test_num_params_equals_model(config: AUNetConfig) -> None:
    with torch.device("meta"):
        model = AUNet(config)
    assert num_params(config) == sum(p.numel() for p in model.parameters())


def test_two_b_configs_match_spec_table() -> None:
    """docs/flops.md (Reference numbers): values measured on the official code."""
    assert num_params(TWO_B_1LEVEL) == 1_324_203_008
    assert num_params(TWO_B_2LEVEL) == 2_503_624_064
    assert official_param_estimate(TWO_B_1LEVEL) == 1_305_217_024
    assert official_param_estimate(TWO_B_2LEVEL) == 2_357_200_896
    assert official_flops_per_byte(TWO_B_1LEVEL, 8192) == pytest.approx(3.536e9, rel=5e-4)
    assert official_flops_per_byte(TWO_B_2LEVEL, 8192) == pytest.approx(2.106e9, rel=5e-4)
    # our count adds transitions (and exact causal pairs): a little above the official estimate
    for c in (TWO_B_1LEVEL, TWO_B_2LEVEL):
        assert 1.0 < flops_per_byte(c, 8192) / official_flops_per_byte(c, 8192) < 1.03
    with torch.device("meta"):
        assert AUNet(TWO_B_2LEVEL).num_params() == 2_503_624_064


def test_official_estimator_by_hand() -> None:
    """One stage, window 8, T 32: 6*(L*(4d^2+3d*ffn) + d*258) + 6*d*T*L*w(2T-w)/T^2."""
    c = AUNetConfig(
        dimensions=[64], layers=[3], head_dims=[16], sliding_windows=[8], multiple_of=32
    )
    ffn = 192  # int(2*256/3) = 170 -> 192
    lin = 3 * (4 * 64 * 64 + 3 * 64 * ffn) + 64 * 258
    att = 6 * 64 * 32 * 3 * (8 * 56) / 32**2
    assert official_flops_per_byte(c, 32) == pytest.approx(6 * lin + att)


def test_scaling_laws() -> None:
    """docs/flops.md (Scaling laws): at C = 1e21 LR 1.33e-3, BSZ 3.6M; at 1.37e21 LR 1.26e-3,
    BSZ 4.0M."""
    assert batch_size_bytes(1.0) == pytest.approx(0.66)
    assert learning_rate(1.0) == pytest.approx(6.6)
    assert learning_rate(1e21) == pytest.approx(1.33e-3, rel=3e-3)
    assert batch_size_bytes(1e21) == pytest.approx(3.63e6, rel=3e-3)
    assert learning_rate(1.37e21) == pytest.approx(1.26e-3, rel=5e-3)
    assert batch_size_bytes(1.37e21) == pytest.approx(4.0e6, rel=1e-2)
    assert learning_rate(1e19) / learning_rate(1e20) == pytest.approx(10**0.176)


def test_train_flops_and_steps() -> None:
    c = SMALL[1]
    fpb = flops_per_byte(c, 256)
    assert train_flops(c, 256, 1e6) == pytest.approx(fpb * 1e6)
    step = fpb * 256 * 8
    assert steps_for_budget(c, 256, 8, step * 10 * (1 + 1e-9)) == 10
    assert steps_for_budget(c, 256, 8, step * 10.5) == 10
    assert steps_for_budget(c, 256, 8, step * 0.99) == 0


def test_scaled_keeps_head_dim_and_ratios() -> None:
    c = scaled(TWO_B_2LEVEL, 0.25)  # 3456 / 4 = 6.75 heads of 128 -> 7
    assert c.dimensions == [128, 512, 896] and c.head_dims == TWO_B_2LEVEL.head_dims
    assert scaled(TWO_B_2LEVEL, 2.0, "depth").layers == [6, 12, 24]
    nonparam = SMALL[4]
    assert scaled(nonparam, 2.0).dimensions == [64, 128, 256]


@pytest.mark.parametrize("scale", ["width", "depth"])
def test_sizing_hits_target(scale: str) -> None:
    """A byte Transformer of the same FLOPs/byte as a 2-stage AU-Net, within 3%."""
    aunet = AUNetConfig(
        dimensions=[128, 512], layers=[2, 6], head_dims=[32, 64], sliding_windows=[256, None]
    )
    target = flops_per_byte(aunet, 2048)
    template = AUNetConfig(
        dimensions=[256], layers=[12], head_dims=[16], multiple_of=16, sliding_windows=[256]
    )
    base = size_for_flops_per_byte(template, target, 2048, scale=scale)
    assert flops_per_byte(base, 2048) == pytest.approx(target, rel=0.03)


def test_compute_optimal() -> None:
    template = AUNetConfig(dimensions=[128, 512], layers=[2, 6], head_dims=[16, 32], multiple_of=16)
    budget = 1e17
    out = compute_optimal(template, budget, 1024, bytes_per_param=100.0)
    cfg, params, fpb = out["config"], out["params"], out["flops_per_byte"]
    assert params == num_params(cfg) and fpb == flops_per_byte(cfg, 1024)
    assert out["bytes"] == pytest.approx(budget / fpb)
    assert out["bytes"] / params == pytest.approx(100.0, rel=0.05)  # the ratio rule holds
    assert out["learning_rate"] == pytest.approx(learning_rate(budget))
    assert math.isclose(out["batch_size_bytes"], batch_size_bytes(budget))
