"""The sweep driver's progress line: a Ray Tune callback (it runs in the driver's Tune loop).

``sweep: trials 2/6 done (33%) | 2 running | 1 error | best val_bits_per_byte 2.3141
(stages=k2) | elapsed 4m10s`` after every trial that ends, and at least every
``train.progress_seconds`` while trials run. "Best so far" is over every value of the sweep's
metric the trials have reported (each validation and the final one), so it moves before the first
trial finishes. The line goes to stderr: stdout carries the results table.

A module of its own because Tune pickles its callbacks with the experiment state (a resumed
sweep restores this object), which needs a class importable by name, and importing Ray Tune at
the top of ``pipelines.sweep`` would slow its ``--help``.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from ray.tune import Callback

from pipelines.progress import Cadence, duration, say

DONE = ("TERMINATED", "ERROR")


class SweepProgress(Callback):
    """Counts trials by status from Tune's own list; keeps the best reported metric."""

    def __init__(self, metric: str, mode: str, seconds: float, labels: Any) -> None:
        self.metric, self.mode, self.seconds, self.labels = metric, mode, seconds, labels
        self.best: tuple[float, str] | None = None
        self.total = 0
        self.cadence: Cadence | None = None  # set by setup()

    def setup(self, total_num_samples: int | None = None, **info: Any) -> None:
        """Called at every (re)start: the clock and the cadence restart with the driver."""
        self.total = total_num_samples or 0
        self.cadence = Cadence(every=1, seconds=self.seconds)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        value = result.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        sign = 1.0 if self.mode == "min" else -1.0
        if self.best is None or sign * value < sign * self.best[0]:
            self.best = (float(value), self.labels(trial.config))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.tick(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.tick(trials)

    def tick(self, trials: list) -> str | None:
        """Print and return the line when one is due (a trial ended, or ``seconds`` passed)."""
        if self.cadence is None:  # Tune calls setup first; a direct caller may not
            self.setup(len(trials))
        cadence = self.cadence
        assert cadence is not None  # for the type checker: setup() just set it
        status = [t.status for t in trials]
        done = sum(s in DONE for s in status)
        total = max(self.total, len(trials))
        if not cadence.due(done, total):
            return None
        line = self.line(done, total, status.count("RUNNING"), status.count("ERROR"))
        say(line, sys.stderr)
        return line

    def line(self, done: int, total: int, running: int, errors: int) -> str:
        parts = [f"trials {done}/{total} done ({done / max(total, 1):.0%})", f"{running} running"]
        if errors:
            parts.append(f"{errors} error{'s' if errors > 1 else ''}")
        if self.best is not None:
            parts.append(f"best {self.metric} {self.best[0]:.4f} ({self.best[1]})")
        parts.append(f"elapsed {duration(self.cadence.elapsed() if self.cadence else 0.0)}")
        return "sweep: " + " | ".join(parts)
