"""Model tests: config validation, pooling, upsampling, attention against naive references;
causality; init; the overfit check."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from reference import attention_ref, pool_positions, upsample_ref

from aunet.config import UPSAMPLINGS, AUNetConfig, ConfigError
from aunet.layers import attention
from aunet.model import AUNet
from aunet.pooling import force_first, pooling_plan
from aunet.splitting import Splitter
from aunet.transitions import Transition

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n"
    "In 1984, 12345 people read 3.14159 pages; naive cafe owners said: 'no.'\n"
    "How vexingly quick daft zebras jump - sphinx of black quartz, judge my vow.\n"
)


def tiny_config(K: int, upsampling: str = "multilinear", **kw) -> AUNetConfig:
    dims = [16, 32, 64, 128, 256][: K + 1]
    base = dict(
        dimensions=dims,
        layers=[1] * (K + 1),
        head_dims=[8] * (K + 1),
        sliding_windows=[12] + [None] * K,
        max_seqlens=[-1] + [-1] * K,
        multiple_of=16,
        upsampling=upsampling,
    )
    base.update(kw)
    return AUNetConfig(**base)


def levels_of(data: bytes, K: int) -> torch.Tensor:
    cfg = tiny_config(K)
    if K == 0:
        return torch.zeros(len(data), dtype=torch.long)
    return torch.from_numpy(Splitter(cfg.split_strategy).levels(data).astype(np.int64))


# ---------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "changes, key",
    [
        ({"layers": [1, 1]}, "layers"),
        ({"head_dims": [8, 7, 8]}, "head_dims[1]"),
        ({"upsampling": "bilinear"}, "upsampling"),
        ({"residuals": []}, None),
        ({"residuals": [True]}, "residuals"),
        ({"max_seqlens": [-1, 0, 4]}, "max_seqlens[1]"),
        ({"sliding_windows": [4]}, "sliding_windows"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"upsampling": "nonparam", "dimensions": [16, 24, 48]}, "dimensions[1]"),
        ({"strategy": {"word1": "1@1"}}, "strategy"),
    ],
)
def test_config_errors_name_the_key(changes, key):
    base = tiny_config(2).to_dict()
    base.update(changes)
    if key is None:
        AUNetConfig(**base)  # [] means all True, as officially
        return
    with pytest.raises(ConfigError) as e:
        AUNetConfig.from_dict(base)
    assert str(e.value).startswith(f"model.{key}:"), str(e.value)


def test_config_roundtrip_and_unknown_key():
    c = tiny_config(2, residuals=[True, False, True])  # README form: K+1 entries
    assert c.skip_connections == [True, False]
    assert AUNetConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match=r"^model\.dimension: unknown key"):
        AUNetConfig.from_dict({**c.to_dict(), "dimension": [1]})


# ---------------------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("caps", [[-1, -1, -1], [-1, 10, 4], [-1, 30, 30], [-1, 5, -1]])
def test_pooling_plan_matches_naive(caps):
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 3, (3, 40), generator=g)
    levels[2] = 0  # a row without any boundary
    plans = pooling_plan(force_first(levels, 2), caps)
    assert int(levels[2].sum()) == 0, "force_first must not mutate its input"
    for b in range(3):
        ref = pool_positions(levels[b].tolist(), caps)
        byte_pos = list(range(40))
        for s, plan in enumerate(plans):
            n = int(plan.counts[b])
            real = plan.idx[b, :n].tolist()
            assert [byte_pos[t] for t in real] == ref[s + 1]
            assert plan.mask[b].nonzero().flatten().tolist() == real
            if caps[s + 1] > 0:
                assert plan.length == min(caps[s + 1], plan.mask.shape[1])
            byte_pos = [byte_pos[t] for t in plan.idx[b].tolist()]


# ---------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize(
    "length, window", [(23, None), (23, 1), (23, 5), (23, 64), (1030, 256), (1024, 200)]
)
def test_attention_matches_naive(length, window):
    """Short sequences take the dense masked kernel, long ones the blocked local path."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, length, 3, 8, generator=g) for _ in range(3))
    out = attention(q, k, v, window, backend="sdpa")
    ref = attention_ref(q, k, v, window)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ upsampling
