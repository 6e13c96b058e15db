"""Experiment specs: the one YAML reader, and the one vocabulary of dotted keys.

A spec is validated completely at load time so that a typo fails in the driver, naming the file
and the dotted key, before Ray starts. The same dotted keys serve YAML, ``--set`` overrides, Tune
search spaces (``ExperimentSpec.with_overrides``) and MLflow params (``flatten``). Relative paths
are made absolute against the current working directory at load, because Ray workers run in
another directory (docs/platform.md, Paths).

Length: the sections are declared together so that ``--help``, overrides and the dataset hash
read one vocabulary; the ``tokenizer:`` section (the BPE baseline, docs/data.md, Token-id
datasets) took it past 420 lines, and splitting declarations from the spec would only move the
same lines into a second module both halves import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aunet.config import ATTENTION_BACKENDS, AUNetConfig, ConfigError
from pipelines import schema
from pipelines.paths import absolute_path, is_uri, join_path, redact, resolve_tracking_uri
from pipelines.schema import (
    AT_LEAST_1,
    NAME,
    NONEMPTY,
    NONNEG,
    POSITIVE,
    Rule,
    SpecError,
    apply_overrides,
    at_least,
    choice,
    parse_cli,
    parse_overrides,
    read_with_section,
    read_yaml_mapping,
    set_dotted,
    setting,
    split_overrides,
)

# Names other modules import from here; the engine itself is pipelines.schema.
__all__ = [
    "DataConfig",
    "ExperimentSpec",
    "ResourcesConfig",
    "SourceConfig",
    "SpecError",
    "TrackingConfig",
    "TokenizerConfig",
    "TrainConfig",
    "apply_overrides",
    "flatten",
    "help_text",
    "load_spec",
    "parse_cli",
    "parse_overrides",
    "read_with_section",
    "read_yaml_mapping",
    "set_dotted",
    "spec_hash",
    "split_overrides",
]

FORMATS = ("auto", "txt", "jsonl", "parquet")
DTYPES = ("auto", "float32", "bfloat16")
AcPolicy = Literal["none", "blocks", "selective"]  # aunet.memory.AC_POLICIES
# Longest suffix first: ".jsonl.gz" must not be read as unknown ".gz".
EXTENSIONS = {
    ".jsonl.gz": "jsonl",
    ".jsonl.zst": "jsonl",
    ".jsonl": "jsonl",
    ".txt": "txt",
    ".parquet": "parquet",
}


# ---------------------------------------------------------------------------------- sections
TOKENIZER_PATTERNS = ("gpt2", "llama3")  # aunet.tokenizer.PATTERNS (its regexes)


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One input file or glob, with its sampling weight (the official ``sources: {name: w}``)."""

    path: str = setting(rule=NONEMPTY, doc="file or glob; relative to the current directory")
    weight: float = setting(1.0, rule=POSITIVE, doc="sampling weight among the sources")
    format: str = setting("auto", rule=choice(FORMATS), doc="auto: from the file extension")
    text_field: str = setting("text", rule=NONEMPTY, doc="record field holding the text")
    id_field: str | None = setting(None, doc="record field holding a document id")
    lang_field: str | None = setting(None, doc="record field holding the language (per-group bpb)")

    def __post_init__(self) -> None:
        if self.format == "auto" and _format_of(self.path) is None:
            known = ", ".join(EXTENSIONS)
            raise SpecError(f"format: cannot infer from {self.path!r} (known: {known}); set it")

    @property
    def resolved_format(self) -> str:
        """``txt``, ``jsonl`` or ``parquet``: ``format``, or from the extension when ``auto``."""
        return self.format if self.format != "auto" else typing.cast(str, _format_of(self.path))


