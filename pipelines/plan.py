"""Training plans: what a spec leaves open (batch, lr, steps), resolved in one place.

Every path that trains or predicts what will be trained — a lone ``pipelines.train`` run, a
sweep trial, a scaling study's cells and its ``plan`` printout — calls ``plan_training``, so a
study's plan is exactly what its sweep trains. The one step rule under a FLOP budget is *nearest
whole step* (``round(budget / FLOPs per step)``): compute-matched variants then differ by at most
half a step of FLOPs, on either side of the budget (docs/flops.md). FLOPs per byte use the
dataset's measured bytes per token when its manifest is given, the accounting's defaults
otherwise; pass the manifest whenever the dataset exists.

A token-id dataset (a BPE baseline, docs/data.md) plans in the same bytes: a model position is a
token, FLOPs per byte are FLOPs per token / the training split's bytes per token
(``bytes_per_token``), the batch-size law's bytes become sequences of ``seq_len`` tokens at that
rate, and ``bytes_per_step`` counts bytes, so ``train.flop_budget`` and the scaling laws put BPE
models, byte models and AU-Nets on one axis. The model's vocabulary comes from the dataset's
tokenizer (``pipelines.entropy_fit.dataset_spec``).

A leaf of ``pipelines``: it imports the model library and the spec, nothing that starts Ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aunet.flops import batch_size_bytes, flops_per_byte, learning_rate, num_params
from aunet.optim import warmup_steps
from pipelines.entropy_fit import dataset_spec
from pipelines.spec import ExperimentSpec, SpecError


@dataclass(frozen=True)
class TrainPlan:
    """The resolved plan of one run; sent to the workers and stored in every checkpoint.

    ``batch_size`` is in sequences of ``seq_len`` positions per optimizer step (all ranks
    together): bytes, or tokens of a token-id dataset, whose ``bytes_per_token`` is the training
    split's average (1.0 for bytes). FLOPs are ``aunet.flops.flops_per_byte`` (forward +
    backward) at the config's capacities, with the dataset's measured bytes per token for
    uncapped stages.
    """

    seq_len: int
    batch_size: int
    steps: int
    warmup_steps: int
    lr: float
    flops_per_byte: float
    num_params: int
    batch_from_scaling_law: bool
    lr_from_scaling_law: bool
    bytes_per_token: float = 1.0

    @property
    def bytes_per_step(self) -> float:
        """Bytes per optimizer step; for a token model the stream's average (tokens x the
        training split's bytes per token), not the batch's exact byte count."""
        if self.bytes_per_token == 1.0:
            return self.seq_len * self.batch_size  # an int for byte models, as before
        return self.seq_len * self.batch_size * self.bytes_per_token

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_byte * self.bytes_per_step

    @property
    def total_flops(self) -> float:
        return self.flops_per_step * self.steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def params(self) -> dict[str, Any]:
        """Everything worth an MLflow param, derived values included."""
        extra = {"bytes_per_step": self.bytes_per_step, "total_flops": self.total_flops}
        return {f"plan.{k}": v for k, v in {**self.to_dict(), **extra}.items()}


def measured_bytes_per_token(
    spec: ExperimentSpec, manifest: Mapping[str, Any] | None
) -> dict[str, Any]:
    """``{"bytes_per_token": (...)}`` from the manifest's per-stage contraction, else ``{}``."""
    ratios = (manifest or {}).get("contraction")
    if ratios and len(ratios) == spec.model.num_stages and all(r for r in ratios):
        return {"bytes_per_token": tuple(float(r) for r in ratios)}
    return {}


def stream_bytes_per_token(manifest: Mapping[str, Any] | None) -> float:
    """Bytes per model position of a dataset: its tokenizer's measured compression on the
    training split (``bytes_per_token.all`` in the manifest, docs/data.md), 1.0 for bytes."""
    if not manifest or not manifest.get("tokenizer"):
        return 1.0
    try:
        bpt = float(manifest["bytes_per_token"]["all"])
    except (KeyError, TypeError, ValueError):
        raise SpecError(
            "tokenizer: the dataset's manifest.json has a tokenizer but no bytes_per_token.all"
        ) from None
    if not bpt > 0:
        raise SpecError(f"tokenizer: manifest.json: bytes_per_token.all is {bpt}, expected > 0")
    return bpt


def steps_for_budget(flop_budget: float, flops_per_step: float) -> int:
    """The one step rule: the nearest whole number of steps (see the module docstring)."""
    return round(flop_budget / flops_per_step)


def plan_training(
    spec: ExperimentSpec,
    manifest: Mapping[str, Any] | None = None,
    world_size: int | None = None,
) -> TrainPlan:
    """Resolve batch size, lr and steps from the spec, by the scaling laws where left null.

    The laws (``BSZ = 0.66 C^0.321`` bytes, ``LR = 6.6 C^-0.176``; units unverified,
    docs/flops.md) take C = training FLOPs: ``train.flop_budget`` when given, else the run's own
    FLOPs, found by fixed-point iteration since they depend on the batch size. A derived batch is
    rounded to whole sequences, at least one per worker, and up to a multiple of the worker count.
    """
    spec = dataset_spec(spec, manifest)  # the vocabulary of a token-id dataset, entropy stages
    tr, T, cfg = spec.train, spec.data.seq_len, spec.model
    world = world_size or spec.resources.num_workers
    bpt = stream_bytes_per_token(manifest)
    if manifest and manifest.get("tokenizer"):
        fpb = flops_per_byte(cfg, T, bytes_per_token=bpt)
    else:
        fpb = flops_per_byte(cfg, T, **measured_bytes_per_token(spec, manifest))
    fps = fpb * bpt  # FLOPs per position: T positions make T x bpt bytes

    def sequences(C: float) -> int:
        n = max(world, round(batch_size_bytes(C) / (T * bpt)))
        return -(-n // world) * world

    if tr.batch_size is not None:
        batch = tr.batch_size
        if batch % world:
            raise SpecError(f"train.batch_size: {batch} is not a multiple of {world} workers")
    elif tr.flop_budget is not None:
        batch = sequences(tr.flop_budget)
    else:
        batch = world
        for _ in range(100):  # C grows with the batch at exponent 0.321 < 1: this converges
            nxt = sequences(fps * T * batch * tr.steps)
            if nxt == batch:
                break
            batch = nxt
    steps = tr.steps
    if steps is None:
        steps = steps_for_budget(tr.flop_budget, fps * T * batch)
        if steps < 1:
            raise SpecError(
                f"train.flop_budget: {tr.flop_budget:.3g} FLOPs is less than half a step "
                f"({fps * T * batch:.3g} FLOPs)"
            )
    total = fps * T * batch * steps
    return TrainPlan(
        seq_len=T,
        batch_size=batch,
        steps=steps,
        warmup_steps=warmup_steps(tr.warmup, steps),
        lr=tr.lr if tr.lr is not None else learning_rate(total),
        flops_per_byte=fpb,
        num_params=num_params(cfg),
        batch_from_scaling_law=tr.batch_size is None,
        lr_from_scaling_law=tr.lr is None,
        bytes_per_token=bpt,
    )
