"""Memory per device of training or serving an AU-Net: parameters, gradients, optimizer state and
activations, from the config alone (docs/performance.md, Memory).

Pure arithmetic over ``AUNetConfig``; reading an experiment YAML is ``python -m pipelines.memory``
(``aunet`` imports no yaml). The layout it models is the one ``aunet.parallel.shard`` builds:

* parameters: fp32 master weights sharded over the FSDP world; with ``bfloat16`` a bf16 compute
  copy of every block stays gathered from its forward to its backward
  (``reshard_after_forward=False``, the official choice), so it is counted unsharded;
* gradients: fp32, reduced into shards (``reduce_dtype=float32``);
* optimizer: AdamW's two fp32 moments per parameter plus one fp32 ``step`` per tensor. No extra
  master copy: the sharded fp32 parameters are the masters;
* activations: the tensors autograd saves for the backward, counted per position and block from
  the ops the blocks run (``activation_bytes``), reduced by activation checkpointing.

``measure_saved_bytes`` counts what autograd really saves (distinct storages, via
``torch.autograd.graph.saved_tensors_hooks``), which is how the tests check the estimate on CPU
without a GPU allocator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from aunet.config import AUNetConfig
from aunet.flops import _blocks_at, num_params, stage_lengths

AC_POLICIES = ("none", "blocks", "selective")
FP32 = 4


def dtype_bytes(dtype: str) -> int:
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    return 4 if dtype == "float32" else 2


def ac_per_stage(policy: str | Sequence[str], num_stages: int) -> list[str]:
    """One checkpointing policy per stage 0..K (stage K = trunk) from one value or a list."""
    out = [policy] * (num_stages + 1) if isinstance(policy, str) else list(policy)
    if len(out) != num_stages + 1:
        raise ValueError(
            f"activation_checkpointing: expected one value or {num_stages + 1} (one per stage), "
            f"got {list(out)}"
        )
    for p in out:
        if p not in AC_POLICIES:
            raise ValueError(f"activation_checkpointing: expected one of {AC_POLICIES}, got {p!r}")
    return out


def checkpointed(policy: str, index: int) -> bool:
    """Whether block ``index`` of a stack is recomputed: all (blocks), every second (selective)."""
    return policy == "blocks" or (policy == "selective" and index % 2 == 1)


def block_activation_bytes(config: AUNetConfig, s: int, p: int) -> float:
    """Bytes saved for the backward by one block of stage ``s`` per position, compute bytes ``p``.

    Per op (d = width, dkv = key/value width, h = SwiGLU width): each RMSNorm keeps its float32
    input and normalised output and its cast result (2*4d + p*d); RoPE keeps float32 q and k
    (4*(d + dkv)); attention keeps rotated q, k, v and its output (p*(d + 2*dkv) + p*d, plus the
    GQA-repeated k and v), the output projection a contiguous copy of that output (p*d); SwiGLU
    keeps w1x, silu(w1x), w3x and their product (4*p*h).
    """
    st = config.stages[s]
    d, h = st.dim, config.ffn_hidden(st.dim)
    dkv = config.kv_heads(s) * st.head_dim
    norms = 2 * (2 * FP32 * d + p * d)
    rope = FP32 * (d + dkv)
    attn = p * (d + 2 * dkv) + 2 * p * d + (2 * p * d if dkv != d else 0)
    lse = FP32 * st.n_heads
    return norms + rope + attn + lse + 4 * p * h


def compiled_block_activation_bytes(config: AUNetConfig, s: int, p: int) -> float:
    """Bytes a ``torch.compile``'d block keeps per position (AOTAutograd's min-cut partitioner,
    the one inductor uses), compute bytes ``p``.

    The partitioner saves a cut of the forward graph from which the backward recomputes cheap
    pointwise ops; per op (d = width, h = SwiGLU width), as counted on CPU by
    tests/test_gpu_path.py with the attention as a graph break (Flex is one):

    * each RMSNorm: its float32 input (4*d; the residual stream), the float32 reciprocal RMS (4)
      and the cast of its output to the compute dtype (p*d, the matmul input); the float32
      normalised output that eager autograd also keeps is recomputed from input and rstd;
    * RoPE: nothing (its backward is the inverse rotation by the constant cos/sin tables), where
      eager keeps float32 q and k;
    * attention (its own autograd, Flex or SDPA's efficient kernels): the rotated q, k and v it
      was given (GQA heads repeated, so d each: 3*p*d), its output (p*d) and the float32
      log-sum-exp per head; no score matrix;
    * output projection: a contiguous (positions, d) copy of that output (p*d);
    * SwiGLU: w1x, w3x and their product silu(w1x)*w3x, the w2 input (3*p*h); silu(w1x), which
      eager also keeps, is recomputed.
    """
    st = config.stages[s]
    d, h = st.dim, config.ffn_hidden(st.dim)
    norms = 2 * (FP32 * d + FP32 + p * d)
    attn = 3 * p * d + p * d + FP32 * st.n_heads + p * d
    return norms + attn + 3 * p * h


def activation_bytes(
    config: AUNetConfig,
    seq_len: int,
    batch_size: int,
    dtype: str = "float32",
    activation_checkpointing: str | Sequence[str] = "none",
    stage_tokens: Sequence[float] | None = None,
    compiled: bool = False,
) -> float:
    """Peak bytes of saved activations for one forward of ``batch_size`` x ``seq_len`` bytes.

    A checkpointed block keeps only its input (p*d per position); the backward then recomputes one
    block at a time, so the largest checkpointed block is added once. Transitions and the head are
    never checkpointed; the head keeps the float32 log-probabilities (4*V per position, V = 258
    for bytes).
    ``compiled``: the blocks are ``torch.compile``'d (``aunet.parallel.shard(compile=True)``) and
    keep ``compiled_block_activation_bytes``; transitions and the head stay eager either way.
    """
    p = dtype_bytes(dtype)
    K = config.num_stages
    L = stage_lengths(config, seq_len, stage_tokens)
    policies = ac_per_stage(activation_checkpointing, K)
    per_block = compiled_block_activation_bytes if compiled else block_activation_bytes
    total, recompute = 0.0, 0.0
    for s, st in enumerate(config.stages):
        full = per_block(config, s, p) * L[s]
        kept = p * st.dim * L[s]
        per_stack = st.layers
        stacks = 1 if st.is_trunk else 2
        for _ in range(stacks):
            for i in range(per_stack):
                if checkpointed(policies[s], i):
                    total += kept
                    recompute = max(recompute, full)
                else:
                    total += full
    dims = config.dimensions
    for s in range(K):
        di, do = dims[s], dims[s + 1]
        down = (2 * FP32 + p) * di * L[s + 1] + p * do * L[s + 1]
        up = (2 * FP32 + p) * do * L[s + 1] + 2 * p * do * L[s]
        total += down + up
    d0 = dims[0]
    total += (2 * FP32 * d0 + p * d0 + FP32 * config.vocab_size) * L[0]
    return (total + recompute) * batch_size


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device; ``total`` is their sum (allocator slack and CUDA context not included)."""

    params: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    def rows(self) -> list[tuple[str, float]]:
        return [
            ("parameters", self.params),
            ("gradients", self.grads),
            ("optimizer", self.optimizer),
            ("activations", self.activations),
            ("total", self.total),
        ]


def param_tensors(config: AUNetConfig) -> int:
    """Number of parameter tensors of ``AUNet(config)`` (one AdamW ``step`` each)."""
    K = config.num_stages
    n = 3  # tok_embeddings, vocab_norm, vocab
    n += sum(_blocks_at(config, s) * 9 for s in range(K + 1))  # 2 norms, 4 attention, 3 ffn
    per_transition = {"multilinear": 1, "repeat": 1, "scatter": 0}
    for _ in range(K):
        kind = config.upsampling.removeprefix("nonparam_")
        kind = "scatter" if kind == "nonparam" else kind
        n += per_transition[kind] + (0 if config.nonparametric else 4)
        n += 1 if config.upsampling == "nonparam_multilinear" else 0
    if config.lambda_level > 0:
        n += 2
    return n


def training_memory(
    config: AUNetConfig,
    seq_len: int,
    batch_size: int,
    dtype: str = "float32",
    world_size: int = 1,
    activation_checkpointing: str | Sequence[str] = "none",
    stage_tokens: Sequence[float] | None = None,
    compiled: bool = False,
) -> MemoryEstimate:
    """Per-device memory of AdamW training; ``batch_size`` = sequences per device; ``compiled``:
    blocks compiled with inductor (``compiled_block_activation_bytes``)."""
    P, W = num_params(config), world_size
    compute_copy = 0 if dtype == "float32" else dtype_bytes(dtype) * P
    return MemoryEstimate(
        params=FP32 * P / W + compute_copy,
        grads=FP32 * P / W,
        optimizer=(2 * FP32 * P + FP32 * param_tensors(config)) / W,
        activations=activation_bytes(
            config, seq_len, batch_size, dtype, activation_checkpointing, stage_tokens, compiled
        ),
    )


def inference_memory(
    config: AUNetConfig, context: int, batch_size: int = 1, dtype: str = "bfloat16"
) -> MemoryEstimate:
    """Serving: weights in ``dtype`` plus the key/value cache of every block (a sliding window
    keeps at most ``window`` positions) for ``context`` bytes; no gradients, no optimizer."""
    p = dtype_bytes(dtype)
    L = stage_lengths(config, context)
    cache = 0.0
    for s, st in enumerate(config.stages):
        keep = L[s] if st.sliding_window is None else min(L[s], st.sliding_window)
        dkv = config.kv_heads(s) * st.head_dim
        cache += _blocks_at(config, s) * 2 * dkv * keep * p
    return MemoryEstimate(num_params(config) * p, 0.0, 0.0, cache * batch_size)


def measure_saved_bytes(
    fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()
) -> tuple[torch.Tensor, int]:
    """Run ``fn`` (a forward returning the loss) and count the bytes autograd saves for its
    backward: distinct storages (a view shares its base's storage, counted once), leaving out the
    storages of ``exclude`` (the model's parameters: a saved slice of a weight is no activation).
    Returns (fn's result, bytes)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def format_table(rows: list[tuple[str, float]], title: str) -> str:
    """A small markdown table of byte counts in GiB."""
    lines = [f"| {title} | GiB |", "|---|---:|"]
    lines += [f"| {name} | {b / 2**30:.3f} |" for name, b in rows]
    return "\n".join(lines)
