"""Decode steps: one new position per row through a stack, a transition or the head.

At serving sizes (widths 64-512, up to a few dozen rows) a decode step costs its number of small
operations more than its arithmetic (docs/serving.md, Load test). So the step does the arithmetic
of the training forward with fewer of them:

- ``StackStep``/``BlockStep`` read a block's operands once per ``Generator``: its weights, the
  q/k/v and w1/w3 projections fused into one product each, head counts. Looking them up through
  ``nn.Module`` attributes on every step cost about as much as a block's matrix products;
- float32 norms are one ``F.rms_norm`` (the ``RMSNorm`` module's float32 arithmetic, bit for bit);
- rotary embeddings are one complex product, read from a per-stack table of position rotations
  (the same float32 cos and sin that ``rope_tables`` computes);
- new keys and values go into the rings with one ``index_copy_`` per tensor
  (``StackCache.put``), and attention reads every written slot (``StackCache.visible``).

Other dtypes (bf16 on a GPU) keep the modules' own upcasts, and linears that are not plain
(``AUModel.from_pretrained(..., quantize="int8")``) run as modules. The fused weights (q/k/v,
w1/w3, and trans_up with the multilinear upsampling matrices) are copies, kept per module while
the model lives (about 0.7x the parameters again for a large multilinear model), made or
refreshed when a ``Generator`` is made; every other weight is read live. So a model's weights
must not change while a ``Generator`` of it is decoding: make a new one after an update.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aunet.kvcache import StackCache
from aunet.layers import CausalTransformer, TransformerBlock, apply_rope
from aunet.transitions import Transition, interleave_down, mean_up

Rope = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]  # cos, sin, rot

_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plain(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.bias is None


def fused_weight(owner: nn.Module, weights: list[torch.Tensor]) -> torch.Tensor:
    """``weights`` (N_i, D) stacked into one (sum N_i, D): one matrix product instead of several.
    Cached per ``owner`` (a Generator is made per request) and rebuilt when a weight changed
    (tensor versions)."""
    key = tuple((w.data_ptr(), w._version) for w in weights)
    hit = _FUSED.get(owner)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = _FUSED[owner] = (key, torch.cat(weights))
    return hit[1]


def fused_linears(owner: nn.Module, lins: tuple[nn.Module, ...]) -> torch.Tensor | None:
    """``fused_weight`` of linear layers; None unless all are plain (not INT8) and bias-free."""
    return fused_weight(owner, [m.weight for m in lins]) if all(map(_plain, lins)) else None


class NormStep:
    """An ``RMSNorm`` of x (..., D), its operands read once: one kernel in float32, the module
    otherwise."""

    __slots__ = ("module", "weight", "shape", "eps")

    def __init__(self, norm: nn.Module) -> None:
        self.module, self.weight, self.eps = norm, norm.weight, norm.eps
        self.shape = tuple(norm.weight.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return self.module(x)


class LinearStep:
    """A bias-free ``nn.Linear`` as ``F.linear`` on its weight; any other module (INT8) as is."""

    __slots__ = ("module", "weight")

    def __init__(self, module: nn.Module) -> None:
        self.module, self.weight = module, module.weight if _plain(module) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) if self.weight is not None else self.module(x)


def _rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` for float32 x (R, 1, N, Dh) as one complex product with rot (R, 1, 1,
    Dh/2) = cos + i sin: each interleaved pair is one complex number."""
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rot).flatten(-2)


