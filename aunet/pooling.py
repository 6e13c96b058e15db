"""Level array -> per-stage pooling plan (which positions each stage keeps), as pure functions.

Stage ``s+1`` tokens are the stage-``s`` positions whose byte has level > s, after the capacity cap
(the first ``C_{s+1}`` such bytes of the row, counted in byte order, are kept: the official rule,
docs/design.md, Pooling). The plan is computed once per batch and passed explicitly to pooling
and upsampling, never stored on a module.

Why position 0 is forced to the top level: the pooled vector of a segment sits at its closing
byte and is used from that byte on, so bytes before the first real boundary would otherwise read
a deep vector computed from the future (docs/design.md, Why position 0 is forced). Forcing
happens on a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StagePlan:
    """How stage ``s`` is pooled into stage ``s+1``.

    mask (B, L_s) bool: position t of stage s is a stage-(s+1) boundary (False on padding).
    idx (B, L_{s+1}) int64: stage-s positions of the stage-(s+1) tokens, real ones first
        (ascending), then padding (the first non-boundary positions), like ``MaxSumMask``.
    counts (B,) int64: real stage-(s+1) tokens per row.
    """

    mask: torch.Tensor
    idx: torch.Tensor
    counts: torch.Tensor

    @property
    def length(self) -> int:
        return self.idx.shape[1]


def force_first(levels: torch.Tensor, num_stages: int) -> torch.Tensor:
    """Copy of levels (B, T) with position 0 set to the top level K of every row."""
    out = levels.clone()
    out[:, 0] = num_stages
    return out


def pooling_plan(levels: torch.Tensor, capacities: list[int]) -> list[StagePlan]:
    """Plans for every transition.

    levels (B, T) int, position 0 already at the top level; capacities [C_0..C_K] (-1 = uncapped;
    C_0 is ignored: the input length is T). Returns K plans. Stage lengths: L_0 = T and
    L_{s+1} = min(C_{s+1}, L_s) when capped, else the largest row count.
    """
    B, T = levels.shape
    K = len(capacities) - 1
    plans: list[StagePlan] = []
    byte_pos = torch.arange(T, device=levels.device).expand(B, T)  # (B, L_s): byte of position t
    valid = torch.ones(B, T, dtype=torch.bool, device=levels.device)  # (B, L_s): t < n_s
    for s in range(K):
        sel = levels > s  # (B, T) bytes at level >= s+1
        cap = capacities[s + 1]
        if cap > 0:
            sel = sel & (sel.cumsum(1) <= cap)
        mask = sel.gather(1, byte_pos) & valid  # (B, L_s) in stage-s coordinates
        counts = mask.sum(1)
        L_next = min(cap, mask.shape[1]) if cap > 0 else max(int(counts.max()), 1)
        idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :L_next]
        plans.append(StagePlan(mask=mask, idx=idx, counts=counts))
        byte_pos = byte_pos.gather(1, idx)
        valid = torch.arange(L_next, device=levels.device).unsqueeze(0) < counts.unsqueeze(1)
    return plans


def segment_index(plan: StagePlan) -> torch.Tensor:
    """(B, L_s) int64: index of the latest stage-(s+1) token at or before each stage-s position.

    Position 0 is always a boundary, so this is cumsum(mask) - 1 (padding maps to the last token).
    """
    c = plan.mask.long().cumsum(1)
    return c - c[:, :1]


def segment_offset(plan: StagePlan, seg: torch.Tensor, positions: int) -> torch.Tensor:
    """(B, L_s) int64: distance from the segment's boundary, modulo ``positions`` (official: 16)."""
    t = torch.arange(plan.mask.shape[1], device=seg.device).unsqueeze(0)
    return (t - plan.idx.gather(1, seg)) % positions
