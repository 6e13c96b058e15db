"""Naive, loop-based reference implementations (slow and obvious) that the tests compare against.

They follow the official algorithm as described in docs/design.md (Pooling, Upsampling) literally,
one row and one position at a time, in float64 where arithmetic matters.
"""

from __future__ import annotations

import math

import torch


def pool_positions(levels: list[int], capacities: list[int]) -> list[list[int]]:
    """One row: byte positions of the tokens of every stage (stage 0 = all bytes).

    Literal official rule: stage s+1 keeps the bytes of stage s whose level > s, but only among
    the first C_{s+1} bytes (in byte order, over the whole row) whose level > s.
    """
    K = len(capacities) - 1
    levels = list(levels)
    levels[0] = K
    stages = [list(range(len(levels)))]
    for s in range(K):
        sel = [j for j, lv in enumerate(levels) if lv > s]
        if capacities[s + 1] > 0:
            sel = sel[: capacities[s + 1]]
        sel_set = set(sel)
        stages.append([j for j in stages[s] if j in sel_set])
    return stages


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None
) -> torch.Tensor:
    """q/k/v (B, L, H, Dh) -> (B, L, H, Dh), float64 loops over queries."""
    B, L, H, Dh = q.shape
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(B, L, H, Dh, dtype=torch.float64)
    for t in range(L):
        lo = 0 if window is None else max(0, t - window + 1)
        scores = torch.einsum("bhd,bkhd->bhk", q[:, t], k[:, lo : t + 1]) / math.sqrt(Dh)
        p = scores.softmax(-1)
        out[:, t] = torch.einsum("bhk,bkhd->bhd", p, v[:, lo : t + 1])
    return out


def upsample_ref(
    trans: torch.nn.Module,
    z: torch.Tensor,
    stage_pos: list[list[int]],
    deep_pos: list[list[int]],
    length: int,
) -> torch.Tensor:
    """Per-position upsampling for every variant, in float64.

    z (B, L_deep, d_out) deep outputs (real tokens first); stage_pos[b] = byte positions of the
    stage-s tokens of row b, deep_pos[b] = those of the stage-(s+1) tokens. Returns
    (B, length, d_in) for the stage-s positions; positions beyond a row's real tokens stay zero.
    """
    B = z.shape[0]
    z = z.double()
    P = trans.positions
    d_in = trans.d_in
    out = torch.zeros(B, length, d_in, dtype=torch.float64)

    def w(mod: torch.nn.Module) -> torch.Tensor:
        return mod.weight.detach().double()

    def rms(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean() + norm.eps) * w(norm)

    def proj_up(x: torch.Tensor) -> torch.Tensor:
        if trans.nonparametric:
            q = trans.ratio
            return torch.stack([x[c * q : (c + 1) * q].mean() for c in range(d_in)])
        return w(trans.trans_up) @ x

    for b in range(B):
        stage_pos_b, deep_b = stage_pos[b], deep_pos[b]
        for t, byte in enumerate(stage_pos_b):
            # latest deep token whose byte is <= this position's byte
            r = max(i for i, db in enumerate(deep_b) if db <= byte)
            boundary_t = stage_pos_b.index(deep_b[r])
            o = (t - boundary_t) % P
            zr = z[b, r]
            zn = zr if trans.nonparametric else rms(zr, trans.up_norm)
            if trans.kind == "scatter":
                if deep_b[r] == byte:
                    out[b, t] = proj_up(zn)
            elif trans.kind == "repeat":
                out[b, t] = proj_up(zn + w(trans.pos_encoding)[o])
            else:
                m_in = rms(zr, trans.indexed_norm) if trans.nonparametric else zn
                out[b, t] = proj_up(zn) + w(trans.indexed_linear)[o] @ m_in
    return out


def tiny_aunet(capacity: int, seed: int = 0):  # noqa: ANN201 - aunet.model.AUNet
    """The small 2-stage AU-Net the checkpoint, scoring and lm-eval tests share (eval mode,
    seeded): bytes d=32 with a 16-byte window, words d=64 full causal, ``capacity`` word
    positions per window."""
    from aunet.config import AUNetConfig
    from aunet.model import AUNet

    torch.manual_seed(seed)
    cfg = AUNetConfig(
        dimensions=[32, 64],
        layers=[1, 1],
        head_dims=[8, 16],
        sliding_windows=[16, None],
        max_seqlens=[-1, capacity],
        multiple_of=16,
    )
    return AUNet(cfg).eval()
