"""AdamW, gradient clipping and the warmup + cosine schedule of the official recipe.

The recipe, and why we differ from it: docs/design.md (Training recipe).

Deliberate difference from the official code: the official ``LambdaLR`` is stepped after the
optimizer, so its first update uses lr = 0. Here update ``n`` (1-based) uses ``lr * lr_factor(n)``
and the first one already moves the weights (``lr / W``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` < 1 is a fraction of the run, >= 1 a number of steps (the official configs)."""
    if warmup < 0:
        raise ValueError(f"train.warmup: expected >= 0, got {warmup}")
    if warmup >= 1:
        if warmup != int(warmup):
            raise ValueError(f"train.warmup: a value >= 1 counts steps, got {warmup}")
        return int(warmup)
    return max(1, round(warmup * total_steps)) if warmup > 0 else 0


def lr_factor(update: int, warmup: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer update ``update`` = 1, 2, ..., total_steps.

    Linear warmup ``update / W`` up to W, then cosine from 1 to ``min_ratio`` at ``total_steps``,
    then ``min_ratio`` (the official formula, shifted by one update).
    """
    if update < 1:
        raise ValueError(f"updates are counted from 1, got {update}")
    if update <= warmup:
        return update / warmup
    if update >= total_steps:
        return min_ratio
    progress = (update - warmup) / (total_steps - warmup)
    return min_ratio + 0.5 * (1 - min_ratio) * (1 + math.cos(math.pi * progress))


def no_decay_names(model: nn.Module) -> set[str]:
    """Norm weights, biases (every tensor under 2-D) and embedding tables: the usual exclusions."""
    out = set()
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if p.ndim < 2 or isinstance(module, nn.Embedding):
                out.add(f"{mod_name}.{name}" if mod_name else name)
    return out


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool) -> list[dict]:
    """One group with decay on everything (official), or decayed / not-decayed groups."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if decay_all:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    skip = no_decay_names(model)
    decay = [p for n, p in params if n not in skip]
    keep = [p for n, p in params if n in skip]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.1,
    decay_norms_and_embeddings: bool = True,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over ``model`` (after sharding, so it holds the sharded parameters)."""
    groups = param_groups(model, weight_decay, decay_norms_and_embeddings)
    fused = all(p.is_cuda for g in groups for p in g["params"]) or None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup: int, total_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose ``last_epoch`` counts finished updates: call ``step()`` after each update.

    Right after construction the lr is already that of update 1 (``lr / W``).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: lr_factor(done + 1, warmup, total_steps, min_ratio)
    )


def resume_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, done: int) -> None:
    """Put a fresh ``build_scheduler`` schedule at ``done`` finished updates, and its lr on the
    optimizer (the lr of update ``done + 1``).

    A resumed run follows its own spec's schedule (docs/checkpoints.md, Resume rules): loading
    the saved scheduler state would bring back the old run's base lr and total steps, and the
    restored optimizer the old run's next lr, so a run whose ``train.steps`` or ``train.lr`` grew
    would take its first update after the resume on the old schedule.
    """
    scheduler.last_epoch = done - 1
    scheduler.step()  # lr = base lr (from the spec) * factor(done + 1), on every param group


def clip_gradients(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm (over every shard on every rank) to ``max_norm``.

    Returns the norm before clipping. FSDP2 gradients are DTensors: torch reduces their norm over
    the mesh, and ``full_tensor`` turns the result into a plain number on every rank.
    """
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