@pytest.mark.parametrize("upsampling", UPSAMPLINGS)
@pytest.mark.parametrize("cap", [-1, 6])
def test_upsampling_matches_naive(upsampling, cap):
    torch.manual_seed(2)
    d_in, d_out, T = 8, 16, 40
    trans = Transition(d_in, d_out, upsampling, positions=4, norm_eps=1e-5)
    trans.init_weights()
    with torch.no_grad():
        for p in trans.parameters():  # perturb norms so every norm matters
            p.add_(0.1 * torch.randn_like(p))
    levels = torch.randint(0, 2, (2, T))
    (plan,) = pooling_plan(force_first(levels, 1), [-1, cap])
    z = torch.randn(2, plan.length, d_out)
    up = trans.up(z, plan)
    stage_pos = [list(range(T))] * 2
    deep_pos = [plan.idx[b, : int(plan.counts[b])].tolist() for b in range(2)]
    ref = upsample_ref(trans, z, stage_pos, deep_pos, T)
    torch.testing.assert_close(up.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("upsampling", ["multilinear", "nonparam"])
def test_down_gathers_boundary_vectors(upsampling):
    torch.manual_seed(3)
    trans = Transition(8, 16, upsampling, positions=16, norm_eps=1e-5)
    x = torch.randn(2, 20, 8, dtype=torch.float64)
    trans = trans.double()
    levels = torch.randint(0, 2, (2, 20))
    (plan,) = pooling_plan(force_first(levels, 1), [-1, -1])
    y = trans.down(x, plan)
    for b in range(2):
        for r, t in enumerate(plan.idx[b, : int(plan.counts[b])].tolist()):
            v = x[b, t]
            if upsampling == "nonparam":  # feature c*2+u = w_u v[c] + (1-w_u) v[c-1]
                exp = torch.stack(
                    [
                        (u + 1) / 2 * v[c] + (1 - (u + 1) / 2) * v[c - 1]
                        for c in range(8)
                        for u in (0, 1)
                    ]
                )
            else:
                nv = v / torch.sqrt((v * v).mean() + 1e-5) * trans.down_norm.weight
                exp = trans.trans_down.weight @ nv
            torch.testing.assert_close(y[b, r], exp)


# ---------------------------------------------------------------------------------------- causality
CAUSAL_CASES = [(K, u) for K in range(0, 4) for u in UPSAMPLINGS if K > 0 or u == "multilinear"]


@pytest.mark.parametrize("K, upsampling", CAUSAL_CASES)
def test_causality_prefix_and_future_bytes(K, upsampling):
    torch.manual_seed(K)
    rng = random.Random(K)
    caps = [-1] + [[40, 20, 10][s] if s % 2 == 0 else -1 for s in range(K)]
    cfg = tiny_config(K, upsampling, max_seqlens=caps, upsampling_positions=4)
    model = AUNet(cfg).eval()
    data = TEXT.encode()[:150]
    x = torch.tensor(list(data)).unsqueeze(0)
    full = model(x, levels_of(data, K).unsqueeze(0))
    for n in [1, 2, 17, 60, 101, 150]:
        lv = levels_of(data[:n], K)
        assert torch.equal(lv, levels_of(data, K)[:n])  # text chosen prefix-stable
        part = model(x[:, :n], lv.unsqueeze(0))
        torch.testing.assert_close(part, full[:, :n], atol=1e-5, rtol=0)
    # changing byte j (and the levels from j on) changes no logit before j
    for j in [1, 33, 90]:
        other = bytearray(data)
        for i in range(j, len(other)):
            other[i] = rng.choice(b"ab ,.\nXYZ019")
        lv = levels_of(bytes(other), K)
        lv[j:] = torch.randint(0, K + 1, (len(other) - j,))
        out = model(torch.tensor(list(other)).unsqueeze(0), lv.unsqueeze(0))
        torch.testing.assert_close(out[:, :j], full[:, :j], atol=1e-5, rtol=0)
        assert not torch.allclose(out[:, j:], full[:, j:])


def test_batch_rows_are_independent_and_b1_works():
    torch.manual_seed(0)
    model = AUNet(tiny_config(2, max_seqlens=[-1, -1, -1])).eval()
    a, b = TEXT.encode()[:64], TEXT.encode()[64:128]
    la, lb = levels_of(a, 2), levels_of(b, 2)
    both = model(torch.tensor([list(a), list(b)]), torch.stack([la, lb]))
    one = model(torch.tensor([list(b)]), lb.unsqueeze(0))
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=0)


def test_input_levels_not_mutated():
    model = AUNet(tiny_config(1))
    levels = torch.zeros(1, 10, dtype=torch.long)
    model(torch.zeros(1, 10, dtype=torch.long), levels)
    assert int(levels.sum()) == 0


# ---------------------------------------------------------------------------------------- init
def test_init_statistics_follow_fan_in():
    torch.manual_seed(0)
    cfg = AUNetConfig(
        dimensions=[64, 128], layers=[2, 2], head_dims=[16, 32], multiple_of=64, upsampling="repeat"
    )
    model = AUNet(cfg)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
            continue
        if "pos_encoding" in name:
            assert abs(p.std().item() - 1.0) < 0.15, name
            continue
        fan_in = p.shape[-1] if "tok_embeddings" not in name else 64
        if name.endswith("indexed_linear.weight"):
            fan_in = p.shape[-1]
        std = fan_in**-0.5
        assert p.abs().max() <= 3 * std + 1e-6, name
        assert abs(p.std().item() / std - 1) < 0.2, name  # truncation at 3σ gives ~0.986σ
    # every parameter counted once, and the count does not depend on the backend
    assert model.num_params() == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------- learning
def test_two_stage_model_overfits_a_paragraph():
    torch.manual_seed(0)
    data = TEXT.encode()[:256]
    cfg = AUNetConfig(
        dimensions=[64, 128],
        layers=[1, 1],
        head_dims=[16, 32],
        sliding_windows=[64, None],
        multiple_of=32,
    )
    model = AUNet(cfg)
    seq = torch.tensor(list(data))
    lv = levels_of(data, 1)
    x, y, lx = seq[:-1].unsqueeze(0), seq[1:].unsqueeze(0), lv[:-1].unsqueeze(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    bpb = math.inf
    for _step in range(300):
        out = model(x, lx, y)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bpb = out.bits_per_byte
        if bpb < 0.1:
            break
    assert bpb < 0.1, f"bits/byte after {_step + 1} steps: {bpb:.3f}"