def _format_of(path: str) -> str | None:
    name = path.lower()
    return next((fmt for ext, fmt in EXTENSIONS.items() if name.endswith(ext)), None)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    sources: list[SourceConfig] = setting(doc="a path, a list of paths or sources, or {glob: w}")
    seq_len: int = setting(8192, rule=at_least(2), doc="bytes per training window")
    val_fraction: float = setting(
        0.01, rule=Rule(lambda v: 0 <= v < 1, "in [0, 1)"), doc="documents held out for validation"
    )
    seed: int = setting(0, rule=NONNEG, doc="seed of the train/validation split")
    dataset_dir: str | None = setting(
        None, rule=NONEMPTY, doc="null: <storage_path>/datasets/<name>-<hash>"
    )
    max_documents: int | None = setting(None, rule=AT_LEAST_1, doc="read at most this many")
    shard_sequences: int = setting(1024, rule=AT_LEAST_1, doc="windows per parquet shard")
    unit_bytes: int = setting(
        64 << 20, rule=AT_LEAST_1, doc="input bytes per preprocessing task (windows stop at units)"
    )
    progress_every: int = setting(10, rule=AT_LEAST_1, doc="units between progress lines")

    def __post_init__(self) -> None:
        if not self.sources:
            raise SpecError("sources: expected at least one source")

    @staticmethod
    def normalize(raw: Mapping[str, Any]) -> dict[str, Any]:
        """Accept ``sources`` as a list, a mapping ``{glob: weight}`` or a single path."""
        raw = dict(raw)
        src = raw.get("sources")
        if isinstance(src, str):
            raw["sources"] = [{"path": src}]
        elif isinstance(src, Mapping):
            raw["sources"] = [{"path": p, "weight": w} for p, w in src.items()]
        elif isinstance(src, list):
            raw["sources"] = [{"path": s} if isinstance(s, str) else s for s in src]
        return raw


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """A byte-level BPE over the training split (aunet/tokenizer.py): the paper's BPE baseline.
    Absent (null): the dataset holds bytes, as before."""

    vocab_size: int | None = setting(
        None,
        rule=Rule(lambda v: 260 <= v <= 2**20, "in [260, 2**20]"),
        doc="ids incl. 256 bytes + BOS/EOS/PAD; null: the file's (needs path)",
    )
    pattern: str = setting("gpt2", rule=choice(TOKENIZER_PATTERNS), doc="pre-tokenizer regex")
    path: str | None = setting(
        None, rule=NONEMPTY, doc="an existing tokenizer.json instead of training one"
    )

    def __post_init__(self) -> None:
        if self.vocab_size is None and self.path is None:
            raise SpecError("vocab_size: set tokenizer.vocab_size (or tokenizer.path)")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int | None = setting(None, rule=AT_LEAST_1, doc="optimizer steps (or flop_budget)")
    flop_budget: float | None = setting(
        None, rule=POSITIVE, doc="training FLOPs; steps follow from it (or steps)"
    )
    batch_size: int | None = setting(
        None, rule=AT_LEAST_1, doc="sequences per step, all workers; null: the paper's law"
    )
    lr: float | None = setting(None, rule=POSITIVE, doc="peak learning rate; null: the paper's law")
    warmup: float = setting(0.1, rule=NONNEG, doc="fraction of steps (< 1) or steps (>= 1)")
    lr_min_ratio: float = setting(
        0.01, rule=Rule(lambda v: 0 <= v <= 1, "in [0, 1]"), doc="final lr / peak lr (cosine)"
    )
    weight_decay: float = setting(0.1, rule=NONNEG, doc="AdamW weight decay")
    decay_norms_and_embeddings: bool = setting(True, doc="weight decay on norms and embeddings")
    grad_clip: float = setting(0.2, rule=POSITIVE, doc="max gradient norm")
    betas: tuple[float, float] = setting(
        (0.9, 0.95), rule=Rule(lambda v: all(0 <= b < 1 for b in v), "in [0, 1)"), doc="AdamW"
    )
    eps: float = setting(1e-8, rule=POSITIVE, doc="AdamW epsilon")
    eval_every: int = setting(100, rule=AT_LEAST_1, doc="steps between validations")
    eval_batches: int = setting(8, rule=AT_LEAST_1, doc="validation batches per evaluation")
    checkpoint_every: int = setting(100, rule=AT_LEAST_1, doc="steps between checkpoints")
    log_every: int = setting(1, rule=AT_LEAST_1, doc="steps between logged metrics")
    progress_every: int = setting(
        10, rule=AT_LEAST_1, doc="steps between progress lines (rank 0, stdout)"
    )
    progress_seconds: float = setting(30.0, rule=POSITIVE, doc="and at most this long without one")
    seed: int = setting(42, rule=NONNEG, doc="seed of the per-rank torch and Python RNGs")
    compile: bool = setting(False, doc="torch.compile each block (cap every pooled stage)")
    activation_checkpointing: bool | AcPolicy | list[AcPolicy] = setting(
        False, doc="none|blocks|selective, or one per stage; true = blocks"
    )
    attention: str = setting(
        "auto", rule=choice(ATTENTION_BACKENDS), doc="auto: flash-attn, else Flex on GPU; CPU: SDPA"
    )
    peak_flops: float | None = setting(
        None, rule=POSITIVE, doc="device bf16 peak FLOP/s for MFU; null: the known-GPU table"
    )
    dtype: str = setting("auto", rule=choice(DTYPES), doc="auto: bfloat16 on GPU, else float32")
    eval_suite: str | None = setting(None, rule=NONEMPTY, doc="eval YAML, run at the end")
    eval_suite_every: int | None = setting(
        None, rule=AT_LEAST_1, doc="and every N steps (needs eval_suite)"
    )

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.flop_budget is None):
            got = f"steps={self.steps}, flop_budget={self.flop_budget}"
            raise SpecError(
                f"steps: set exactly one of train.steps and train.flop_budget, got {got}"
            )
        if self.warmup >= 1 and self.warmup != int(self.warmup):
            raise SpecError(
                f"warmup: a value >= 1 counts steps and must be whole, got {self.warmup}"
            )
        if self.eval_suite_every is not None and self.eval_suite is None:
            raise SpecError("eval_suite_every: set train.eval_suite too (the suite to run)")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    tracking_uri: str = setting(
        "sqlite:///mlflow.db", rule=NONEMPTY, doc="env MLFLOW_TRACKING_URI wins when set"
    )
    experiment: str = setting("aunet", rule=NONEMPTY, doc="MLflow experiment name")
    run_name: str | None = setting(None, rule=NONEMPTY, doc="null: the spec's name")
    artifact_location: str | None = setting(
        None, rule=NONEMPTY, doc="artifact root of a new experiment; null: the store's choice"
    )
    log_model: bool = setting(True, doc="also log the final checkpoint as a servable pyfunc model")
    system_metrics_s: float | None = setting(
        10.0, rule=POSITIVE, doc="system/* metrics (CPU, memory, disk, network, GPU) every N s"
    )
    register_model: str | None = setting(
        None,
        rule=NONEMPTY,
        doc="register that model under this name (serve models:/<name>/<version>); needs log_model",
    )


