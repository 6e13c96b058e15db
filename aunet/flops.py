"""Parameter and FLOP accounting, the official estimators, and scaling-law helpers.

The conventions, with the reasons for each, are in docs/flops.md.

Our count (``flops_per_byte``) follows what ``AUNet`` runs, not the official shortcut: every matmul
of every block at its stage's real length, the transitions (down at L_{s+1}; up and multi-linear
at L_s, scatter-up at L_{s+1}), the head, and attention scores/values. Forward + backward = 3x the
forward (one matmul forward, two backward), so a weight used at N positions costs 6*N*numel.

Attention conventions (``attention=``), per layer at a stage of length L, width d = H*head_dim:
- ``"causal"`` (default): 12*d per (query, key) pair actually needed, i.e. keys
  ``q-w < k <= q``: the work a windowed causal kernel (flash) does. The meaningful count.
- ``"dense"``: 12*d*L^2, what a materialised-mask kernel does (CPU SDPA with a window mask
  computes every score) and what ``torch.utils.flop_counter`` reports for SDPA under the MATH
  backend (masks ignored).
- ``"none"``: no attention term, what ``flop_counter`` reports on CPU with the default SDPA
  kernel (``_scaled_dot_product_flash_attention_for_cpu`` has no flop formula: it counts 0).

A BPE model (docs/design.md, BPE baseline) runs one position per token: ``flops_per_token`` is
what it costs, and ``flops_per_byte`` divides by the bytes per token measured on the training
split (a float ``bytes_per_token``), so byte models, AU-Nets and BPE models share one FLOPs axis.
For byte models a position is a byte (1.0) and ``bytes_per_token`` keeps its per-stage meaning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from aunet.config import AUNetConfig

# Bytes per stage-s token for uncapped stages when no counts are given (s = 1, 2, 3). 5.4 and 9.2
# are the measured word1 / word2 ratios (GPL-3 text, not DCLM; docs/design.md, Worked examples);
# 18.4 (4-word chunks) is an unmeasured extrapolation (2 x 9.2). Deeper stages double again.
DEFAULT_BYTES_PER_TOKEN = (5.4, 9.2, 18.4)
# Data-to-model ratio of ``compute_optimal``: Chinchilla's 20 tokens per parameter at ~4.5 bytes
# per BPE token (Llama-3 tokenizer on web text) = 90 bytes per parameter. The official 2B runs sit
# at 214 (2B_1level) and 259 (2B_2level) bytes per parameter: pass those to follow them.
DEFAULT_BYTES_PER_PARAM = 90.0
ATTENTION_CONVENTIONS = ("causal", "dense", "none")
# ``bytes_per_token`` of the functions below: bytes per stage-0 position (a float: a BPE model's
# measured compression, 1.0 for bytes) or the per-stage contraction of an AU-Net (a sequence).
BytesPerToken = float | Sequence[float]


def split_bytes_per_token(
    config: AUNetConfig, bytes_per_token: BytesPerToken | None
) -> tuple[float, Sequence[float]]:
    """(bytes per stage-0 position, per-stage contraction for uncapped deeper stages).

    A token model without a float is an error rather than a silent FLOPs-per-token figure (the
    compute match of docs/design.md, BPE baseline, hinges on it); a byte model's positions are
    bytes, so a float other than 1.0 is an error too.
    """
    if bytes_per_token is None or not isinstance(bytes_per_token, (int, float)):
        if not config.is_bytes:
            raise ValueError(
                f"bytes_per_token: a token model (vocab_size {config.vocab_size}) needs its bytes "
                f"per token as a float (measured on the training split), got {bytes_per_token!r}"
            )
        return 1.0, DEFAULT_BYTES_PER_TOKEN if bytes_per_token is None else bytes_per_token
    bpt = float(bytes_per_token)
    if not (bpt > 0 and math.isfinite(bpt)):
        raise ValueError(f"bytes_per_token: expected > 0, got {bytes_per_token!r}")
    if config.is_bytes and bpt != 1.0:
        raise ValueError(f"bytes_per_token: a byte model reads 1 byte per position, got {bpt}")
    return bpt, DEFAULT_BYTES_PER_TOKEN


def _block_params(config: AUNetConfig, s: int) -> int:
    """Parameters of one transformer block at stage s (norms included)."""
    st = config.stages[s]
    d, hd, kv = st.dim, st.head_dim, config.kv_heads(s)
    attn = 2 * d * st.n_heads * hd + 2 * d * kv * hd
    return attn + 3 * d * config.ffn_hidden(d) + 2 * d


def _blocks_at(config: AUNetConfig, s: int) -> int:
    """Blocks at stage s: encoder + decoder below the trunk, ``layers[K]`` in the trunk."""
    st = config.stages[s]
    return st.layers if st.is_trunk else 2 * st.layers


def _transition_params(config: AUNetConfig, s: int) -> int:
    di, do, P = config.dimensions[s], config.dimensions[s + 1], config.upsampling_positions
    up = config.upsampling
    n = 0 if config.nonparametric else 2 * di * do + di + do  # down/up Linear + their norms
    if up.endswith("multilinear"):
        n += P * di * do + (do if config.nonparametric else 0)  # M (+ indexed_norm)
    elif up.endswith("repeat"):
        n += P * do  # pos_encoding
    return n


def num_params(config: AUNetConfig) -> int:
    """Exact ``sum(p.numel())`` of ``AUNet(config)`` (RoPE tables are buffers, not counted)."""
    K, d0 = config.num_stages, config.dimensions[0]
    n = 2 * config.vocab_size * d0 + d0  # tok_embeddings, vocab (untied), vocab_norm
    n += sum(_blocks_at(config, s) * _block_params(config, s) for s in range(K + 1))
    n += sum(_transition_params(config, s) for s in range(K))
    if config.lambda_level > 0:
        n += 2 * d0 + 2 * d0 * (K + 1)  # level_mask_norm, level_mask
    return n


def stage_lengths(
    config: AUNetConfig,
    seq_len: int,
    stage_tokens: Sequence[float] | None = None,
    bytes_per_token: Sequence[float] = DEFAULT_BYTES_PER_TOKEN,
) -> list[float]:
    """Positions run per sequence at stages 0..K.

    ``stage_tokens`` (K entries, stages 1..K) are the lengths actually run (e.g. measured, or
    ``plan.length`` of a batch) and win. Otherwise a capped stage runs min(C_s, L_{s-1}) positions
    (padding included, as ``pooling_plan`` does), and an uncapped one seq_len / bytes_per_token.
    """
    K = config.num_stages
    if stage_tokens is not None:
        if len(stage_tokens) != K:
            raise ValueError(
                f"stage_tokens: expected {K} entries (stages 1..K), got {stage_tokens}"
            )
        return [float(seq_len), *map(float, stage_tokens)]
    out = [float(seq_len)]
    for s in range(1, K + 1):
        cap = config.capacities[s]
        if cap > 0:
            out.append(float(min(cap, out[-1])))
        else:
            n = len(bytes_per_token)
            bpt = bytes_per_token[s - 1] if s <= n else bytes_per_token[-1] * 2 ** (s - n)
            out.append(min(seq_len / bpt, out[-1]))
    return out


def attention_pairs(length: float, window: int | None) -> float:
    """(query, key) pairs of causal attention with ``window`` keys per query (itself included)."""
    if window is None or window >= length:
        return length * (length + 1) / 2
    return window * (window + 1) / 2 + (length - window) * window


def flops_breakdown(
    config: AUNetConfig,
    seq_len: int,
    stage_tokens: Sequence[float] | None = None,
    *,
    bytes_per_token: Sequence[float] = DEFAULT_BYTES_PER_TOKEN,
    attention: str = "causal",
) -> dict[str, float]:
    """Training (forward + backward) FLOPs per *sequence* by part: blocks, attention, transitions,
    head (plus level_head when lambda_level > 0; it only runs when the forward gets targets)."""
    if attention not in ATTENTION_CONVENTIONS:
        raise ValueError(f"attention: expected one of {ATTENTION_CONVENTIONS}, got {attention!r}")
    L = stage_lengths(config, seq_len, stage_tokens, bytes_per_token)
    K, dims = config.num_stages, config.dimensions
    out = {"blocks": 0.0, "attention": 0.0, "transitions": 0.0, "head": 0.0, "level_head": 0.0}
    for s, st in enumerate(config.stages):
        n = _blocks_at(config, s)
        d, hd, kv = st.dim, st.head_dim, config.kv_heads(s)
        matmul_w = 2 * d * st.n_heads * hd + 2 * d * kv * hd + 3 * d * config.ffn_hidden(d)
        out["blocks"] += 6 * n * matmul_w * L[s]
        if attention == "causal":
            pairs = attention_pairs(L[s], st.sliding_window)
        else:
            pairs = L[s] ** 2 if attention == "dense" else 0.0
        out["attention"] += 12 * n * st.n_heads * hd * pairs
    for s in range(K):
        w = 6 * dims[s] * dims[s + 1]
        up = config.upsampling
        t = 0.0 if config.nonparametric else w * L[s + 1]  # trans_down
        if up == "scatter":
            t += w * L[s + 1]  # trans_up on the pooled positions, then scattered
        elif up in ("multilinear", "repeat"):
            t += w * L[s]  # trans_up after the gather to every stage-s position
        if up.endswith("multilinear"):
            t += w * L[s]  # one M[o(t)] per stage-s position
        out["transitions"] += t
    out["head"] = 6 * dims[0] * config.vocab_size * L[0]
    if config.lambda_level > 0:
        out["level_head"] = 6 * 2 * dims[0] * (K + 1) * L[0]
    return out


def flops_per_token(
    config: AUNetConfig,
    seq_len: int,
    stage_tokens: Sequence[float] | None = None,
    *,
    bytes_per_token: Sequence[float] = DEFAULT_BYTES_PER_TOKEN,
    attention: str = "causal",
) -> float:
    """Training FLOPs (forward + backward) per stage-0 position: a byte for byte models and
    AU-Nets, a token for a BPE model (``seq_len`` in tokens). ``bytes_per_token`` here is only
    the per-stage contraction of ``stage_lengths``."""
    parts = flops_breakdown(
        config, seq_len, stage_tokens, bytes_per_token=bytes_per_token, attention=attention
    )
    return sum(parts.values()) / seq_len


def flops_per_byte(
    config: AUNetConfig,
    seq_len: int,
    stage_tokens: Sequence[float] | None = None,
    *,
    bytes_per_token: BytesPerToken | None = None,
    attention: str = "causal",
) -> float:
    """Training FLOPs (forward + backward) per input byte; see the module docstring.

    = ``flops_per_token`` / bytes per token: a float ``bytes_per_token`` is a BPE model's measured
    compression (``seq_len`` then counts tokens); byte models take 1.0 (the same numbers, bit for
    bit) or None / their per-stage contraction.
    """
    per_position, contraction = split_bytes_per_token(config, bytes_per_token)
    fpt = flops_per_token(
        config, seq_len, stage_tokens, bytes_per_token=contraction, attention=attention
    )
    return fpt / per_position


# ------------------------------------------------------------------------ official estimators
# docs/flops.md (The official estimators)
def _official_layer(config: AUNetConfig, d: int) -> float:
    """Per-layer params of the official estimators: always MHA, no norms."""
    mult = config.ffn_dim_multiplier if config.ffn_dim_multiplier is not None else 1.0
    m = config.multiple_of
    ffn = math.ceil(int(int(2 * (d * 4) / 3) * mult) / m) * m
    return 4 * d * d + 3 * d * ffn


def official_param_estimate(config: AUNetConfig) -> int:
    """``HierarchicalArgs.estimated_param_count``: blocks + 2*d0*vocab, no transitions or norms."""
    d = config.dimensions
    body = sum(_blocks_at(config, s) * _official_layer(config, d[s]) for s in range(len(d)))
    return int(body + 2 * d[0] * config.vocab_size)


def official_flops_per_byte(config: AUNetConfig, seq_len: int) -> float:
    """``HierarchicalArgs.flops_per_token(seq_len)``: capacities as lengths, head counted once.

    A window of None counts as no window. The official code would drop the trunk's attention term
    for a K-entry ``sliding_windows`` (``zip`` truncation); we give the trunk the reused window,
    as the model does. Uncapped deeper stages have no official value: error.
    """
    K, d = config.num_stages, config.dimensions
    caps = config.capacities
    for s in range(1, K + 1):
        if caps[s] <= 0:
            raise ValueError(f"max_seqlens[{s}]: the official estimator needs a capacity, got -1")
    seqs = [seq_len] + caps[1:]
    lin, att = float(d[0] * config.vocab_size), 0.0
    for s, w in enumerate(config.windows):
        n, S = _blocks_at(config, s), seqs[s]
        r = S / seq_len
        w = S if w is None else min(S, w)
        lin += n * r * _official_layer(config, d[s])
        att += 6 * d[s] * S * n * (w * (2 * S - w) / S**2) * r
    return 6 * lin + att


# ------------------------------------------------------------------------ scaling laws
# BSZ = 0.66 C^0.321 and LR = 6.6 C^-0.176 are quoted from the paper; they are in neither the
# official code nor configs, and their units are UNVERIFIED (docs/flops.md, Scaling laws): we read
# C as training FLOPs (our flops_per_byte x bytes) and BSZ as bytes per optimizer step. Refit
# before trusting them.
def batch_size_bytes(C: float) -> float:
    """Bytes per optimizer step for a C-FLOP run (unverified units, see above)."""
    return 0.66 * C**0.321


def learning_rate(C: float) -> float:
    """Peak learning rate for a C-FLOP run (unverified units, see above)."""
    return 6.6 * C**-0.176


Lengths = Sequence[float] | None


def train_flops(
    config: AUNetConfig,
    seq_len: int,
    total_bytes: float,
    stage_tokens: Lengths = None,
    bytes_per_token: BytesPerToken | None = None,
) -> float:
    """C = flops_per_byte x training bytes."""
    fpb = flops_per_byte(config, seq_len, stage_tokens, bytes_per_token=bytes_per_token)
    return fpb * total_bytes


def steps_for_budget(
    config: AUNetConfig,
    seq_len: int,
    batch_sequences: int,
    flop_budget: float,
    stage_tokens: Lengths = None,
    bytes_per_token: BytesPerToken | None = None,
) -> int:
    """Whole optimizer steps of ``batch_sequences`` x ``seq_len`` positions (bytes, or a BPE
    model's tokens) that fit the budget."""
    per_position, _ = split_bytes_per_token(config, bytes_per_token)
    step_bytes = seq_len * batch_sequences * per_position
    step = train_flops(config, seq_len, step_bytes, stage_tokens, bytes_per_token)
    return int(flop_budget // step)


def scaled(template: AUNetConfig, factor: float, scale: str = "width") -> AUNetConfig:
    """Template with widths (``width``: head_dim and width ratios kept, rounded to whole KV
    groups of heads) or layer counts (``depth``) multiplied by ``factor``."""
    c = template
    if scale == "depth":
        layers = [
            max(1 if s == c.num_stages else 0, round(factor * n)) for s, n in enumerate(c.layers)
        ]
        return c.replace(layers=layers)
    if scale != "width":
        raise ValueError(f"scale: expected 'width' or 'depth', got {scale!r}")
    dims: list[int] = []
    for s, (d, hd) in enumerate(zip(c.dimensions, c.head_dims)):
        if c.nonparametric and s > 0:  # keep the integer width ratio the transitions need
            dims.append(dims[-1] * (d // c.dimensions[s - 1]))
            continue
        unit = hd * (c.n_kv_heads or 1)
        dims.append(unit * max(1, round(factor * d / unit)))
    return c.replace(dimensions=dims)


def _search(
    template: AUNetConfig, scale: str, value: Callable[[AUNetConfig], float], target: float
) -> AUNetConfig:
    """The scaled config whose (monotone in the factor) ``value`` is closest to ``target``."""
    lo, hi = 1e-3, 1.0
    while value(scaled(template, hi, scale)) < target:
        hi *= 2
        if hi > 1e6:
            raise ValueError(f"target {target:.3g} unreachable by scaling the template's {scale}")
    for _ in range(60):  # bisection on the factor; the config is a step function of it
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if value(scaled(template, mid, scale)) < target else (lo, mid)
    cands = [scaled(template, f, scale) for f in (lo, hi)]
    return min(cands, key=lambda c: abs(math.log(value(c) / target)))


def size_for_flops_per_byte(
    template: AUNetConfig,
    target: float,
    seq_len: int,
    *,
    scale: str = "width",
    stage_tokens: Lengths = None,
    bytes_per_token: BytesPerToken | None = None,
) -> AUNetConfig:
    """Scale the template's width (or depth) so flops_per_byte is as close as possible to target."""

    def fpb(c: AUNetConfig) -> float:
        return flops_per_byte(c, seq_len, stage_tokens, bytes_per_token=bytes_per_token)

    return _search(template, scale, fpb, target)


def compute_optimal(
    template: AUNetConfig,
    flop_budget: float,
    seq_len: int,
    *,
    bytes_per_param: float = DEFAULT_BYTES_PER_PARAM,
    scale: str = "width",
    stage_tokens: Lengths = None,
    bytes_per_token: BytesPerToken | None = None,
) -> dict[str, object]:
    """Size for a compute budget C under D = bytes_per_param x N (default: Chinchilla in bytes).

    Returns the config, its params, flops_per_byte, the training bytes C / flops_per_byte and the
    scaling-law batch size and learning rate at C.
    """

    def fpb(c: AUNetConfig) -> float:
        return flops_per_byte(c, seq_len, stage_tokens, bytes_per_token=bytes_per_token)

    cfg = _search(template, scale, lambda c: fpb(c) * bytes_per_param * num_params(c), flop_budget)
    return {
        "config": cfg,
        "params": num_params(cfg),
        "flops_per_byte": fpb(cfg),
        "bytes": flop_budget / fpb(cfg),
        "batch_size_bytes": batch_size_bytes(flop_budget),
        "learning_rate": learning_rate(flop_budget),
    }
