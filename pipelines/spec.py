"""Experiment specs: the one YAML reader, and the one vocabulary of dotted keys.

A spec is validated completely at load time so that a typo fails in the driver, naming the file
and the dotted key, before Ray starts. The same dotted keys serve YAML, ``--set`` overrides, Tune
search spaces (``ExperimentSpec.with_overrides``) and MLflow params (``flatten``). Relative paths
are made absolute against the current working directory at load, because Ray workers run in
another directory (docs/platform.md, Paths).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from aunet.config import AUNetConfig, ConfigError
from pipelines.runtime import absolute_path, absolute_tracking_uri, is_uri, join_path


class SpecError(ValueError):
    """An invalid spec; the message is ``<file>: <dotted.key>: <problem>``."""


FORMATS = ("auto", "txt", "jsonl", "parquet")
DTYPES = ("auto", "float32", "bfloat16")
# Longest suffix first: ".jsonl.gz" must not be read as unknown ".gz".
EXTENSIONS = {
    ".jsonl.gz": "jsonl",
    ".jsonl.zst": "jsonl",
    ".jsonl": "jsonl",
    ".txt": "txt",
    ".parquet": "parquet",
}
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")  # YAML 1.1 reads 1e-3 as a str
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _rule(check: typing.Callable[[Any], bool], text: str) -> dict[str, Any]:
    return {"check": check, "text": text}


_POSITIVE = _rule(lambda v: v > 0, "> 0")
_NONNEG = _rule(lambda v: v >= 0, ">= 0")
_AT_LEAST_1 = _rule(lambda v: v >= 1, ">= 1")
_NONEMPTY = _rule(lambda v: len(v) > 0, "(non-empty)")


def _choice(options: Sequence[str]) -> dict[str, Any]:
    return _rule(lambda v: v in options, f"in ({', '.join(options)})")


def _err(key: str, msg: str) -> SpecError:
    return SpecError(f"{key}: {msg}")


# ---------------------------------------------------------------------------------- sections
@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One input file or glob, with its sampling weight (the official ``sources: {name: w}``)."""

    path: str = field(metadata=_NONEMPTY)
    weight: float = field(default=1.0, metadata=_POSITIVE)
    format: str = field(default="auto", metadata=_choice(FORMATS))
    text_field: str = field(default="text", metadata=_NONEMPTY)
    id_field: str | None = None
    lang_field: str | None = None

    def __post_init__(self) -> None:
        if self.format == "auto" and _format_of(self.path) is None:
            known = ", ".join(EXTENSIONS)
            raise _err("format", f"cannot infer from {self.path!r} (known: {known}); set it")

    @property
    def resolved_format(self) -> str:
        """``txt``, ``jsonl`` or ``parquet``: ``format``, or from the extension when ``auto``."""
        return self.format if self.format != "auto" else typing.cast(str, _format_of(self.path))