@dataclass(frozen=True, kw_only=True)
class ResourcesConfig:
    num_workers: int = setting(1, rule=AT_LEAST_1, doc="Ray Train workers (FSDP ranks)")
    use_gpu: bool = setting(False, doc="one GPU per worker")
    cpus_per_worker: float = setting(1.0, rule=POSITIVE, doc="CPUs reserved per worker")
    storage_path: str = setting(
        "outputs", rule=NONEMPTY, doc="runs, checkpoints, datasets: a path or pyarrow URI"
    )
    max_failures: int = setting(
        1, rule=Rule(lambda v: v >= -1, ">= -1 (-1: forever)"), doc="worker-failure restarts"
    )
    ray_address: str | None = setting(
        None, rule=NONEMPTY, doc="cluster to join; null: env RAY_ADDRESS, else a local Ray"
    )


def _build_model(raw: Any, key: str) -> AUNetConfig:
    """The same type rules as the other sections, then the model's own ``from_dict``."""
    if isinstance(raw, Mapping):
        hints = typing.get_type_hints(AUNetConfig)
        known = set(hints) - {"extra"}
        unknown = sorted(k for k in raw if k not in known)
        if unknown:  # the model's own message, plus a suggestion
            raise schema.unknown_key(f"{key}.{unknown[0]}", str(unknown[0]), sorted(known))
        raw = {k: schema.coerce(v, hints[k], f"{key}.{k}") for k, v in raw.items()}
    try:
        return AUNetConfig.from_dict(raw, prefix=key)
    except (ConfigError, TypeError) as e:
        raise SpecError(str(e)) from None


