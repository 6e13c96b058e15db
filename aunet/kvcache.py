"""Per-row key/value caches for one transformer stack (an encoder, the trunk or a decoder).

Every row of a batch advances at its own pace: a stage-s position is appended only when the new
byte reaches stage s, so rows hold different numbers of positions per stage. Each row therefore
keeps its own ring of slots and its own position per slot:

    slot_pos[b] = [ 8  9 10 11  4  5  6  7]   ring of S = 8 slots; row b wrote positions 0..11
                                ^ next write: position 12 -> slot 12 % 8 = 4 (evicts 4)

- Sliding-window stack (window w): S = w. A query at position p reads keys p-w+1..p (``w`` keys
  including itself, the training semantics), which are exactly the ring's contents once p is
  written, so eviction never drops a key that is still visible.
- Full causal stack: S is at least the number of positions ever written, so slot = position; the
  ring grows (doubling) if a caller writes past the size it announced.
- A sliding-window ring may also start smaller than its window (a deep stage, whose rows gain a
  position only every few bytes): until it reaches w slots no row has wrapped (slot = position),
  so it grows the same way, up to w. Attention then reads the slots in use, not w.
Keys are stored after RoPE, so their slot order does not matter to attention.

The step functions below run one stack, or one transition's upsampling, on one new position per
row, from the model's public pieces (``Attention.qkv``, norms, feed-forward, transition weights).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from aunet.layers import Attention, CausalTransformer, apply_rope
from aunet.transitions import Transition, interleave_down, mean_up


class StackCache:
    """K/V of every block of one stack for B rows.

    k, v (n_layers, B, S, KV, Dh); slot_pos (B, S) int64: stage-local position held by each slot,
    -1 = empty.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        positions: int,
        window: int | None,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.window = window
        size = max(1, positions if window is None else min(window, positions))
        shape = (n_layers, batch, size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slot_pos = torch.full((batch, size), -1, dtype=torch.long, device=device)

    @property
    def size(self) -> int:
        return self.slot_pos.shape[1]

    def _grow(self, needed: int) -> None:
        """Enlarge (doubling, up to the window) so that slot == position keeps holding: a full
        causal stack, or a window ring not yet full."""
        size = self.size
        while size < needed:
            size *= 2
        self._pad(size if self.window is None else min(size, self.window))

    def _pad(self, size: int) -> None:
        """Enlarge to ``size`` slots. Only while slot == position holds for every row (a full
        causal stack, or a window not yet filled): then the larger ring keeps every slot."""
        pad = size - self.size
        if pad <= 0:
            return
        assert self.window is None or size <= self.window, "a full window ring cannot grow"
        pad_kv = (*self.k.shape[:2], pad, *self.k.shape[3:])
        self.k = torch.cat([self.k, self.k.new_zeros(pad_kv)], 2)
        self.v = torch.cat([self.v, self.v.new_zeros(pad_kv)], 2)
        empty = self.slot_pos.new_full((len(self.slot_pos), pad), -1)
        self.slot_pos = torch.cat([self.slot_pos, empty], 1)

    def append(self, other: StackCache) -> None:
        """Add ``other``'s rows after these (continuous batching: requests joining a running
        generation). The smaller ring is padded: a ring smaller than its window was sized for all
        the positions its rows announced, so none of them wrapped and slot == position."""
        size = max(self.size, other.size)
        self._pad(size)
        other._pad(size)
        self.k = torch.cat([self.k, other.k], 1)
        self.v = torch.cat([self.v, other.v], 1)
        self.slot_pos = torch.cat([self.slot_pos, other.slot_pos], 0)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (R,) in that order (finished requests leave the batch)."""
        self.k, self.v, self.slot_pos = self.k[:, rows], self.v[:, rows], self.slot_pos[rows]

    def load(self, row: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prefill one row: k, v (n, KV, Dh) for positions 0..n-1; only the last S are kept."""
        n = k.shape[0]
        if self.window is None and n > self.size:
            self._grow(n)
        first = max(0, n - self.size)
        pos = torch.arange(first, n, device=self.slot_pos.device)
        slots = pos % self.size
        self.k[layer, row, slots] = k[first:]
        self.v[layer, row, slots] = v[first:]
        self.slot_pos[row, slots] = pos

    def claim(self, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Reserve the slot of position pos (R,) for each row in rows (R,); returns slots (R,)."""
        if self.window is None or self.size < self.window:
            top = int(pos.max())
            if top >= self.size:
                self._grow(top + 1)
        slots = pos % self.size
        self.slot_pos[rows, slots] = pos
        return slots

    def visible(self, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(R, S) bool: slots a query at position pos (R,) may attend (causal, in the window)."""
        sp = self.slot_pos.index_select(0, rows)
        ok = (sp >= 0) & (sp <= pos[:, None])
        if self.window is not None:
            ok &= sp > pos[:, None] - self.window
        return ok

    def put(
        self, layer: int, rows: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Write k, v (R, KV, Dh) of the new positions into their claimed slots."""
        self.k[layer, rows, slots] = k
        self.v[layer, rows, slots] = v

    def get(self, layer: int, rows: torch.Tensor, all_rows: bool) -> tuple[torch.Tensor, ...]:
        """k, v (R, S, KV, Dh) of the given rows (no copy when every row is asked for in order)."""
        if all_rows:
            return self.k[layer], self.v[layer]
        # index_select: a plain row copy, several times faster than advanced indexing here
        return self.k[layer].index_select(0, rows), self.v[layer].index_select(0, rows)


def prefill_stack(
    stack: CausalTransformer, x: torch.Tensor, backend: str
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """x (B, T_s, D_s) at positions 0..T_s-1 -> output (B, T_s, D_s) and every block's rotated
    k, v (B, T_s, KV, Dh): the computation of ``CausalTransformer.forward``, keeping K/V."""
    kvs: list[tuple[torch.Tensor, torch.Tensor]] = []
    if len(stack.layers) == 0:
        return x, kvs
    cos, sin = stack.rope(torch.arange(x.shape[1], device=x.device))
    for layer in stack.layers:
        att = layer.attention
        q, k, v = att.qkv(layer.attention_norm(x), cos, sin)
        kvs.append((k, v))
        h = x + att.attend(q, k, v, stack.window, backend)
        x = h + layer.feed_forward(layer.ffn_norm(h))
    return x, kvs


def attend_cached(
    att: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """q (R, 1, H, Dh), cached k/v (R, S, KV, Dh), visible (R, 1, 1, S) bool -> (R, 1, D)."""
    rep = att.n_heads // att.n_kv_heads
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=visible
    )
    return att.wo(out.transpose(1, 2).flatten(2))


_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fused_qkv(att: Attention) -> torch.Tensor | None:
    """wq, wk, wv stacked into one (H + 2 KV) * Dh x D weight: one matrix product per block and
    step instead of three (a decode step at serving sizes costs its number of small operations,
    docs/serving.md). Rebuilt when a weight changes (tensor versions); None when the projections
    are not plain float linears (INT8: ``AUModel.from_pretrained(..., quantize="int8")``)."""
    lins = (att.wq, att.wk, att.wv)
    if not all(type(m) is torch.nn.Linear and m.bias is None for m in lins):
        return None
    key = tuple((m.weight.data_ptr(), m.weight._version) for m in lins)
    hit = _FUSED.get(att)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = _FUSED[att] = (key, torch.cat([m.weight for m in lins]))
    return hit[1]


def _qkv_step(
    att: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Attention.qkv`` for one position per row, x (R, 1, D): one fused product and one
    rotation of q and k together (they share the positions)."""
    w = _fused_qkv(att)
    if w is None:
        return att.qkv(x, cos, sin)
    H, KV = att.n_heads, att.n_kv_heads
    qkv = F.linear(x, w).view(x.shape[0], 1, H + 2 * KV, att.head_dim)
    qk = apply_rope(qkv[:, :, : H + KV], cos, sin)
    return qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + KV :]


def step_stack(
    stack: CausalTransformer,
    cache: StackCache,
    rows: torch.Tensor,
    all_rows: bool,
    x: torch.Tensor,
    pos: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One new position per row: x (R, 1, D_s) at stage-local positions pos (R,) -> (R, 1, D_s).

    ``rope``: the cos/sin tables (R, 1, Dh/2) of ``pos`` when the caller already has them (a
    stage's encoder and decoder step at the same positions)."""
    if len(stack.layers) == 0:
        return x
    cos, sin = rope if rope is not None else stack.rope(pos[:, None])
    slots = cache.claim(rows, pos)
    visible = cache.visible(rows, pos)[:, None, None, :]
    for i, layer in enumerate(stack.layers):
        att = layer.attention
        q, k, v = _qkv_step(att, layer.attention_norm(x), cos, sin)
        cache.put(i, rows, slots, k[:, 0], v[:, 0])
        kc, vc = cache.get(i, rows, all_rows)
        h = x + attend_cached(att, q, kc, vc, visible)
        x = h + layer.feed_forward(layer.ffn_norm(h))
    return x


def down_step(trans: Transition, x: torch.Tensor) -> torch.Tensor:
    """``Transition.down`` of one position per row that closes a segment: x (R, 1, d_in) ->
    (R, 1, d_out), without building a pooling plan."""
    if trans.nonparametric:
        return interleave_down(x, trans.ratio)
    return trans.trans_down(trans.down_norm(x))


def up_step(
    trans: Transition, z: torch.Tensor, offset: torch.Tensor, boundary: torch.Tensor
) -> torch.Tensor:
    """``Transition.up`` at one position: deep z (R, D_{s+1}), offset (R,) in [0, P), boundary (R,)
    bool (stage s+1 advanced here) -> (R, 1, D_s)."""
    z = z[:, None]
    zn = z if trans.nonparametric else trans.up_norm(z)

    def project(u: torch.Tensor) -> torch.Tensor:
        return mean_up(u, trans.ratio) if trans.nonparametric else trans.trans_up(u)

    if trans.kind == "scatter":
        return torch.where(boundary[:, None, None], project(zn), 0.0)
    if trans.kind == "repeat":
        return project(zn + trans.pos_encoding(offset[:, None]))
    m_in = trans.indexed_norm(zn) if trans.nonparametric else zn
    # every position's matrix at once, then each row's own: one product instead of a sort and a
    # product per position (IndexedMatMul's way, right for the long sequences of training)
    w = trans.indexed_linear.weight  # (P, D_s, D_{s+1})
    every = F.linear(m_in[:, 0], w.flatten(0, 1)).view(len(offset), w.shape[0], w.shape[1])
    return project(zn) + every[torch.arange(len(offset), device=offset.device), offset][:, None]
