"""Model configuration: the official per-stage lists, validated once, read as per-stage records.

A config is frozen and never changed by validation; everything derived is a property. Errors name
the offending key (``model.head_dims[1]``) so a YAML typo points at its line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# Vocabulary: the official byte tokenizer's layout (docs/design.md, Vocabulary), the defaults of
# ``AUNetConfig.vocab_size/bos_id/eos_id``. No PAD id exists in the model vocab. A BPE model
# (docs/design.md, BPE baseline) carries its own ids in the config; code that runs a model reads
# the config, never these constants.
BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258

# upsampling value -> official ``pooling_type`` string (docs/design.md, Upsampling).
UPSAMPLING_TO_LINGUA = {
    "multilinear": "simple_indexed_matmul",
    "repeat": "simple_repeat",
    "scatter": "simple",
    "nonparam": "simple_non_param",
    "nonparam_repeat": "simple_non_param_repeat",
    "nonparam_multilinear": "simple_non_param_indexed_matmul",
}
UPSAMPLINGS = tuple(UPSAMPLING_TO_LINGUA)
# Attention kernel families (aunet.layers.resolve_backend; docs/performance.md).
ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "flash")
INIT_STD_FACTORS = ("disabled", "current_depth", "global_depth", "dim_ratio")

# Default splitting per number of pooling stages: words, word pairs, 4-word chunks (the paper).
DEFAULT_STRATEGIES = ({"word1": "1@1"}, {"word2": "2@1"}, {"word3": "4@1"})


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the dotted key."""


@dataclass(frozen=True)
class StageConfig:
    """One stage of the hierarchy, as read from the parallel lists (stage 0 = bytes)."""

    index: int
    dim: int
    layers: int  # blocks in the encoder and, separately, in the decoder (trunk: total)
    head_dim: int
    sliding_window: int | None  # keys per query including itself; None = full causal
    capacity: int  # max positions kept at this stage; -1 = uncapped
    is_trunk: bool

    @property
    def n_heads(self) -> int:
        return self.dim // self.head_dim


def check_tokenizer(config: AUNetConfig, tokenizer: Any, where: str) -> None:
    """Raise ValueError unless ``tokenizer`` is the vocabulary ``config`` was built for: None for
    a byte model, one with the same size and BOS/EOS ids for a BPE model."""
    if tokenizer is None:
        if not config.is_bytes:
            raise ValueError(
                f"{where}: a token model (model.vocab_size {config.vocab_size}) needs its "
                "tokenizer: without it no id can be decoded"
            )
        return
    got = (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
    want = (config.vocab_size, config.bos_id, config.eos_id)
    if got != want:
        raise ValueError(
            f"{where}: (vocab_size, bos_id, eos_id) {got} do not match the model's {want}"
        )


def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"{key}: {msg}")