@dataclass(frozen=True, kw_only=True)
class ExperimentSpec:
    name: str = setting(rule=NAME, doc="names the run, its dataset and its MLflow run")
    data: DataConfig
    model: AUNetConfig = setting(
        build=_build_model, skip=("extra",), doc="the official per-stage lists"
    )
    train: TrainConfig
    tracking: TrackingConfig = setting(factory=TrackingConfig)
    resources: ResourcesConfig = setting(factory=ResourcesConfig)
    tokenizer: TokenizerConfig | None = setting(
        None, doc="null: bytes; else token-id datasets (docs/data.md, Token-id datasets)"
    )
    variants: dict[str, dict[str, Any]] | None = setting(
        None, doc="name -> {dotted.key: value}: override sets trained one after the other"
    )

    def __post_init__(self) -> None:
        if self.tokenizer is not None and self.model.split_strategy:
            raise SpecError(
                "tokenizer: token-id datasets have no pooling levels; set model.strategy: {} "
                "(the BPE baseline is one stage)"
            )
        ac, n = self.train.activation_checkpointing, self.model.num_stages + 1
        if isinstance(ac, list) and len(ac) != n:
            raise SpecError(
                f"train.activation_checkpointing: expected one value or {n} (one per stage, "
                f"the trunk last), got {len(ac)}"
            )

    @classmethod
    def from_dict(
        cls,
        raw: Mapping[str, Any],
        source: str = "<dict>",
        cwd: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
    ) -> ExperimentSpec:
        """Validate a plain mapping (YAML-shaped) and make its paths absolute against ``cwd``.

        ``env``: the environment of a load from a file (``os.environ``), whose
        ``MLFLOW_TRACKING_URI`` then replaces ``tracking.tracking_uri``, so the loaded spec holds
        the URI every later step uses. Specs re-made from a loaded one (``with_overrides``, Ray
        workers) pass none and keep theirs.
        """
        with schema.attributed_to(source):
            if not isinstance(raw, Mapping):
                raise SpecError(f"expected a mapping at the top level, got {type(raw).__name__}")
            spec = _resolve_paths(schema.build(cls, raw), cwd or os.getcwd(), env)
            for name in spec.variants or {}:
                try:
                    spec.with_variant(name)
                except SpecError as e:
                    raise SpecError(f"variants.{name}: {e.message}") from None
            return spec

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-able mapping; ``from_dict(to_dict())`` gives an equal spec."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["model"] = self.model.to_dict()
        return typing.cast(dict[str, Any], schema.plain(out))

    def with_overrides(self, overrides: Mapping[str, Any] | Sequence[str]) -> ExperimentSpec:
        """A new validated spec: ``{"train.lr": 1e-3}`` (values as is) or ``["train.lr=1e-3"]``."""
        where = f"spec {self.name!r}"
        raw = self.to_dict()
        pairs = overrides.items() if isinstance(overrides, Mapping) else parse_overrides(overrides)
        for key, value in pairs:
            set_dotted(raw, key, value, where)
        return ExperimentSpec.from_dict(raw, source=where)

    def with_variant(self, name: str) -> ExperimentSpec:
        """The spec with the named override set of ``variants`` applied (and no variants left)."""
        variants = self.variants or {}
        if name not in variants:
            defined = ", ".join(variants) or "none"
            hint = schema.suggest(name, list(variants))
            raise SpecError(
                f"variants: no {name!r} (defined: {defined}){hint}", f"spec {self.name!r}"
            )
        return dataclasses.replace(self, variants=None).with_overrides(variants[name])

    def dataset_hash(self) -> str:
        """Hash of what determines the preprocessed bytes: the data config and the split rules."""
        from pipelines.corpus import source_digests

        data = typing.cast(dict[str, Any], schema.plain(self.data))
        data.pop("dataset_dir")  # where the output goes does not change what it holds
        # Inputs by content, not path: a `ray job submit` copy of the same corpus finds the same
        # dataset (docs/data.md, Dataset identity). Checksums are cached per file by size/mtime.
        for src in data["sources"]:
            src["path"] = source_digests(src["path"])
        # A list of pairs: the strategy's order is its meaning (dict order = level).
        blob = {"data": data, "split_strategy": list(self.model.split_strategy.items())}
        if self.tokenizer is not None:  # absent for bytes: existing datasets keep their hash
            blob["tokenizer"] = self.tokenizer_identity()
        return spec_hash(blob)

    def tokenizer_identity(self) -> dict[str, Any]:
        """What a tokenizer depends on: its settings, or the file's content when ``path`` names
        one (a copy elsewhere is the same tokenizer)."""
        from pipelines.corpus import source_digests

        tok = typing.cast(dict[str, Any], schema.plain(self.tokenizer))
        if tok.get("path") is not None:
            tok["path"] = source_digests(tok["path"])
        return tok

    def dataset_dir(self) -> str:
        """``data.dataset_dir``, else ``<storage_path>/datasets/<name>-<dataset_hash>``."""
        if self.data.dataset_dir is not None:
            return self.data.dataset_dir
        leaf = f"{self.name}-{self.dataset_hash()}"
        return join_path(self.resources.storage_path, "datasets", leaf)


