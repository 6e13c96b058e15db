"""The ``study:`` section of a scaling-study file, declared with the schema engine.

A study file is an experiment spec plus this section (see experiments/scaling/small.yaml):
variants x compute budgets (x size factors x lr factors), the data-to-model rule that sizes each
cell's model, and the settings of the report's fits and of the sweep that trains the cells.
``python -m pipelines.scaling --help`` lists every key; a typo fails in one line naming it.
The default rule, 214 bytes per parameter, is what we take as the paper's (docs/flops.md,
Compute-optimal sizing and the 214 bytes/param rule).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pipelines import schema
from pipelines.schema import AT_LEAST_1, NONNEG, POSITIVE, Rule, setting
from pipelines.spec import ExperimentSpec, SpecError, read_with_section

PAPER_BYTES_PER_PARAM = 214.0  # 283e9 bytes / 1.324e9 params of the official 2B_1level run


def _distinct_positive(v: tuple[float, ...]) -> bool:
    return len(v) > 0 and all(x > 0 for x in v) and len(set(v)) == len(v)


_POSITIVE_LIST = Rule(_distinct_positive, "", expect="distinct positive numbers")
_LAW = "'law' or a positive"


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyFit:
    """``study.fit``: how ``report`` fits loss against compute."""

    r2_threshold: float = setting(0.9, doc="a fit below this R^2 makes no predictions")
    min_budgets: int = setting(3, rule=AT_LEAST_1, doc="budgets a fit needs")
    bootstrap: int = setting(1000, rule=NONNEG, doc="bootstrap draws for the error bars")
    seed: int = setting(0, rule=NONNEG, doc="seed of the bootstrap")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudySweep:
    """``study.sweep``: the settings of the sweep that trains the cells."""

    max_concurrent_trials: int = setting(1, rule=AT_LEAST_1, doc="cells training at once")
    max_failures: int = setting(
        1, rule=Rule(lambda v: v >= -1, ">= -1"), doc="retries of a failed cell (-1: forever)"
    )
    flop_tolerance: float = setting(
        0.05, rule=Rule(lambda v: 0 < v < 1, "in (0, 1)"), doc="largest FLOP deviation of a cell"
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Study:
    """The ``study:`` section. ``fit`` and ``sweep`` hold only the keys the file sets (checked
    against ``StudyFit``/``StudySweep``); the defaults apply where they are used."""

    name: str = setting(rule=schema.NAME, doc="names the study's directory, sweep and tags")
    budgets: tuple[float, ...] = setting(rule=_POSITIVE_LIST, doc="training FLOPs of the cells")
    variants: dict[str, dict[str, Any]] = setting(
        rule=Rule(lambda v: len(v) > 0, "", expect="a non-empty mapping name -> overrides"),
        doc="name -> {dotted.key: value} on the base spec",
    )
    bytes_per_param: float = setting(
        PAPER_BYTES_PER_PARAM, rule=POSITIVE, doc="data-to-model rule D = bytes_per_param x N"
    )
    scale: str = setting("width", rule=schema.choice(("width", "depth")), doc="how N grows")
    size_factors: tuple[float, ...] = setting(
        (1.0,), rule=_POSITIVE_LIST, doc="multiply N at each budget (iso-FLOP profiles)"
    )
    lr: Literal["law"] | float = setting(
        "law",
        rule=Rule(lambda v: v == "law" or v > 0, "", expect=f"{_LAW} float"),
        doc="law: the paper's formula",
    )
    lr_factors: tuple[float, ...] = setting(
        (1.0,), rule=_POSITIVE_LIST, doc="multiply the lr of each cell (lr sweeps)"
    )
    batch_size: Literal["law"] | int = setting(
        "law",
        rule=Rule(lambda v: v == "law" or v > 0, "", expect=f"{_LAW} int"),
        doc="sequences per step; law: the paper's formula",
    )
    evals_per_run: int = setting(5, rule=AT_LEAST_1, doc="validations per cell")
    fit: dict[str, Any] = setting(factory=dict, partial=StudyFit, doc="report's fit settings")
    sweep: dict[str, Any] = setting(factory=dict, partial=StudySweep, doc="the cells' sweep")

    def fit_settings(self) -> dict[str, Any]:
        return dataclasses.asdict(StudyFit(**self.fit))


STUDY_KEYS = schema.keys(Study)
FIT_KEYS = schema.keys(StudyFit)
SWEEP_KEYS = schema.keys(StudySweep)


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> tuple[ExperimentSpec, Study]:
    """The base spec (``train.flop_budget`` defaults to the first budget) and its study."""
    source = str(path)
    raw, st, spec_overrides = read_with_section(path, "study", overrides)
    with schema.attributed_to(source):
        study = schema.build(Study, st, "study")
        train = raw.setdefault("train", {}) or {}
        raw["train"] = train
        if train.get("steps") is None and train.get("flop_budget") is None:
            train["flop_budget"] = study.budgets[0]
        spec = ExperimentSpec.from_dict(raw, source=source, env=os.environ)
        try:
            spec = spec.with_overrides(spec_overrides) if spec_overrides else spec
            for ov in study.variants.values():
                spec.with_overrides(ov)
        except SpecError as e:
            raise SpecError(f"study.variants: {e}") from None
    return spec, study
