"""Entropy-driven boundaries (the ``entropy`` split strategy): a hashed order-k byte n-gram model
scores each byte by the entropy of the byte that follows it, and a stage-s boundary goes on every
codepoint whose last byte scores at or above the stage's threshold (docs/design.md, Splitting:
entropy-driven boundaries).

Why an n-gram model and not a small AU-Net: the score must be cheap inside every preprocessing
task, exactly reproducible across machines and runs, and small enough to travel inside the
strategy value itself (JSON text in the spec, the manifest, checkpoints and Ray task arguments),
with no pickle and no side file. A table of ``buckets`` quantized entropies (uint8, 1/16 bit) is
that: 4 KB by default, base64 inside the value, checked by its sha256 on load.

Prefix-stable by construction: the score of byte i reads bytes i-k+1..i only (positions before
the text, or at or before a 0xFF byte, read as 0xFF: 0xFF is never UTF-8, and the batch splitter
joins documents with it, so every document restarts its context exactly as on its own), and
whether byte i ends a codepoint depends on bytes <= i. So the last byte's level is determined by
its last ``max(k, 4)`` bytes (``lookback``). Linear: a few numpy passes over the bytes.

Stage values: resolved ``"t=3.5 order=3 model=<base64> sha256=<16 hex>"`` (t: threshold in bits,
a multiple of 1/16), or, before preprocessing fits the model, targets ``"rate=0.2"`` (boundaries
per byte) or ``"contraction=5"`` (bytes per stage position, 1/rate) or ``"t=3.5"``, with optional
``order=K`` (1-7) and ``buckets=B`` (a power of two, 256-65536) for the fit. Unresolved values
are refused by the splitter with a message saying preprocessing resolves them.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

UNITS = 16  # quantization: entropies are stored in 1/16 bit
PAD = 0xFF  # what a context reads before the text and at or before a 0xFF byte
DEFAULT_ORDER, DEFAULT_BUCKETS, ALPHA = 3, 4096, 0.5
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing multiplier (Knuth)
_FIT_KEYS = ("order", "buckets")
_TARGET_KEYS = ("rate", "contraction", "t")


class EntropyStrategyError(ValueError):
    """A malformed or unresolved entropy stage value (names the key)."""


@dataclass(frozen=True)
class EntropyModel:
    """Next-byte entropy per hashed order-``order`` context: ``table[bucket]`` in 1/16 bit."""

    order: int
    table: bytes  # uint8 per bucket; len is a power of two

    @property
    def buckets(self) -> int:
        return len(self.table)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(bytes([self.order]) + self.table).hexdigest()[:16]

    def encode(self) -> str:
        """The ``model=`` payload: base64 of the zlib-compressed table."""
        return base64.b64encode(zlib.compress(self.table, 9)).decode("ascii")

    @classmethod
    def decode(cls, key: str, order: int, payload: str, sha: str) -> EntropyModel:
        try:
            table = zlib.decompress(base64.b64decode(payload.encode("ascii"), validate=True))
        except (ValueError, zlib.error) as e:
            raise EntropyStrategyError(
                f"strategy {key!r}: model= is not base64 zlib: {e}"
            ) from None
        model = cls(order, table)
        if model.sha256 != sha:
            raise EntropyStrategyError(
                f"strategy {key!r}: model sha256 {model.sha256} != sha256={sha} (damaged value)"
            )
        _check_shape(key, order, len(table))
        return model

    def scores(self, raw: np.ndarray) -> np.ndarray:
        """Entropy (1/16 bit) of the byte after each byte; raw: uint8 (n,) -> uint8 (n,)."""
        lut = np.frombuffer(self.table, np.uint8)
        return lut[context_buckets(raw, self.order, self.buckets)]


def _check_shape(key: str, order: int, buckets: int) -> None:
    if not 1 <= order <= 7:
        raise EntropyStrategyError(f"strategy {key!r}: order={order} must be in 1..7")
    if not (256 <= buckets <= 65536 and buckets & (buckets - 1) == 0):
        raise EntropyStrategyError(
            f"strategy {key!r}: buckets={buckets} must be a power of two in 256..65536"
        )


def context_buckets(raw: np.ndarray, order: int, buckets: int) -> np.ndarray:
    """Bucket of the context ending at each byte (bytes i-order+1..i), int64 shape (n,).

    Bytes before the text or at or before the latest 0xFF read as 0xFF (module docstring)."""
    raw = np.asarray(raw, np.uint8)
    n = len(raw)
    idx = np.arange(n)
    last_pad = np.maximum.accumulate(np.where(raw == PAD, idx, -1)) if n else idx
    ctx = raw.astype(np.uint64)
    for j in range(1, order):
        back = np.full(n, PAD, np.uint64)
        back[j:] = raw[:-j]
        back[idx - j <= last_pad] = PAD
        ctx |= back << np.uint64(8 * j)
    shift = np.uint64(64 - (buckets.bit_length() - 1))
    return ((ctx + np.uint64(1)) * _GOLDEN >> shift).astype(np.int64)


def codepoint_ends(data: bytes) -> np.ndarray:
    """True on the last byte of each valid UTF-8 codepoint (bytes of invalid sequences: False);
    bool shape (len(data),). Depends on bytes <= i only (UTF-8 lead bytes give the length)."""
    raw = np.frombuffer(data, np.uint8)
    out = np.zeros(len(raw), bool)
    if not len(raw):
        return out
    if not (raw >= 0x80).any():
        return ~out
    text = data.decode("utf-8", "surrogateescape")
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32).astype(np.int64)
    escape = (cps >= 0xDC80) & (cps < 0xDD00)
    width = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000) - 2 * escape
    last = np.cumsum(width) - 1
    out[last[~escape]] = True
    return out


def fit(
    documents: Iterable[bytes], order: int = DEFAULT_ORDER, buckets: int = DEFAULT_BUCKETS
) -> EntropyModel:
    """Count next bytes per context bucket over ``documents``; table = add-alpha entropy.

    Deterministic: integer counts, then one float64 pass; the order of documents does not matter.
    """
    _check_shape("entropy", order, buckets)
    counts = np.zeros(buckets * 256, np.int64)
    for doc in documents:
        raw = np.frombuffer(doc, np.uint8)
        if len(raw) < 2:
            continue
        b = context_buckets(raw, order, buckets)[:-1]
        counts += np.bincount(b * 256 + raw[1:], minlength=buckets * 256)
    return EntropyModel(order, entropy_table(counts.reshape(buckets, 256)))


def entropy_table(counts: np.ndarray) -> bytes:
    """uint8 entropy in 1/16 bit per row of next-byte counts (int shape (B, 256)), add-alpha."""
    p = (counts + ALPHA) / (counts.sum(1, keepdims=True) + 256 * ALPHA)
    h = -(p * np.log2(p)).sum(1)
    return np.clip(np.rint(h * UNITS), 0, 255).astype(np.uint8).tobytes()


@dataclass(frozen=True)
class EntropyStage:
    """A resolved stage: boundary where ``score >= units`` on a codepoint's last byte."""

    model: EntropyModel
    units: int  # threshold in 1/16 bit

    @property
    def lookback(self) -> int:
        return max(self.model.order, 4)


