"""The eval YAML: which suites to run on a checkpoint, validated like experiment specs.

Same rules as ``pipelines.spec``: ``yaml.safe_load`` only, dotted overrides (``tasks.char.n=5``;
tasks are a mapping by name so that overrides can name them), unknown keys are errors naming the
dotted key, relative paths are made absolute against the current directory at load time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aunet.evaluation import CHAR_TASKS
from pipelines import schema
from pipelines.eval_tasks import FORMATS
from pipelines.paths import absolute_path, resolve_tracking_uri
from pipelines.schema import (
    AT_LEAST_1,
    NAME,
    NAME_PATTERN,
    NONNEG,
    SpecError,
    apply_overrides,
    at_least,
    choice,
    read_yaml_mapping,
    setting,
)
from pipelines.spec import TrackingConfig

KINDS = ("bpb", "choice", "cloze", "char", "lm_eval")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True, kw_only=True)
class HubConfig:
    path: str = setting(doc='Hugging Face data set, e.g. "Rowan/hellaswag"')
    name: str | None = setting(None, doc='its configuration ("ARC-Easy")')
    split: str = setting("validation", doc="the split to read")


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """One suite. ``bpb``: held-out text; ``choice``: a multiple-choice file or hub set;
    ``cloze``: line endings generated from held-out text; ``char``: generated character tasks;
    ``lm_eval``: lm-evaluation-harness tasks defined by the YAMLs under ``path``
    (``pipelines.lm_eval_model``)."""

    kind: str = setting(rule=choice(KINDS), doc="which suite")
    path: str | None = setting(
        None,
        doc="JSONL (bpb, cloze, choice), a word list (char) or a folder of task YAMLs (lm_eval)",
    )
    hub: HubConfig | None = setting(None, doc="choice only, instead of path")
    format: str = setting("common", rule=choice(tuple(FORMATS)), doc="choice: record layout")
    text_field: str = setting("text", doc="record field holding the text")
    group_field: str | None = setting(
        "lang", doc="per-group breakdown (bpb, cloze) when records carry it"
    )
    limit: int | None = setting(None, rule=AT_LEAST_1, doc="first records / items only")
    n: int = setting(20, rule=AT_LEAST_1, doc="cloze items per group; char items per task")
    num_choices: int = setting(4, rule=at_least(2), doc="cloze: choices per item")
    prefix_chars: int = setting(128, rule=NONNEG, doc="cloze: document text before the cut")
    min_chars: int = setting(40, rule=AT_LEAST_1, doc="cloze: shortest usable line")
    seed: int = setting(0, rule=NONNEG, doc="seed of generated items")
    tasks: list[str] = setting(factory=lambda: list(CHAR_TASKS), doc="char: which tasks")
    shots: int = setting(3, rule=NONNEG, doc="char: examples in the prompt")
    lm_eval_tasks: list[str] = setting(
        factory=list, doc="lm_eval: names of tasks defined under path (their `task:` key)"
    )
    num_fewshot: int | None = setting(
        None, rule=NONNEG, doc="lm_eval: examples in the prompt; null: each task's own"
    )

    def __post_init__(self) -> None:
        if self.kind == "choice" and (self.path is None) == (self.hub is None):
            raise SpecError("path: a choice task needs exactly one of path and hub")
        if self.kind != "choice" and self.path is None:
            raise SpecError(f"path: required for a {self.kind} task")
        if self.kind != "choice" and self.hub is not None:
            raise SpecError(f"hub: only choice tasks load from the hub, not {self.kind}")
        if self.kind == "lm_eval" and not self.lm_eval_tasks:
            raise SpecError("lm_eval_tasks: an lm_eval suite needs at least one task name")
        bad = [t for t in self.tasks if t not in CHAR_TASKS]
        if bad:
            hint = schema.suggest(bad[0], CHAR_TASKS)
            raise SpecError(
                f"tasks: unknown character task {bad[0]!r} ({', '.join(CHAR_TASKS)}){hint}"
            )


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    name: str = setting(rule=NAME, doc="names the MLflow run of a standalone evaluation")
    tasks: dict[str, TaskConfig] = setting(doc="name -> suite (names are override keys)")
    context: int | None = setting(
        None, rule=at_least(2), doc="bytes of context; null: the checkpoint's seq_len"
    )
    stride: int | None = setting(None, rule=AT_LEAST_1, doc="bpb window stride; null: context / 2")
    batch_size: int = setting(16, rule=AT_LEAST_1, doc="sequences per forward")
    device: str = setting("auto", rule=choice(DEVICES), doc="auto: cuda when available")
    tracking: TrackingConfig = setting(factory=TrackingConfig)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise SpecError("tasks: expected at least one task")
        for name in self.tasks:
            if not NAME_PATTERN.match(name):
                raise SpecError(f"tasks.{name}: task names must be of [A-Za-z0-9._-]")


def load_eval_config(
    path: str | Path, overrides: Sequence[str] = (), *, cwd: str | None = None
) -> EvalConfig:
    """Read an eval YAML, apply ``a.b=v`` overrides, validate, make paths absolute against
    ``cwd`` (default: the current directory, as for experiment specs); env
    ``MLFLOW_TRACKING_URI`` replaces ``tracking.tracking_uri`` here, as at spec load."""
    source = str(path)
    raw = read_yaml_mapping(path)
    apply_overrides(raw, overrides, source)
    with schema.attributed_to(source):
        cfg = schema.build(EvalConfig, raw)
    tasks = {
        k: dataclasses.replace(t, path=None if t.path is None else absolute_path(t.path, cwd))
        for k, t in cfg.tasks.items()
    }
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cwd, os.environ)
    tracking = dataclasses.replace(cfg.tracking, tracking_uri=uri)
    return dataclasses.replace(cfg, tasks=tasks, tracking=tracking)


def help_text() -> str:
    """The eval config's keys with types, defaults and docs, for ``--help``."""
    return schema.help_text(EvalConfig, title="eval config keys (YAML, or key=value overrides):")