def help_text(title: str = "spec keys (YAML, or key=value / --set key=value):") -> str:
    """The spec's keys with types, defaults and docs, for the pipelines' ``--help``."""
    return schema.help_text(ExperimentSpec, title=title)


# ---------------------------------------------------------------------------------- paths
def _artifact_uri(location: str | None, cwd: str) -> str | None:
    if location is None:  # the store decides when the experiment is created (artifact_location_for)
        return None
    return location if is_uri(location) else Path(absolute_path(location, cwd)).as_uri()


def _resolve_paths(spec: ExperimentSpec, cwd: str, env: Mapping[str, str] | None) -> ExperimentSpec:
    data, tracking, res, train = spec.data, spec.tracking, spec.resources, spec.train
    sources = [dataclasses.replace(s, path=absolute_path(s.path, cwd)) for s in data.sources]
    ds_dir = None if data.dataset_dir is None else absolute_path(data.dataset_dir, cwd)
    return dataclasses.replace(
        spec,
        data=dataclasses.replace(data, sources=sources, dataset_dir=ds_dir),
        tracking=dataclasses.replace(
            tracking,
            tracking_uri=resolve_tracking_uri(tracking.tracking_uri, cwd, env or {}),
            artifact_location=_artifact_uri(tracking.artifact_location, cwd),
        ),
        resources=dataclasses.replace(res, storage_path=absolute_path(res.storage_path, cwd)),
        tokenizer=spec.tokenizer
        if spec.tokenizer is None or spec.tokenizer.path is None
        else dataclasses.replace(spec.tokenizer, path=absolute_path(spec.tokenizer.path, cwd)),
        train=train
        if train.eval_suite is None
        else dataclasses.replace(train, eval_suite=absolute_path(train.eval_suite, cwd)),
    )


# ---------------------------------------------------------------------------------- loading
def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentSpec:
    """Read a YAML spec (safe_load only), apply ``a.b=v`` overrides, validate, resolve paths
    (env ``MLFLOW_TRACKING_URI`` included: it is resolved here, once)."""
    raw = read_yaml_mapping(path)
    if isinstance(raw.get("data"), Mapping):  # so data.sources.N works for every sources form
        raw["data"] = DataConfig.normalize(raw["data"])
    apply_overrides(raw, overrides, str(path))
    return ExperimentSpec.from_dict(raw, source=str(path), env=os.environ)


# ---------------------------------------------------------------------------------- export
def spec_hash(obj: Any, length: int = 12) -> str:
    """Short sha256 of canonical JSON (sorted keys): order-carrying mappings must be pair lists."""
    text = json.dumps(schema.plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def flatten(spec: ExperimentSpec) -> dict[str, str]:
    """Dotted-key params for MLflow; lists of scalars are JSON, credentials in URIs redacted."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        elif isinstance(value, str):
            out[prefix] = redact(value)
        else:
            out[prefix] = json.dumps(value)

    raw = spec.to_dict()
    raw.pop("variants")
    walk("", raw)
    return out