def parse_options(key: str, value: str) -> dict[str, str]:
    """``"a=1 b=2"`` -> dict; unknown or repeated names refused."""
    known = (*_FIT_KEYS, *_TARGET_KEYS, "model", "sha256")
    out: dict[str, str] = {}
    for option in str(value).split():
        name, eq, v = option.partition("=")
        if not eq or name not in known or name in out:
            raise EntropyStrategyError(
                f"strategy {key!r}: option {option!r} is not one of {', '.join(known)} as "
                "name=value (each once)"
            )
        out[name] = v
    return out


def _number(key: str, name: str, text: str, kind: type = float):
    try:
        return kind(text)
    except ValueError:
        raise EntropyStrategyError(f"strategy {key!r}: {name}={text!r} is not a number") from None


def parse_stage(key: str, value: str) -> EntropyStage:
    """A resolved value -> EntropyStage; an unresolved one raises (preprocessing resolves it)."""
    opts = parse_options(key, value)
    if "model" not in opts or "t" not in opts:
        raise EntropyStrategyError(
            f"strategy {key!r}: value {value!r} is not resolved: preprocessing fits the entropy "
            "model on the training split and turns rate=/contraction= into t=... model=...; "
            "use the dataset manifest's resolved_strategy"
        )
    order = _number(key, "order", opts.get("order", str(DEFAULT_ORDER)), int)
    t = _number(key, "t", opts["t"])
    if not np.isfinite(t) or t * UNITS != round(t * UNITS) or not 0 <= t * UNITS <= 255:
        raise EntropyStrategyError(f"strategy {key!r}: t={t} must be a multiple of 1/16 in 0..15.9")
    model = EntropyModel.decode(key, order, opts["model"], opts.get("sha256", ""))
    return EntropyStage(model, int(round(t * UNITS)))


