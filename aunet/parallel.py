"""Sharding an AU-Net with FSDP2, and the device facts training needs (backend, peak FLOP/s).

Pure torch: the same code runs under Ray Train, ``torch.multiprocessing`` or ``torchrun``, on CPU
(gloo) and on GPUs (NCCL), one node or many. The FSDP units are the transformer blocks
(``model.blocks()``) plus the root, which then holds the embeddings, transitions and head: those are
small next to the blocks, and sharding them separately would only add collectives.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from aunet.memory import ac_per_stage, checkpointed

# Dense bf16 tensor-core peak per device (vendor datasheets), matched by substring in this order:
# the more specific names first ("H100 PCIe" before "H100"). No CPU entry: no MFU on CPUs.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)


def backend_for(use_gpu: bool) -> str:
    """torch.distributed backend: NCCL between GPUs, gloo on CPU."""
    return "nccl" if use_gpu else "gloo"


def peak_flops(device: torch.device | str) -> float | None:
    """Peak dense bf16 FLOP/s of ``device``; None when unknown (every CPU, unlisted GPUs)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def param_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """TrainConfig.dtype -> compute dtype: ``auto`` is bf16 on CUDA and fp32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"train.dtype: expected auto, float32 or bfloat16, got {dtype!r}")
    return getattr(torch, dtype)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device(use_gpu: bool) -> torch.device:
    """This process's device: its local GPU (``LOCAL_RANK``) or the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("resources.use_gpu is true but torch sees no CUDA device")
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def shard(
    model: nn.Module,
    mixed_precision: bool,
    *,
    compile: bool = False,
    activation_checkpointing: bool | str | Sequence[str] = False,
    reshard_after_forward: bool = False,
    compile_backend: str = "inductor",
) -> nn.Module:
    """FSDP2 ``fully_shard`` every block of ``model.blocks()``, then the root; in place.

    ``mixed_precision``: bf16 parameters and compute with fp32 gradient reduction (the official
    recipe on GPUs); otherwise fp32 throughout (the CPU default). Sharded master weights and the
    optimizer state stay fp32 either way, so AdamW updates fp32 masters. No loss scaling: bf16
    has fp32's exponent range, so gradients do not underflow the way fp16 ones do (loss scaling
    exists for fp16's 5-bit exponent).
    ``activation_checkpointing``: ``none | blocks | selective`` for every stage, or a list with
    one per stage (stage K = trunk); ``blocks`` recomputes every block of the stage, ``selective``
    every second one (half the saved activations for half the recompute). ``True`` = ``blocks``.
    Compiled blocks are compiled with ``dynamic=False``: every stage runs at a fixed length (the
    byte stage at seq_len, a capped stage at its capacity, ``aunet.pooling``), so each stage shape
    compiles once; ``compile_backend`` is for tests (``eager`` counts compiles cheaply).
    ``compile`` compiles each block's forward, and ``activation_checkpointing`` recomputes each
    block's activations in the backward pass. Both replace the block's ``forward`` only, so FSDP's
    hooks stay outside the compiled / recomputed region and state-dict keys do not change.
    ``reshard_after_forward=False`` for the blocks follows the official code (fewer all-gathers,
    more memory); the root always reshards.
    Without an initialised process group only compile/checkpointing apply (one process, no FSDP).
    """
    blocks = list(model.blocks())  # type: ignore[operator]
    if not blocks:
        raise ValueError("shard: the model has no transformer blocks")
    ac = activation_checkpointing
    ac = {True: "blocks", False: "none"}.get(ac, ac) if isinstance(ac, bool) else ac
    policies = ac_per_stage(ac, model.config.num_stages)  # type: ignore[union-attr]
    for s, i, block in model.stage_blocks():  # type: ignore[operator]
        forward = block.forward
        if compile:
            forward = torch.compile(forward, dynamic=False, backend=compile_backend)
        if checkpointed(policies[s], i):
            forward = functools.partial(checkpoint, forward, use_reentrant=False)
        if forward is not block.forward:
            block.forward = forward  # instance attribute: nn.Module.__call__ runs it
    if not is_distributed():
        if mixed_precision:
            raise ValueError("shard: mixed precision needs FSDP, i.e. a process group")
        return model
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    for block in blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)
    return model


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few scalars over ranks in one collective (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
