"""Transformer building blocks: RMSNorm, interleaved RoPE, SwiGLU, sliding-window causal attention.

Module and parameter names follow the official lingua layout (``attention.wq``, ``feed_forward.w1``,
``attention_norm`` ...), so official checkpoints map onto ours key for key.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from aunet.config import ATTENTION_BACKENDS

log = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back (matches the official numerics)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        xf = x.float()
        out = xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


# ---------------------------------------------------------------------------------------- RoPE
@functools.lru_cache(maxsize=64)
def _rope_freqs(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    # (head_dim/2,) float32: theta^(-2k/head_dim)
    exps = torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim
    return 1.0 / (theta**exps)


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for stage-local integer positions.

    positions (L,) or (B, L) int64 -> cos, sin of shape positions.shape + (head_dim/2,), float32.
    """
    freqs = _rope_freqs(head_dim, float(theta), positions.device)
    angles = positions.float().unsqueeze(-1) * freqs
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2k], x[2k+1]) by the position angle, in float32.

    x (B, L, H, Dh); cos/sin (L, Dh/2) or (B, L, Dh/2). Returns x's dtype.
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, L, H, Dh/2, 2)
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


# ---------------------------------------------------------------------------------------- attention


@functools.lru_cache(maxsize=1)
def _flash_attn_func():  # noqa: ANN202 - optional kernel, imported lazily in one place
    try:
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]

        return flash_attn_func
    except Exception as e:  # pragma: no cover - CUDA only
        log.info("flash-attn unavailable (%s)", e)
        return None


@functools.lru_cache(maxsize=1)
def _flex():  # noqa: ANN202 - (flex_attention, create_block_mask) or None on old torch
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        return flex_attention, create_block_mask
    except Exception as e:  # pragma: no cover - torch < 2.5
        log.info("FlexAttention unavailable (%s)", e)
        return None


@functools.lru_cache(maxsize=1)
def _compiled_flex():  # noqa: ANN202 - one compiled kernel, shapes specialise inside dynamo
    return torch.compile(_flex()[0], dynamic=False)


@functools.lru_cache(maxsize=64)
def _window_block_mask(length: int, window: int, device: str):  # noqa: ANN202 - BlockMask
    """Sliding-window causal BlockMask for self-attention over ``length`` positions, built once
    per (length, window, device): building it costs a pass over all (q, k) blocks."""

    def allowed(b, h, q, k):  # noqa: ANN001, ANN202 - flex mask_mod signature
        return (k <= q) & (k > q - window)

    return _flex()[1](allowed, None, None, length, length, device=device)


def resolve_backend(
    requested: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16
) -> str:
    """The kernel family ``attention`` uses for sliding-window self-attention.

    ``auto``: flash-attn on CUDA in half precision when importable, else FlexAttention on CUDA
    (compiled, one block mask per shape), else SDPA with masks (every CPU run: Flex's unfused CPU
    path materialises all L^2 scores, slower than the blocked SDPA path). Explicit names are
    honoured where they can run; ``flash`` without flash-attn is an error. Full causal attention
    always goes through SDPA (its flash kernel on GPU). Logged by the training pipeline.
    """
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention: expected one of {ATTENTION_BACKENDS}, got {requested!r}")
    cuda = torch.device(device).type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == "flash":
        if _flash_attn_func() is None:
            raise RuntimeError("attention backend 'flash' requested; flash-attn is not importable")
        return "flash"
    if requested == "flex":
        if _flex() is None:
            raise RuntimeError(
                "attention backend 'flex' requested; this torch has no FlexAttention"
            )
        return "flex"
    if requested == "auto" and cuda:
        if half and _flash_attn_func() is not None:
            return "flash"
        if _flex() is not None:
            return "flex"
    return "sdpa"