def _format_of(path: str) -> str | None:
    name = path.lower()
    return next((fmt for ext, fmt in EXTENSIONS.items() if name.endswith(ext)), None)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    sources: list[SourceConfig]
    seq_len: int = field(default=8192, metadata=_rule(lambda v: v >= 2, ">= 2"))
    val_fraction: float = field(default=0.01, metadata=_rule(lambda v: 0 <= v < 1, "in [0, 1)"))
    seed: int = field(default=0, metadata=_NONNEG)
    dataset_dir: str | None = field(default=None, metadata=_NONEMPTY)
    max_documents: int | None = field(default=None, metadata=_AT_LEAST_1)
    shard_sequences: int = field(default=1024, metadata=_AT_LEAST_1)

    def __post_init__(self) -> None:
        if not self.sources:
            raise _err("sources", "expected at least one source")

    @staticmethod
    def _normalize(raw: Mapping[str, Any]) -> dict[str, Any]:
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
class TrainConfig:
    steps: int | None = field(default=None, metadata=_AT_LEAST_1)
    flop_budget: float | None = field(default=None, metadata=_POSITIVE)
    batch_size: int | None = field(default=None, metadata=_AT_LEAST_1)
    lr: float | None = field(default=None, metadata=_POSITIVE)
    warmup: float = field(default=0.1, metadata=_NONNEG)  # fraction (< 1) or steps (>= 1)
    lr_min_ratio: float = field(default=0.01, metadata=_rule(lambda v: 0 <= v <= 1, "in [0, 1]"))
    weight_decay: float = field(default=0.1, metadata=_NONNEG)
    decay_norms_and_embeddings: bool = True
    grad_clip: float = field(default=0.2, metadata=_POSITIVE)
    betas: tuple[float, float] = field(
        default=(0.9, 0.95), metadata=_rule(lambda v: all(0 <= b < 1 for b in v), "in [0, 1)")
    )
    eps: float = field(default=1e-8, metadata=_POSITIVE)
    eval_every: int = field(default=100, metadata=_AT_LEAST_1)
    eval_batches: int = field(default=8, metadata=_AT_LEAST_1)
    checkpoint_every: int = field(default=100, metadata=_AT_LEAST_1)
    log_every: int = field(default=1, metadata=_AT_LEAST_1)
    seed: int = field(default=42, metadata=_NONNEG)
    compile: bool = False
    activation_checkpointing: bool = False
    dtype: str = field(default="auto", metadata=_choice(DTYPES))
    eval_suite: str | None = field(default=None, metadata=_NONEMPTY)  # eval YAML, run at the end
    eval_suite_every: int | None = field(default=None, metadata=_AT_LEAST_1)  # and every N steps

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.flop_budget is None):
            got = f"steps={self.steps}, flop_budget={self.flop_budget}"
            raise _err("steps", f"set exactly one of train.steps and train.flop_budget, got {got}")
        if self.warmup >= 1 and self.warmup != int(self.warmup):
            raise _err("warmup", f"a value >= 1 counts steps and must be whole, got {self.warmup}")
        if self.eval_suite_every is not None and self.eval_suite is None:
            raise _err("eval_suite_every", "set train.eval_suite too (the suite to run)")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    tracking_uri: str = field(default="sqlite:///mlruns.db", metadata=_NONEMPTY)
    experiment: str = field(default="aunet", metadata=_NONEMPTY)
    run_name: str | None = field(default=None, metadata=_NONEMPTY)
    artifact_location: str | None = field(default=None, metadata=_NONEMPTY)
    log_model: bool = True  # also log the final checkpoint as a servable pyfunc model


@dataclass(frozen=True, kw_only=True)
class ResourcesConfig:
    num_workers: int = field(default=1, metadata=_AT_LEAST_1)
    use_gpu: bool = False
    cpus_per_worker: float = field(default=1.0, metadata=_POSITIVE)
    storage_path: str = field(default="outputs", metadata=_NONEMPTY)
    max_failures: int = field(default=1, metadata=_rule(lambda v: v >= -1, ">= -1 (-1: forever)"))
    ray_address: str | None = field(default=None, metadata=_NONEMPTY)


@dataclass(frozen=True, kw_only=True)
class ExperimentSpec:
    name: str = field(metadata=_rule(lambda v: bool(_NAME.match(v)), "of [A-Za-z0-9._-]"))
    data: DataConfig
    model: AUNetConfig
    train: TrainConfig
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    variants: dict[str, dict[str, Any]] | None = None

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any], source: str = "<dict>", cwd: str | None = None
    ) -> ExperimentSpec:
        """Validate a plain mapping (YAML-shaped) and make its paths absolute against ``cwd``."""
        try:
            if not isinstance(raw, Mapping):
                raise SpecError(f"expected a mapping at the top level, got {type(raw).__name__}")
            spec = _resolve_paths(_build(cls, raw, ""), cwd or os.getcwd())
            for name in spec.variants or {}:
                try:
                    spec.with_variant(name)
                except SpecError as e:
                    raise _err(f"variants.{name}", str(e).split(": ", 1)[1]) from None
            return spec
        except SpecError as e:
            raise SpecError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-able mapping; ``from_dict(to_dict())`` gives an equal spec."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["model"] = self.model.to_dict()
        return typing.cast(dict[str, Any], _plain(out))

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
            raise SpecError(f"spec {self.name!r}: variants: no {name!r} (defined: {defined})")
        return dataclasses.replace(self, variants=None).with_overrides(variants[name])

    def dataset_hash(self) -> str:
        """Hash of what determines the preprocessed bytes: the data config and the split rules."""
        data = typing.cast(dict[str, Any], _plain(self.data))
        data.pop("dataset_dir")  # where the output goes does not change what it holds
        # A list of pairs: the strategy's order is its meaning (dict order = level).
        return spec_hash({"data": data, "split_strategy": list(self.model.split_strategy.items())})

    def dataset_dir(self) -> str:
        """``data.dataset_dir``, else ``<storage_path>/datasets/<name>-<dataset_hash>``."""
        if self.data.dataset_dir is not None:
            return self.data.dataset_dir
        leaf = f"{self.name}-{self.dataset_hash()}"
        return join_path(self.resources.storage_path, "datasets", leaf)


