"""The ``sweep:`` section of a sweep file: its dimensions, settings and validation.

Declared with the schema engine (``pipelines.schema``) like every other section, so a typo in a
sweep file fails in one line before Ray starts, and ``python -m pipelines.sweep --help`` lists
the keys. A dimension is categorical (``choices``: a list of values, or a mapping label ->
dotted overrides, or ``variants`` for the spec's own) or a numeric range (``loguniform``,
``uniform``, ``int``) on one key; a range cannot change the dataset (``data.*``, the split
strategy, ``tokenizer.*``), since every dataset is built before the first trial. The
``strategy`` dimension's choices are whole split strategies (``{label: {word1: "1@1"}}``),
checked at load.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines import schema
from pipelines.schema import AT_LEAST_1, Rule, choice, setting
from pipelines.spec import ExperimentSpec, SpecError, read_with_section

SEARCHES = ("grid", "optuna")
RANGES = ("loguniform", "uniform", "int")


# ---------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class Dim:
    """One search dimension: categorical (label -> overrides) or a numeric range on one key."""

    key: str
    choices: dict[str, dict[str, Any]] | None = None
    kind: str | None = None  # a RANGES entry
    bounds: tuple[float, float] | None = None

    def tune_domain(self, search: str) -> Any:
        from ray import tune

        if self.choices is not None:
            labels = list(self.choices)
            return tune.grid_search(labels) if search == "grid" else tune.choice(labels)
        lo, hi = self.bounds  # type: ignore[misc]
        if self.kind == "loguniform":
            return tune.loguniform(lo, hi)
        if self.kind == "uniform":
            return tune.uniform(lo, hi)
        return tune.randint(int(lo), int(hi) + 1)  # inclusive bounds in the YAML

    def overrides(self, value: Any) -> dict[str, Any]:
        if self.choices is not None:
            return dict(self.choices[str(value)])
        return {self.key: int(value) if self.kind == "int" else float(value)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sweep:
    """The ``sweep:`` section; ``dims`` is ``space`` parsed against the base spec."""

    name: str | None = setting(None, doc="sweep directory and parent run; null: the spec's name")
    search: str = setting("grid", rule=choice(SEARCHES), doc="grid: every combination")
    num_samples: int = setting(1, rule=AT_LEAST_1, doc="trials (optuna); grid: repeats")
    seed: int = setting(0, doc="seed of the search algorithm")
    metric: str = setting("val_bits_per_byte", doc="reported metric that ranks the trials")
    mode: str = setting("min", rule=choice(("min", "max")), doc="minimise or maximise metric")
    max_concurrent_trials: int = setting(1, rule=AT_LEAST_1, doc="trials running at once")
    max_failures: int = setting(
        1, rule=Rule(lambda v: v >= -1, ">= -1"), doc="retries of a failed trial (-1: forever)"
    )
    flop_tolerance: float = setting(
        0.02,
        rule=Rule(lambda v: 0 < v < 1, "in (0, 1)"),
        doc="largest FLOP deviation from train.flop_budget a trial may have",
    )
    scheduler: dict[str, Any] | None = setting(
        None,
        rule=Rule(lambda v: v.get("type") == "asha", "with type: asha"),
        doc="early stopping: {type: asha, time_attr, max_t, grace_period, reduction_factor}",
    )
    space: dict[str, Any] = setting(
        rule=schema.NONEMPTY,
        doc="dotted.key -> {choices: [v, ...] | {label: overrides} | variants}"
        f" or {{{'|'.join(RANGES)}: [low, high]}}",
    )
    fault: dict[str, Any] | None = setting(
        None,
        rule=Rule(lambda v: isinstance(v.get("step"), int), "with an int step"),
        doc="tests: {step: n, match: {dim: label}} fails a trial once",
    )
    dims: tuple[Dim, ...] = dataclasses.field(default=(), metadata=schema.DERIVED)

    def overrides(self, config: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for d in self.dims:
            out.update(d.overrides(config[d.key]))
        return out

    def label(self, config: Mapping[str, Any]) -> str:
        """Variant name: the categorical choices (ranges are in the params columns)."""
        parts = [f"{d.key}={config[d.key]}" for d in self.dims if d.choices is not None]
        return ",".join(parts) or "trial"


SWEEP_KEYS = schema.keys(Sweep)


def label_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _parse_dim(key: str, raw: Any, spec: ExperimentSpec) -> Dim:
    where = f"sweep.space.{key}"
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise SpecError(f"{where}: expected one of choices/{'/'.join(RANGES)}, got {raw!r}")
    ((kind, value),) = raw.items()
    if key == "strategy" and kind == "choices":
        return _strategy_dim(where, value)
    if kind == "choices":
        if value == "variants":
            value = dict(spec.variants or {})
        if isinstance(value, Mapping) and value:
            bad = [k for k, v in value.items() if not isinstance(v, Mapping)]
            if bad:
                raise SpecError(f"{where}.choices.{bad[0]}: expected a mapping of dotted overrides")
            return Dim(key, choices={str(k): dict(v) for k, v in value.items()})
        if isinstance(value, list) and value:
            return Dim(key, choices={label_value(v): {key: v} for v in value})
        raise SpecError(f"{where}.choices: expected a non-empty list or mapping, got {value!r}")
    if kind in RANGES:
        ok = isinstance(value, list) and len(value) == 2
        if ok:
            try:
                lo, hi = float(value[0]), float(value[1])
            except (TypeError, ValueError):
                ok = False
        if not ok or not lo < hi or (kind == "loguniform" and lo <= 0):
            raise SpecError(f"{where}.{kind}: expected [low, high] with low < high, got {value!r}")
        if key.startswith(("data.", "model.strategy", "tokenizer.")):
            raise SpecError(f"{where}: a range cannot change the dataset; use choices")
        return Dim(key, kind=kind, bounds=(lo, hi))
    kinds = ["choices", *RANGES]
    hint = schema.suggest(str(kind), kinds)
    raise SpecError(f"{where}: unknown kind {kind!r} (valid: {', '.join(kinds)}){hint}")


def _strategy_dim(where: str, value: Any) -> Dim:
    """``strategy: {choices: {label: {key: value, ...}}}``: each choice is a whole
    ``model.strategy`` (one entry per pooling stage), checked here so a typo fails before any
    dataset is built. Entropy stages are given as targets (``rate=0.2``): preprocessing resolves
    them per variant (docs/design.md, Splitting: entropy-driven boundaries)."""
    from aunet.entropy import EntropyStrategyError, parse_options
    from aunet.splitting import Splitter

    if not isinstance(value, Mapping) or not value:
        raise SpecError(f"{where}.choices: expected a mapping label -> strategy, got {value!r}")
    choices = {}
    for label, strategy in value.items():
        if not isinstance(strategy, Mapping) or not strategy:
            raise SpecError(
                f"{where}.choices.{label}: expected a strategy mapping (key: value per pooling "
                f"stage), got {strategy!r}"
            )
        strategy = {str(k): str(v) for k, v in strategy.items()}
        try:
            for k, v in strategy.items():
                if k.startswith("entropy"):
                    parse_options(k, v)
            plain = {k: v for k, v in strategy.items() if not k.startswith("entropy")}
            if plain:
                Splitter(plain)
        except (EntropyStrategyError, ValueError) as e:
            raise SpecError(f"{where}.choices.{label}: {e}") from None
        choices[str(label)] = {"model.strategy": strategy}
    return Dim("strategy", choices=choices)


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> tuple[ExperimentSpec, Sweep]:
    """Read ``<sweep.yaml>``: the base spec (validated) and its ``sweep:`` section."""
    source = str(path)
    raw, sw, spec_overrides = read_with_section(path, "sweep", overrides)
    spec = ExperimentSpec.from_dict(raw, source=source, env=os.environ)
    with schema.attributed_to(source):
        spec = spec.with_overrides(spec_overrides) if spec_overrides else spec
        return spec, _build_sweep(sw, spec)


def _build_sweep(sw: dict[str, Any], spec: ExperimentSpec) -> Sweep:
    sweep = schema.build(Sweep, sw, "sweep")
    dims = tuple(_parse_dim(str(k), v, spec) for k, v in sweep.space.items())
    tr = spec.train
    if sweep.scheduler and tr.checkpoint_every % tr.eval_every:
        raise SpecError(
            "train.checkpoint_every: must be a multiple of train.eval_every under "
            "ASHA (every report must carry validation bits/byte)"
        )
    return dataclasses.replace(sweep, name=sweep.name or spec.name, dims=dims)


def categorical_grid(sweep: Sweep) -> list[dict[str, Any]]:
    """Every combination of the categorical choices, ranges at their low bound."""
    axes = [list(d.choices) if d.choices is not None else [d.bounds[0]] for d in sweep.dims]  # type: ignore[index]
    combos = list(itertools.product(*axes))
    if len(combos) > 1000:
        raise SpecError(f"sweep.space: {len(combos)} categorical combinations (at most 1000)")
    return [{d.key: v for d, v in zip(sweep.dims, c)} for c in combos]
