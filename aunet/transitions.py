"""Transitions between stages: pooling down (gather + project) and upsampling back.

One class serves every ``upsampling`` value; the variant is an explicit config field, never parsed
out of a string. Parameter names follow the official ``SimpleTransition`` (``down_norm``,
``trans_down``, ``up_norm``, ``trans_up``, ``indexed_linear.weight``, ``indexed_norm``,
``pos_encoding``).

Upsampling variants (docs/design.md, Upsampling), with z the deep output and r(t)/o(t) the
segment index/offset:
- multilinear:  up[t] = W_up n(z)[r] + M[o] n(z)[r]          (paper's Multi-Linear Upsampling)
- repeat:       up[t] = W_up (n(z)[r] + E[o])
- scatter:      up[t] = W_up n(z)[k] at boundary t = idx[k], else 0
- nonparam*:    the same three with parameter-free projections (feature interleave down,
                block mean up) and, for nonparam_multilinear, a separate norm before M.
"""

from __future__ import annotations

import torch
from torch import nn

from aunet.layers import RMSNorm, trunc_normal_
from aunet.pooling import StagePlan, segment_index, segment_offset


class IndexedMatMul(nn.Module):
    """``positions`` linear maps d_in -> d_out; position t uses matrix ``o[t]``."""

    def __init__(self, positions: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(positions, d_out, d_in))

    def forward(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """x (B, L, d_in), o (B, L) int64 in [0, positions) -> (B, L, d_out): y[b,t] = W[o] x."""
        B, L, d_in = x.shape
        flat, of = x.reshape(B * L, d_in), o.reshape(B * L)
        order = torch.argsort(of, stable=True)
        counts = torch.bincount(of, minlength=self.weight.shape[0]).tolist()
        chunks = flat.index_select(0, order).split(counts)
        ys = [c @ self.weight[j].T for j, c in enumerate(chunks) if c.shape[0]]
        y_sorted = torch.cat(ys) if ys else flat.new_zeros(0, self.weight.shape[1])
        y = torch.empty_like(y_sorted)
        y = y.index_copy(0, order, y_sorted)
        return y.view(B, L, -1)


def interleave_down(y: torch.Tensor, ratio: int) -> torch.Tensor:
    """Parameter-free widening d -> q*d: feature c*q+u = w_u y[c] + (1-w_u) y[c-1], w_u=(u+1)/q."""
    if ratio == 1:
        return y
    w = (torch.arange(1, ratio + 1, device=y.device) / ratio).repeat(y.shape[-1]).to(y.dtype)
    ye = y.repeat_interleave(ratio, dim=-1)
    return ye * w + ye.roll(ratio, -1) * (1 - w)


def mean_up(z: torch.Tensor, ratio: int) -> torch.Tensor:
    """Parameter-free narrowing: mean of each block of ``ratio`` consecutive features."""
    if ratio == 1:
        return z
    B, L, D = z.shape
    return z.view(B, L, D // ratio, ratio).mean(-1)


class Transition(nn.Module):
    def __init__(
        self, d_in: int, d_out: int, upsampling: str, positions: int, norm_eps: float
    ) -> None:
        super().__init__()
        self.d_in, self.d_out, self.upsampling, self.positions = d_in, d_out, upsampling, positions
        self.nonparametric = upsampling.startswith("nonparam")
        self.kind = upsampling.removeprefix("nonparam_") if upsampling != "nonparam" else "scatter"
        self.ratio = d_out // d_in if self.nonparametric else 1
        if not self.nonparametric:
            self.down_norm = RMSNorm(d_in, norm_eps)
            self.trans_down = nn.Linear(d_in, d_out, bias=False)
            self.up_norm = RMSNorm(d_out, norm_eps)
            self.trans_up = nn.Linear(d_out, d_in, bias=False)
        if self.kind == "multilinear":
            self.indexed_linear = IndexedMatMul(positions, d_out, d_in)
            if self.nonparametric:
                self.indexed_norm = RMSNorm(d_out, norm_eps)
        elif self.kind == "repeat":
            self.pos_encoding = nn.Embedding(positions, d_out)

    def _project_up(self, z: torch.Tensor) -> torch.Tensor:
        return mean_up(z, self.ratio) if self.nonparametric else self.trans_up(z)

    def down(self, x: torch.Tensor, plan: StagePlan) -> torch.Tensor:
        """x (B, L_s, d_in) -> (B, L_{s+1}, d_out): each boundary position's vector, projected."""
        y = x.gather(1, plan.idx.unsqueeze(-1).expand(-1, -1, self.d_in))
        if self.nonparametric:
            return interleave_down(y, self.ratio)
        return self.trans_down(self.down_norm(y))

    def up(self, z: torch.Tensor, plan: StagePlan) -> torch.Tensor:
        """z (B, L_{s+1}, d_out) -> (B, L_s, d_in): deep information for every stage-s position."""
        if self.kind == "scatter":
            zn = z if self.nonparametric else self.up_norm(z)
            keep = plan.mask.gather(1, plan.idx).to(z.dtype).unsqueeze(-1)  # 0 on padding
            vals = keep * self._project_up(zn)
            out = vals.new_zeros(z.shape[0], plan.mask.shape[1], self.d_in)
            return out.scatter(1, plan.idx.unsqueeze(-1).expand(-1, -1, self.d_in), vals)
        seg = segment_index(plan)  # (B, L_s)
        off = segment_offset(plan, seg, self.positions)
        zn = z if self.nonparametric else self.up_norm(z)
        zr = zn.gather(1, seg.unsqueeze(-1).expand(-1, -1, self.d_out))  # (B, L_s, d_out)
        if self.kind == "repeat":
            return self._project_up(zr + self.pos_encoding(off))
        m_in = self.indexed_norm(zr) if self.nonparametric else zr
        return self._project_up(zr) + self.indexed_linear(m_in, off)

    def init_weights(self) -> None:
        """sigma = fan_in^-0.5 for every linear; norms 1; position embedding N(0, 1).

        See docs/design.md (Blocks and initialisation).
        """
        for name in ("down_norm", "up_norm", "indexed_norm"):
            if hasattr(self, name):
                getattr(self, name).reset_parameters()
        if not self.nonparametric:
            trunc_normal_(self.trans_down.weight, self.d_in**-0.5)
            trunc_normal_(self.trans_up.weight, self.d_out**-0.5)
        if hasattr(self, "indexed_linear"):
            trunc_normal_(self.indexed_linear.weight, self.d_out**-0.5)
        if hasattr(self, "pos_encoding"):
            self.pos_encoding.reset_parameters()