# ---------------------------------------------------------------------------------- building
def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is list:
        return f"list of {_describe(args[0])}"
    if origin is tuple:
        return f"list of {len(args)} {_describe(args[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, want: str = "") -> Any:
    """Check ``value`` against the annotation ``tp``; ints become floats, lists become tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = _err(key, f"expected {want or _describe(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, want)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp in (int, float):
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value) or (tp is int and value != int(value)):
            raise bad
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            raise bad
        items = args if origin is tuple else args * len(value)
        out = [_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, items))]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"{key}: unsupported annotation {tp!r}")  # a bug in this module, not input


def _build(cls: type, raw: Any, key: str) -> Any:
    """Construct a spec dataclass from a mapping; every error names the dotted key."""
    prefix = f"{key}." if key else ""
    if cls is AUNetConfig:
        return _build_model(raw, key)
    if not isinstance(raw, Mapping):
        raise _err(key, f"expected a mapping, got {raw!r}")
    if hasattr(cls, "_normalize"):
        raw = cls._normalize(raw)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise _err(f"{prefix}{unknown[0]}", f"unknown key (valid: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                raise _err(f"{prefix}{name}", "required key missing")
            continue
        rule, want = f.metadata.get("check"), f"{_describe(hints[name])} {f.metadata.get('text')}"
        value = _coerce(raw[name], hints[name], f"{prefix}{name}", want if rule else "")
        if value is not None and rule is not None and not rule(value):
            raise _err(f"{prefix}{name}", f"expected {want}, got {value!r}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except SpecError as e:  # cross-field checks in __post_init__ name a field of this section
        raise SpecError(f"{prefix}{e}") from None


def _build_model(raw: Any, key: str) -> AUNetConfig:
    if isinstance(raw, Mapping):  # same type rules as the other sections, then the model's own
        hints = typing.get_type_hints(AUNetConfig)
        known = set(hints) - {"extra"}
        raw = {k: _coerce(v, hints[k], f"{key}.{k}") if k in known else v for k, v in raw.items()}
    try:
        return AUNetConfig.from_dict(raw, prefix=key)
    except (ConfigError, TypeError) as e:
        raise SpecError(str(e)) from None


def _plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists: what yaml.safe_dump and JSON accept."""
    if isinstance(obj, AUNetConfig):
        return _plain(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ---------------------------------------------------------------------------------- paths
def _artifact_uri(location: str | None, cwd: str) -> str | None:
    if location is None:  # the store decides when the experiment is created (artifact_location_for)
        return None
    return location if is_uri(location) else Path(absolute_path(location, cwd)).as_uri()


def _resolve_paths(spec: ExperimentSpec, cwd: str) -> ExperimentSpec:
    data, tracking, res, train = spec.data, spec.tracking, spec.resources, spec.train
    sources = [dataclasses.replace(s, path=absolute_path(s.path, cwd)) for s in data.sources]
    ds_dir = None if data.dataset_dir is None else absolute_path(data.dataset_dir, cwd)
    return dataclasses.replace(
        spec,
        data=dataclasses.replace(data, sources=sources, dataset_dir=ds_dir),
        tracking=dataclasses.replace(
            tracking,
            tracking_uri=absolute_tracking_uri(tracking.tracking_uri, cwd),
            artifact_location=_artifact_uri(tracking.artifact_location, cwd),
        ),
        resources=dataclasses.replace(res, storage_path=absolute_path(res.storage_path, cwd)),
        train=train
        if train.eval_suite is None
        else dataclasses.replace(train, eval_suite=absolute_path(train.eval_suite, cwd)),
    )


# ---------------------------------------------------------------------------------- overrides
def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"override {item!r}: expected dotted.key=value")
        try:
            out.append((key.strip(), yaml.safe_load(text)))
        except yaml.YAMLError as e:
            raise SpecError(f"{key.strip()}: override value {text!r} is not YAML: {e}") from None
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set ``a.b.c`` in a YAML-shaped dict; numeric parts index lists: ``data.sources.0.weight``."""
    parts = key.split(".")
    if isinstance(raw.get("data"), Mapping):  # so data.sources.N works for every sources form
        raw["data"] = DataConfig._normalize(raw["data"])
    node: Any = raw
    for i, part in enumerate(parts):
        index: str | int = part
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            index = int(part)
        elif not isinstance(node, dict):
            what = f"a list of {len(node)}" if isinstance(node, list) else type(node).__name__
            parent = ".".join(parts[:i])
            raise SpecError(f"{where}: {key}: cannot set override: {parent} is {what}")
        if i == len(parts) - 1:
            node[index] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}  # absent or null section: create it
            node = node[index]


USAGE = "usage: <spec.yaml> [key=value ...] [--set key=value ...]"


def parse_cli(argv: Sequence[str]) -> tuple[str, list[str]]:
    """``<spec.yaml> [a.b=v ...] [--set a.b=v ...]`` -> (spec path, ["a.b=v", ...])."""
    spec_path, overrides, i = None, [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg == "--set":
            if i + 1 >= len(argv):
                raise SpecError("command line: --set needs a dotted.key=value argument")
            overrides.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--set="):
            overrides.append(arg[len("--set=") :])
        elif arg.startswith("-"):
            raise SpecError(f"command line: unknown option {arg!r} ({USAGE})")
        elif "=" in arg:
            overrides.append(arg)
        elif spec_path is None:
            spec_path = arg
        else:
            raise SpecError(f"command line: a second spec file {arg!r} (first: {spec_path!r})")
        i += 1
    if spec_path is None:
        raise SpecError(f"command line: no spec file ({USAGE})")
    for item in overrides:
        parse_overrides([item])  # fail here, before any work, on a malformed override
    return spec_path, overrides


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (safe_load only); errors name the file."""
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise SpecError(f"{source}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else type(raw).__name__
        raise SpecError(f"{source}: expected a mapping at the top level, got {got}")
    return raw


def split_overrides(
    overrides: Sequence[str], section: str
) -> tuple[list[tuple[str, Any]], list[str]]:
    """Overrides of an extra top-level ``section`` (key without the prefix, parsed value) and
    the rest, left as ``a.b=v`` strings for ``load_spec``/``with_overrides``."""
    own, rest = [], []
    for item in overrides:
        key, _, text = item.partition("=")
        if key.startswith(section + "."):
            own.append((key[len(section) + 1 :], yaml.safe_load(text)))
        else:
            rest.append(item)
    return own, rest


def read_with_section(
    path: str | Path, section: str, overrides: Sequence[str] = ()
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """A spec YAML with an extra top-level ``section`` mapping (``sweep:``, ``study:``) ->
    (the spec part, the section with its ``<section>.a.b=v`` overrides set, the spec overrides)."""
    source = str(path)
    raw = read_yaml_mapping(path)
    if not isinstance(raw.get(section), dict):
        raise SpecError(f"{source}: {section}: required mapping missing")
    part = {section: raw.pop(section)}  # keys keep their prefix: errors name ``section.a.b``
    own, rest = split_overrides(overrides, section)
    for key, value in own:
        set_dotted(part, f"{section}.{key}", value, source)
    return raw, part[section], rest


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str) -> None:
    """Set ``a.b=v`` overrides into a raw mapping; errors are prefixed with ``source``."""
    try:
        for key, value in parse_overrides(overrides):
            set_dotted(raw, key, value, source)
    except SpecError as e:
        msg = str(e)
        raise SpecError(msg if msg.startswith(f"{source}: ") else f"{source}: {msg}") from None


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentSpec:
    """Read a YAML spec (safe_load only), apply ``a.b=v`` overrides, validate, resolve paths."""
    raw = read_yaml_mapping(path)
    apply_overrides(raw, overrides, str(path))
    return ExperimentSpec.from_dict(raw, source=str(path))


# ---------------------------------------------------------------------------------- export
def spec_hash(obj: Any, length: int = 12) -> str:
    """Short sha256 of canonical JSON (sorted keys): order-carrying mappings must be pair lists."""
    text = json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


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
            out[prefix] = _USERINFO.sub("***@", value)
        else:
            out[prefix] = json.dumps(value)

    raw = spec.to_dict()
    raw.pop("variants")
    walk("", raw)
    return out
