"""The eval YAML: which suites to run on a checkpoint, validated like experiment specs.

Same rules as ``pipelines.spec``: ``yaml.safe_load`` only, dotted overrides (``tasks.char.n=5``;
tasks are a mapping by name so that overrides can name them), unknown keys are errors naming the
dotted key, relative paths are made absolute against the current directory at load time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aunet.evaluation import CHAR_TASKS
from pipelines.eval_tasks import FORMATS
from pipelines.runtime import absolute_path, absolute_tracking_uri
from pipelines.spec import (
    _NAME,
    SpecError,
    TrackingConfig,
    _build,
    _choice,
    _rule,
    apply_overrides,
    read_yaml_mapping,
)

KINDS = ("bpb", "choice", "cloze", "char")
DEVICES = ("auto", "cpu", "cuda")
_AT_LEAST_1 = _rule(lambda v: v >= 1, ">= 1")
_NONNEG = _rule(lambda v: v >= 0, ">= 0")


@dataclass(frozen=True, kw_only=True)
class HubConfig:
    path: str  # Hugging Face data set, e.g. "Rowan/hellaswag"
    name: str | None = None  # its configuration ("ARC-Easy")
    split: str = "validation"


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """One suite. ``bpb``: held-out text; ``choice``: a multiple-choice file or hub set;
    ``cloze``: line endings generated from held-out text; ``char``: generated character tasks."""

    kind: str = field(metadata=_choice(KINDS))
    path: str | None = None  # JSONL (bpb, cloze, choice) or a word list (char)
    hub: HubConfig | None = None  # choice only, instead of path
    format: str = field(default="common", metadata=_choice(tuple(FORMATS)))
    text_field: str = "text"
    group_field: str | None = "lang"  # per-group breakdown (bpb, cloze) when records carry it
    limit: int | None = field(default=None, metadata=_AT_LEAST_1)  # first records / items
    n: int = field(default=20, metadata=_AT_LEAST_1)  # cloze items per group; char items per task
    num_choices: int = field(default=4, metadata=_rule(lambda v: v >= 2, ">= 2"))
    prefix_chars: int = field(default=128, metadata=_NONNEG)  # cloze: document text before the cut
    min_chars: int = field(default=40, metadata=_AT_LEAST_1)  # cloze: shortest usable line
    seed: int = field(default=0, metadata=_NONNEG)
    tasks: list[str] = field(default_factory=lambda: list(CHAR_TASKS))
    shots: int = field(default=3, metadata=_NONNEG)

    def __post_init__(self) -> None:
        if self.kind == "choice" and (self.path is None) == (self.hub is None):
            raise SpecError("path: a choice task needs exactly one of path and hub")
        if self.kind != "choice" and self.path is None:
            raise SpecError(f"path: required for a {self.kind} task")
        if self.kind != "choice" and self.hub is not None:
            raise SpecError(f"hub: only choice tasks load from the hub, not {self.kind}")
        bad = [t for t in self.tasks if t not in CHAR_TASKS]
        if bad:
            raise SpecError(f"tasks: unknown character task {bad[0]!r} ({', '.join(CHAR_TASKS)})")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    name: str = field(metadata=_rule(lambda v: bool(_NAME.match(v)), "of [A-Za-z0-9._-]"))
    tasks: dict[str, TaskConfig]
    context: int | None = field(default=None, metadata=_rule(lambda v: v >= 2, ">= 2"))
    stride: int | None = field(default=None, metadata=_AT_LEAST_1)
    batch_size: int = field(default=16, metadata=_AT_LEAST_1)
    device: str = field(default="auto", metadata=_choice(DEVICES))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise SpecError("tasks: expected at least one task")
        for name in self.tasks:
            if not _NAME.match(name):
                raise SpecError(f"tasks.{name}: task names must be of [A-Za-z0-9._-]")


def load_eval_config(
    path: str | Path, overrides: Sequence[str] = (), *, cwd: str | None = None
) -> EvalConfig:
    """Read an eval YAML, apply ``a.b=v`` overrides, validate, make paths absolute against
    ``cwd`` (default: the current directory, as for experiment specs)."""
    source = str(path)
    raw = read_yaml_mapping(path)
    apply_overrides(raw, overrides, source)
    try:
        cfg = _build(EvalConfig, raw, "")
    except SpecError as e:
        msg = str(e)
        raise SpecError(msg if msg.startswith(f"{source}: ") else f"{source}: {msg}") from None
    tasks = {
        k: dataclasses.replace(t, path=None if t.path is None else absolute_path(t.path, cwd))
        for k, t in cfg.tasks.items()
    }
    tracking = dataclasses.replace(
        cfg.tracking, tracking_uri=absolute_tracking_uri(cfg.tracking.tracking_uri, cwd)
    )
    return dataclasses.replace(cfg, tasks=tasks, tracking=tracking)