def abbreviate(text: str) -> str:
    """``text`` with every ``model=<payload>`` shortened to ``model=...`` (for logs and params;
    the ``sha256=`` beside it still names the model)."""
    return re.sub(r"model=[A-Za-z0-9+/=]+", "model=...", text)


def stage_where(stage: EntropyStage, raw: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Byte indices that get a boundary: codepoint ends scoring at or above the threshold."""
    return np.flatnonzero(ends & (stage.model.scores(raw) >= stage.units))


# ----------------------------------------------------------------------- resolving targets
def resolve(strategy: dict[str, str], documents: list[bytes]) -> tuple[dict[str, str], dict]:
    """Fit one model for all ``entropy`` stages on ``documents`` (the training split) and turn
    their targets into thresholds; returns (resolved strategy, report for the manifest).

    A ``rate=r`` target takes the threshold whose boundary rate on ``documents`` (codepoint ends
    scoring at or above it, per byte) is closest to r. Thresholds must not decrease from stage to
    stage, so a higher stage's boundaries are a subset of a lower one's (stages nest)."""
    keys = [k for k in strategy if k.startswith("entropy")]
    if not keys:
        return dict(strategy), {}
    opts = {k: parse_options(k, strategy[k]) for k in keys}
    fit_args: dict[str, int] = {}
    for k in keys:
        for name in _FIT_KEYS:
            if name in opts[k]:
                v = _number(k, name, opts[k][name], int)
                if fit_args.setdefault(name, v) != v:
                    raise EntropyStrategyError(
                        f"strategy {k!r}: {name}={v} differs from another entropy stage's "
                        f"{fit_args[name]} (all entropy stages share one model)"
                    )
    model = fit(
        documents, fit_args.get("order", DEFAULT_ORDER), fit_args.get("buckets", DEFAULT_BUCKETS)
    )
    hist, total = score_histogram(model, documents)
    # rate of boundaries per byte for every threshold u: ends scoring >= u
    rate_at = np.cumsum(hist[::-1])[::-1] / max(total, 1)
    resolved, report = dict(strategy), {"model_sha256": model.sha256, "fit_bytes": int(total)}
    report.update(order=model.order, buckets=model.buckets, stages={})
    previous = 0
    for k in keys:
        o = opts[k]
        targets = [n for n in _TARGET_KEYS if n in o]
        if len(targets) != 1:
            raise EntropyStrategyError(
                f"strategy {k!r}: give exactly one of rate=, contraction=, t= (got {targets})"
            )
        v = _number(k, targets[0], o[targets[0]])
        if targets[0] == "t":
            units = int(round(v * UNITS))
        else:
            rate = v if targets[0] == "rate" else (1 / v if v > 0 else -1.0)
            if not 0 < rate <= 1:
                raise EntropyStrategyError(
                    f"strategy {k!r}: {targets[0]}={o[targets[0]]} must give a rate in (0, 1]"
                )
            units = int(np.argmin(np.abs(rate_at - rate)))
        if units < previous:
            raise EntropyStrategyError(
                f"strategy {k!r}: threshold {units / UNITS} bits is below the previous entropy "
                f"stage's {previous / UNITS}: stages must nest (lower rates at higher stages)"
            )
        previous = units
        resolved[k] = (
            f"t={units / UNITS:g} order={model.order} model={model.encode()} sha256={model.sha256}"
        )
        report["stages"][k] = {
            "target": f"{targets[0]}={o[targets[0]]}",
            "threshold_bits": units / UNITS,
            "fit_rate": float(rate_at[units]) if units < len(rate_at) else 0.0,
        }
    return resolved, report


def score_histogram(model: EntropyModel, documents: Iterable[bytes]) -> tuple[np.ndarray, int]:
    """Counts of each quantized score over codepoint ends (int64 (256,)), and the byte total."""
    hist, total = np.zeros(256, np.int64), 0
    for doc in documents:
        raw = np.frombuffer(doc, np.uint8)
        ends = codepoint_ends(doc)
        hist += np.bincount(model.scores(raw)[ends], minlength=256)
        total += len(raw)
    return hist, total