@torch.compiler.disable  # a compiled block calls the separately compiled kernel (graph break)
def _flex_window(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding-window causal self-attention through FlexAttention: (B, H, L, Dh) -> same.

    Compiled on CUDA (the fused kernel skips blocks outside the band); eager elsewhere, where it is
    the reference path the CPU tests compare against the masked SDPA and a float64 naive loop.
    """
    L = qt.shape[2]
    mask = _window_block_mask(L, window, str(qt.device))
    if qt.is_cuda:
        with torch.autocast("cuda", enabled=False):  # inputs already in the compute dtype
            return _compiled_flex()(qt, kt, vt, block_mask=mask)
    with warnings.catch_warnings():  # the unfused-path notice: intended here
        warnings.simplefilter("ignore")
        return _flex()[0](qt, kt, vt, block_mask=mask)


def window_mask(
    num_q: int, num_k: int, window: int | None, device: torch.device, q_offset: int | None = None
) -> torch.Tensor:
    """Boolean (num_q, num_k) mask: True where query may attend key.

    Query i sits at absolute position ``q_offset + i`` (default: the last num_q of num_k keys). It
    sees keys k with ``pos - window < k <= pos``: ``window`` keys including itself (training
    semantics of the official model; None = plain causal).
    """
    if q_offset is None:
        q_offset = num_k - num_q
    q = torch.arange(num_q, device=device).unsqueeze(1) + q_offset
    k = torch.arange(num_k, device=device).unsqueeze(0)
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    backend: str = "auto",
    q_offset: int | None = None,
) -> torch.Tensor:
    """Causal (optionally sliding-window) attention behind one function.

    q (B, Lq, H, Dh), k/v (B, Lk, H, Dh) with heads already repeated for GQA; the queries are the
    last Lq positions of the Lk keys unless ``q_offset`` says otherwise. Returns (B, Lq, H, Dh).
    ``backend`` is resolved by ``resolve_backend`` (auto | sdpa | flex | flash). flash-attn and
    Flex serve sliding-window self-attention (Lq == Lk, no offset) only; everything else (full
    causal, decoding with a cache) goes through SDPA.
    """
    Lq, Lk = q.shape[1], k.shape[1]
    chosen = resolve_backend(backend, q.device, q.dtype) if backend == "auto" else backend
    full_causal = window is None or window >= Lk
    self_attn = Lq == Lk and q_offset in (None, 0)
    if chosen == "flash":  # on CPU or in fp32 it falls through to SDPA, as flash-attn cannot run
        fn = _flash_attn_func()
        if fn is None:
            raise RuntimeError("attention backend 'flash' requested; flash-attn is not importable")
        half = q.dtype in (torch.float16, torch.bfloat16)
        if q.is_cuda and half and (q_offset is None or q_offset == Lk - Lq):
            ws = (window - 1, 0) if window is not None else (-1, -1)
            return fn(q, k, v, causal=True, window_size=ws)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
    if chosen == "flex" and self_attn and not full_causal:
        out = _flex_window(qt, kt, vt, window)
    elif full_causal and self_attn:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    elif full_causal and Lq == 1 and (q_offset is None or q_offset == Lk - 1):
        out = F.scaled_dot_product_attention(qt, kt, vt)
    elif self_attn and Lk >= max(4 * window, LOCAL_MIN_LEN):
        out = _local_attention(qt, kt, vt, window)
    else:
        mask = window_mask(Lq, Lk, window, q.device, q_offset)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)


# Below this length the dense masked kernel costs about the same, and keeps the op order of the
# official implementation (its golden fixtures match to 0.0; the blocked path to ~2e-5 in fp32).
LOCAL_MIN_LEN = 1024


def _local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int) -> torch.Tensor:
    """Sliding-window causal self-attention in blocks of w queries: O(L*w), not O(L^2).

    q/k/v (B, H, L, Dh) -> (B, H, L, Dh). A dense SDPA under a window mask computes all L^2 scores
    (4x the useful work at L=2048, w=256); here block i attends only the keys of blocks i-1 and
    i under one shared (w, 2w) band mask, and the first block is plain causal.
    """
    B, H, L, D = q.shape
    n = -(-L // w)
    pad = n * w - L  # padded keys sit after every real query, so no real query sees them
    qp, kp, vp = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    first = F.scaled_dot_product_attention(qp[:, :, :w], kp[:, :, :w], vp[:, :, :w], is_causal=True)

    def pairs(t: torch.Tensor) -> torch.Tensor:  # (B, H, n*w, D) -> (B, H*(n-1), 2w, D)
        prev = t[:, :, :-w].reshape(B, H, n - 1, w, D)
        cur = t[:, :, w:].reshape(B, H, n - 1, w, D)
        return torch.cat([prev, cur], dim=3).reshape(B, H * (n - 1), 2 * w, D)

    j = torch.arange(w, device=q.device).unsqueeze(1)
    m = torch.arange(2 * w, device=q.device).unsqueeze(0)
    band = (m > j) & (m <= j + w)  # key w+j is the query itself: w keys including it
    qb = qp[:, :, w:].reshape(B, H * (n - 1), w, D)
    rest = F.scaled_dot_product_attention(qb, pairs(kp), pairs(vp), attn_mask=band)
    return torch.cat([first, rest.reshape(B, H, (n - 1) * w, D)], dim=2)[:, :, :L]


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.head_dim, self.n_heads, self.n_kv_heads = head_dim, n_heads, n_kv_heads
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, D) -> rotated q (B, L, H, Dh), rotated k and v (B, L, KV, Dh)."""
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, L, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, L, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: int | None,
        backend: str = "auto",
        q_offset: int | None = None,
    ) -> torch.Tensor:
        """q (B, Lq, H, Dh), k/v (B, Lk, KV, Dh) -> (B, Lq, D) after the output projection."""
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        out = attention(q, k, v, window, backend, q_offset)
        return self.wo(out.flatten(2))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        window: int | None,
        backend: str = "auto",
    ) -> torch.Tensor:  # (B, L, D) -> (B, L, D)
        q, k, v = self.qkv(x, cos, sin)
        return self.attend(q, k, v, window, backend)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + Attn(norm(x)); out = h + FFN(norm(h)). No biases, no dropout."""

    def __init__(
        self, dim: int, head_dim: int, n_kv_heads: int, hidden: int, norm_eps: float
    ) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = Attention(dim, head_dim, dim // head_dim, n_kv_heads)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = FeedForward(dim, hidden)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        window: int | None,
        backend: str = "auto",
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, window, backend)
        return h + self.feed_forward(self.ffn_norm(h))


def trunc_normal_(w: torch.Tensor, std: float, bound: float | None = None) -> None:
    """N(0, std) truncated at +-bound (default 3*std), the official init draw."""
    bound = 3 * std if bound is None else bound
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-bound, b=bound)


class CausalTransformer(nn.Module):
    """A stack of blocks for one stage (an encoder, a decoder or the trunk); no final norm."""

    def __init__(
        self,
        n_layers: int,
        dim: int,
        head_dim: int,
        n_kv_heads: int,
        hidden: int,
        norm_eps: float,
        window: int | None,
        rope_theta: float,
    ) -> None:
        super().__init__()
        self.dim, self.head_dim, self.window, self.rope_theta = dim, head_dim, window, rope_theta
        self.layers = nn.ModuleList(
            TransformerBlock(dim, head_dim, n_kv_heads, hidden, norm_eps) for _ in range(n_layers)
        )

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(positions, self.head_dim, self.rope_theta)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """x (B, L, D) at stage-local positions 0..L-1 -> (B, L, D)."""
        if len(self.layers) == 0:
            return x
        cos, sin = self.rope(torch.arange(x.shape[1], device=x.device))
        for layer in self.layers:
            x = layer(x, cos, sin, self.window, backend)
        return x

    def init_weights(self, base_std: float | None, factor_kind: str) -> None:
        """Official init: sigma = fan_in^-0.5; output projections / a depth factor.

        See docs/design.md (Blocks and initialisation).
        """
        n = len(self.layers)
        for depth, layer in enumerate(self.layers):
            f = {
                "disabled": 1.0,
                "current_depth": math.sqrt(2 * (depth + 1)),
                "global_depth": math.sqrt(2 * (n + 1)),
                "dim_ratio": self.dim / 4096,
            }[factor_kind]
            std = base_std or self.dim**-0.5
            att, ffn = layer.attention, layer.feed_forward
            for w in (att.wq, att.wk, att.wv):
                trunc_normal_(w.weight, std)
            trunc_normal_(att.wo.weight, std / f, bound=3 * std)  # bounds not divided (official)
            trunc_normal_(ffn.w1.weight, std)
            trunc_normal_(ffn.w3.weight, std)
            out_std = (base_std or ffn.w2.weight.shape[1] ** -0.5) / f
            trunc_normal_(ffn.w2.weight, out_std)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
