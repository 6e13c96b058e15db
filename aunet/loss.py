"""Next-byte cross-entropy (nats), bits per byte, and the optional lambda-level auxiliary loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: ce + lambda_level * level_loss (what backward() sees)
    ce: torch.Tensor  # scalar: mean next-byte cross-entropy in nats over all B*T positions
    level_loss: torch.Tensor | None
    stage_tokens: list[int]  # real positions per stage in this batch

    @property
    def bits_per_byte(self) -> float:
        return float(self.ce.detach()) / LN2


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), targets (B, T) -> mean CE in nats, computed in float32 (official)."""
    logp = F.log_softmax(logits.flatten(0, -2).float(), dim=-1)
    return F.nll_loss(logp, targets.flatten())


def bits_per_byte(nats: float | torch.Tensor) -> float:
    """Mean nats per byte -> bits per byte."""
    return float(nats) / LN2