@dataclass(frozen=True, kw_only=True)
class AUNetConfig:
    """AU-Net hyper-parameters with the official list layout (one entry per stage, K+1 stages).

    ``K = len(dimensions) - 1`` pooling stages; ``K = 0`` is a plain byte-level Transformer, or,
    with a ``vocab_size`` other than 258, the BPE baseline over a tokenizer's ids (docs/design.md,
    BPE baseline). Pooling needs byte positions, so only ``K = 0`` takes another vocabulary.
    """

    dimensions: list[int]
    layers: list[int]
    head_dims: list[int]
    sliding_windows: list[int | None] | None = None
    max_seqlens: list[int] | None = None  # capacity per stage; -1 = uncapped (stage 0: input)
    residuals: list[bool] | None = None  # K entries (K+1 accepted, last ignored)
    # block options, shared by every stage
    n_kv_heads: int | None = None
    rope_theta: float = 10000.0
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    init_base_std: float | None = None
    init_std_factor: str = "disabled"
    # transitions
    upsampling: str = "multilinear"
    upsampling_positions: int = 16
    lambda_level: float = 0.0
    # splitting strategy (official mapping, dict order = level); None = DEFAULT_STRATEGIES[:K]
    strategy: dict[str, str] | None = None
    # vocabulary: the byte layout by default; a BPE model's come from its tokenizer
    vocab_size: int = VOCAB_SIZE
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    seed: int = 42
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "model") -> AUNetConfig:
        """Build from a YAML ``model:`` mapping; unknown keys are errors that name the key."""
        if not isinstance(d, dict):
            raise _err(prefix, f"expected a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise _err(f"{prefix}.{unknown[0]}", f"unknown key (valid: {', '.join(sorted(names))})")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{prefix}.{e}") from None
        except TypeError as e:  # missing required keys
            raise _err(prefix, str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able mapping that ``from_dict`` reads back."""
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out

    def replace(self, **changes: Any) -> AUNetConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived
    @property
    def num_stages(self) -> int:
        """K: number of pooling transitions (splitter stages)."""
        return len(self.dimensions) - 1

    @property
    def windows(self) -> list[int | None]:
        sw = self.sliding_windows
        if sw is None:
            return [None] * (self.num_stages + 1)
        if len(sw) == self.num_stages:  # trunk reuses the last encoder's window (official)
            return list(sw) + [sw[-1]]
        return list(sw)

    @property
    def capacities(self) -> list[int]:
        if self.max_seqlens is None:
            return [-1] * (self.num_stages + 1)
        return list(self.max_seqlens)

    @property
    def skip_connections(self) -> list[bool]:
        if not self.residuals:
            return [True] * self.num_stages
        return [bool(r) for r in self.residuals[: self.num_stages]]

    @property
    def split_strategy(self) -> dict[str, str]:
        if self.strategy is not None:
            return dict(self.strategy)
        out: dict[str, str] = {}
        for s in DEFAULT_STRATEGIES[: self.num_stages]:
            out.update(s)
        return out

    @property
    def stages(self) -> list[StageConfig]:
        caps, wins, K = self.capacities, self.windows, self.num_stages
        return [
            StageConfig(
                index=i,
                dim=self.dimensions[i],
                layers=self.layers[i],
                head_dim=self.head_dims[i],
                sliding_window=wins[i],
                capacity=caps[i],
                is_trunk=i == K,
            )
            for i in range(K + 1)
        ]

    def ffn_hidden(self, dim: int) -> int:
        """SwiGLU width: int(2*4d/3), times the multiplier, rounded up to ``multiple_of``."""
        hidden = int(2 * (4 * dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def kv_heads(self, stage: int) -> int:
        return self.n_kv_heads or self.stages[stage].n_heads

    @property
    def is_bytes(self) -> bool:
        """The model reads bytes (ids 0..255, BOS/EOS above): every AU-Net and the byte baseline."""
        return (self.vocab_size, self.bos_id, self.eos_id) == (VOCAB_SIZE, BOS_ID, EOS_ID)

    @property
    def nonparametric(self) -> bool:
        return self.upsampling.startswith("nonparam")

    @property
    def pooling_type(self) -> str:
        """The official ``pooling_type`` string for this upsampling."""
        return UPSAMPLING_TO_LINGUA[self.upsampling]

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def int_list(key: str, value: Any, n: int | None, allow_none_items: bool = False) -> None:
            if not isinstance(value, (list, tuple)):
                raise _err(key, f"expected a list, got {value!r}")
            if n is not None and len(value) != n:
                raise _err(key, f"expected {n} entries (one per stage), got {len(value)}")
            for j, v in enumerate(value):
                if v is None and allow_none_items:
                    continue
                if isinstance(v, bool) or not isinstance(v, int):
                    raise _err(f"{key}[{j}]", f"expected int, got {v!r}")

        int_list("dimensions", self.dimensions, None)
        n = len(self.dimensions)
        if n < 1:
            raise _err("dimensions", "needs at least one stage")
        K = n - 1
        int_list("layers", self.layers, n)
        int_list("head_dims", self.head_dims, n)
        for j in range(n):
            d, h, L = self.dimensions[j], self.head_dims[j], self.layers[j]
            if d < 1:
                raise _err(f"dimensions[{j}]", f"expected >= 1, got {d}")
            min_layers = 1 if j == K else 0
            if min_layers > L:
                raise _err(f"layers[{j}]", f"expected >= {min_layers}, got {L}")
            if h < 1 or d % h:
                raise _err(f"head_dims[{j}]", f"head_dim {h} must divide dimensions[{j}]={d}")
            if (h % 2) != 0:
                raise _err(f"head_dims[{j}]", f"head_dim must be even for RoPE, got {h}")
        if self.sliding_windows is not None:
            sw = self.sliding_windows
            if not isinstance(sw, (list, tuple)) or len(sw) not in (n, max(K, 1)):
                raise _err("sliding_windows", f"expected {n} entries (or {K}), got {sw!r}")
            int_list("sliding_windows", sw, None, allow_none_items=True)
            for j, w in enumerate(sw):
                if w is not None and w < 1:
                    raise _err(f"sliding_windows[{j}]", f"expected >= 1 or null, got {w}")
        if self.max_seqlens is not None:
            int_list("max_seqlens", self.max_seqlens, n)
            for j, c in enumerate(self.max_seqlens):
                if c != -1 and c < 1:
                    raise _err(f"max_seqlens[{j}]", f"expected >= 1 or -1 (uncapped), got {c}")
        if self.residuals is not None and len(self.residuals) > 0:
            r = self.residuals
            if not isinstance(r, (list, tuple)) or len(r) not in (K, K + 1):
                got = len(r) if isinstance(r, (list, tuple)) else r
                raise _err(
                    "residuals",
                    f"expected {K} entries (one per transition; {K + 1}, the README form, is "
                    f"accepted with the last ignored), got {got}",
                )
        if self.n_kv_heads is not None:
            for j in range(n):
                nh = self.dimensions[j] // self.head_dims[j]
                if self.n_kv_heads < 1 or nh % self.n_kv_heads:
                    raise _err(
                        "n_kv_heads", f"{self.n_kv_heads} must divide n_heads={nh} of stage {j}"
                    )
        if self.upsampling not in UPSAMPLINGS:
            valid = ", ".join(UPSAMPLINGS)
            raise _err("upsampling", f"unknown {self.upsampling!r} (valid: {valid})")
        if self.nonparametric:
            for j in range(K):
                if self.dimensions[j + 1] % self.dimensions[j]:
                    raise _err(
                        f"dimensions[{j + 1}]",
                        f"non-parametric transitions need dimensions[{j + 1}] to be a multiple "
                        f"of dimensions[{j}] ({self.dimensions[j + 1]} vs {self.dimensions[j]})",
                    )
        if self.upsampling_positions < 1:
            raise _err("upsampling_positions", f"expected >= 1, got {self.upsampling_positions}")
        if self.init_std_factor not in INIT_STD_FACTORS:
            raise _err(
                "init_std_factor",
                f"unknown {self.init_std_factor!r} (valid: {', '.join(INIT_STD_FACTORS)})",
            )
        if not (self.lambda_level >= 0 and math.isfinite(self.lambda_level)):
            raise _err("lambda_level", f"expected >= 0, got {self.lambda_level}")
        if self.multiple_of < 1:
            raise _err("multiple_of", f"expected >= 1, got {self.multiple_of}")
        if self.norm_eps <= 0:
            raise _err("norm_eps", f"expected > 0, got {self.norm_eps}")
        if self.strategy is not None:
            if not isinstance(self.strategy, dict):
                raise _err("strategy", f"expected a mapping name -> 'N@M', got {self.strategy!r}")
            if len(self.strategy) != K:
                raise _err(
                    "strategy",
                    f"expected {K} entries (one per pooling stage), got {len(self.strategy)}",
                )
        for key in ("vocab_size", "bos_id", "eos_id"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int):
                raise _err(key, f"expected int, got {v!r}")
        if self.vocab_size < 257:
            raise _err(
                "vocab_size", f"expected >= 257 (256 bytes + specials), got {self.vocab_size}"
            )
        for key in ("bos_id", "eos_id"):
            v = getattr(self, key)
            if not 256 <= v < self.vocab_size:
                raise _err(key, f"expected in [256, vocab_size={self.vocab_size}), got {v}")
        if self.vocab_size != VOCAB_SIZE and (K > 0 or self.strategy):
            raise _err(
                "vocab_size",
                f"{self.vocab_size} != {VOCAB_SIZE} (bytes) needs a 1-stage model (one entry in "
                f"dimensions, no strategy): pooling splits bytes, not tokens; got {K} pooling "
                "stages",
            )
