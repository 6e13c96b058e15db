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

``prefill_stack`` fills the caches from a prompt; the decode steps that read and extend them are in
aunet/stepping.py.
"""

from __future__ import annotations

import torch

from aunet.layers import CausalTransformer


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

    def visible(self, rows: torch.Tensor, all_rows: bool) -> torch.Tensor:
        """(R, S) bool: the slots a query at each row's newest position may attend, once that
        position is claimed. That is every written slot: a window ring of S = w slots holds
        exactly the last w positions (the window including the query), a ring not yet grown to
        its window and a full causal stack hold positions 0..pos (slot == position, so none has
        been evicted and none lies outside a window wider than the ring), and no row ever holds
        a position past its newest (tests/test_stepping.py checks it against that rule)."""
        sp = self.slot_pos if all_rows else self.slot_pos.index_select(0, rows)
        return sp >= 0

    def put(self, layer: int, flat: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (R, KV, Dh) of the new positions into their claimed slots, given as
        ``flat`` (R,) = row * S + slot: one copy per tensor into the (B * S) slots of ``layer``
        (the ring tensors stay contiguous: ``load`` and ``put`` write in place, the other methods
        replace them with new contiguous ones)."""
        self.k[layer].view(-1, *self.k.shape[3:]).index_copy_(0, flat, k)
        self.v[layer].view(-1, *self.v.shape[3:]).index_copy_(0, flat, v)

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