class BlockStep:
    """One ``TransformerBlock`` on one new position per row, with its operands read once."""

    def __init__(self, layer: TransformerBlock) -> None:
        att, ffn = layer.attention, layer.feed_forward
        self.att, self.ffn = att, ffn
        self.H, self.KV, self.Dh = att.n_heads, att.n_kv_heads, att.head_dim
        self.norm1, self.norm2 = NormStep(layer.attention_norm), NormStep(layer.ffn_norm)
        self.wqkv = fused_linears(att, (att.wq, att.wk, att.wv))
        self.w13 = fused_linears(ffn, (ffn.w1, ffn.w3))
        self.wo, self.w2 = LinearStep(att.wo), LinearStep(ffn.w2)

    def __call__(
        self,
        x: torch.Tensor,
        rope: Rope,
        put: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        visible: torch.Tensor,
    ) -> torch.Tensor:
        """x (R, 1, D) -> (R, 1, D). ``put(k, v)`` stores the new rotated keys and values
        (R, KV, Dh) and returns the keys and values to attend (R, S, KV, Dh); visible
        (R, 1, 1, S) bool."""
        H, KV, Dh, R = self.H, self.KV, self.Dh, x.shape[0]
        cos, sin, rot = rope
        h = self.norm1(x)
        if self.wqkv is not None:
            qkv = F.linear(h, self.wqkv).view(R, 1, H + 2 * KV, Dh)
            qk, v = qkv[:, :, : H + KV], qkv[:, :, H + KV :]
        else:
            att = self.att
            qk = torch.cat([att.wq(h), att.wk(h)], -1).view(R, 1, H + KV, Dh)
            v = att.wv(h).view(R, 1, KV, Dh)
        qk = _rotate(qk, rot) if rot is not None else apply_rope(qk, cos, sin)
        k, vv = put(qk[:, 0, H:], v[:, 0])
        if H != KV:
            k, vv = k.repeat_interleave(H // KV, dim=2), vv.repeat_interleave(H // KV, dim=2)
        out = F.scaled_dot_product_attention(
            qk[:, :, :H].transpose(1, 2), k.transpose(1, 2), vv.transpose(1, 2), attn_mask=visible
        )
        h = x + self.wo(out.transpose(1, 2).flatten(2))
        hn = self.norm2(h)
        if self.w13 is None:
            return h + self.ffn(hn)
        a, b = F.linear(hn, self.w13).chunk(2, -1)
        return h + self.w2(F.silu(a) * b)


class StackStep:
    """One stack (an encoder, the trunk or a decoder) on one new position per row."""

    def __init__(self, stack: CausalTransformer) -> None:
        self.stack = stack
        self.blocks = [BlockStep(layer) for layer in stack.layers]
        self._rot: torch.Tensor | None = None  # (N, Dh/2) complex: rotations of positions 0..N-1

    def rope(self, pos: torch.Tensor, dtype: torch.dtype) -> Rope:
        """Rotations of positions pos (R,): (cos, sin, None) tables (R, 1, Dh/2), or for float32
        (None, None, rot) with rot (R, 1, 1, Dh/2) = cos + i sin from the stack's table, grown
        by doubling (one lookup per step instead of computing the angles)."""
        if dtype != torch.float32 or not self.blocks:
            cos, sin = self.stack.rope(pos[:, None])
            return cos, sin, None
        table = self._rot
        top = int(pos.max()) + 1
        if table is None or len(table) < top or table.device != pos.device:
            n = max(64, 1 << (top - 1).bit_length())
            cos, sin = self.stack.rope(torch.arange(n, device=pos.device))
            table = self._rot = torch.complex(cos, sin)
        return None, None, table.index_select(0, pos)[:, None, None]

    def __call__(
        self,
        cache: StackCache,
        rows: torch.Tensor,
        all_rows: bool,
        x: torch.Tensor,
        pos: torch.Tensor,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        """x (R, 1, D_s) at stage-local positions pos (R,) of rows (R,) -> (R, 1, D_s).
        ``all_rows``: rows are every cached row in order (the caches are read without a copy).
        ``rope``: ``self.rope(pos)`` when the caller has it (a stage's encoder and decoder step
        at the same positions)."""
        if not self.blocks:
            return x
        rope = rope if rope is not None else self.rope(pos, x.dtype)
        slots = cache.claim(rows, pos)
        visible = cache.visible(rows, all_rows)[:, None, None, :]
        flat = rows * cache.size + slots  # each new position's row of the (B * S) slots
        for i, block in enumerate(self.blocks):

            def put(k: torch.Tensor, v: torch.Tensor, i: int = i) -> tuple[torch.Tensor, ...]:
                cache.put(i, flat, k, v)
                return cache.get(i, rows, all_rows)

            x = block(x, rope, put, visible)
        return x


class TransitionStep:
    """One ``Transition`` at one position per row: ``down`` for the rows closing a segment,
    ``up`` for every row. Multilinear upsampling with a projection (the default) is one product:
    ``trans_up`` and every position's matrix stacked."""

    def __init__(self, trans: Transition) -> None:
        self.trans, self.kind, self.param = trans, trans.kind, not trans.nonparametric
        if self.param:
            self.down_norm, self.up_norm = NormStep(trans.down_norm), NormStep(trans.up_norm)
            self.trans_down = LinearStep(trans.trans_down)
            self.trans_up = LinearStep(trans.trans_up)
        elif self.kind == "multilinear":
            self.indexed_norm = NormStep(trans.indexed_norm)
        self.w_up = None  # (P + 1) * D_s x D_{s+1}: trans_up, then position 0..P-1's matrix
        if self.kind == "multilinear" and self.param and _plain(trans.trans_up):
            w = trans.indexed_linear.weight
            self.w_up = fused_weight(trans, [trans.trans_up.weight, w.flatten(0, 1)])
        self._ar: torch.Tensor | None = None

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """``Transition.down`` without a pooling plan: x (R, 1, d_in) -> (R, 1, d_out)."""
        if not self.param:
            return interleave_down(x, self.trans.ratio)
        return self.trans_down(self.down_norm(x))

    def up(self, z: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        """``Transition.up`` at one position: deep z (R, D_{s+1}), off (R,) = stage-s position
        minus that of the latest stage-(s+1) token (0: stage s+1 advanced here) -> (R, 1, D_s)."""
        trans, P, R = self.trans, self.trans.positions, len(off)
        ar = self._ar  # 0..R-1: each row picks its own position's matrix
        if ar is None or len(ar) != R or ar.device != off.device:
            ar = self._ar = torch.arange(R, device=off.device)
        if self.w_up is not None:
            every = F.linear(self.up_norm(z), self.w_up).view(R, P + 1, trans.d_in)
            return (every[:, 0] + every[ar, off % P + 1])[:, None]
        z = z[:, None]
        zn = self.up_norm(z) if self.param else z

        def project(u: torch.Tensor) -> torch.Tensor:
            return self.trans_up(u) if self.param else mean_up(u, trans.ratio)

        if self.kind == "scatter":
            return torch.where((off == 0)[:, None, None], project(zn), 0.0)
        if self.kind == "repeat":
            return project(zn + trans.pos_encoding((off % P)[:, None]))
        m_in = zn if self.param else self.indexed_norm(zn)
        # every position's matrix at once, then each row's own: one product instead of a sort and a
        # product per position (IndexedMatMul's way, right for the long sequences of training)
        w = trans.indexed_linear.weight  # (P, D_s, D_{s+1})
        every = F.linear(m_in[:, 0], w.flatten(0, 1)).view(R, P, w.shape[1])
        return project(zn) + every[ar, off % P][:, None]
