"""Progress lines for every long-running pipeline: one style, one cadence rule.

A line, never a redrawn bar: Ray forwards a worker's stdout to the driver's terminal line by
line, and CI logs and files keep every redraw. Each line starts with the pipeline's name
(``train:``, ``preprocess:``, ``sweep:``, ``generate:``) and separates its figures with `` | ``.
A line is due every ``every`` units of work, at least every ``seconds``, and at the end.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO


def say(line: str, stream: TextIO | None = None) -> None:
    """A line on ``stream`` (stdout by default). Not print(): Ray Train routes a worker's print()
    through logging, whose console handlers put it on the terminal twice (stdout and stderr)."""
    out = stream if stream is not None else sys.stdout
    out.write(line + "\n")
    out.flush()


def duration(seconds: float) -> str:
    """``1h02m``, ``3m07s``; ``?`` when unknown (nothing done yet)."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def rate(x: float, unit: str) -> str:
    """Three significant digits with an SI prefix: ``12.3 MB/s``, ``4.1 GFLOP/s``."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def eta(elapsed: float, done: float, total: float) -> float:
    """Seconds left at the mean pace so far; NaN before anything is done."""
    return elapsed / done * (total - done) if done > 0 else float("nan")


class Cadence:
    """When a progress line is due: every ``every`` units since the last line, after ``seconds``
    without one, and at ``total``. ``clock`` is injectable so tests need no sleeps."""

    def __init__(self, every: int, seconds: float, clock: Any = time.monotonic) -> None:
        self.every, self.seconds, self.clock = every, seconds, clock
        self.t0 = self.last_t = clock()
        self.last_done = 0

    def due(self, done: int, total: int) -> bool:
        """Whether a line is due now; when it is, the next interval starts here."""
        now = self.clock()
        end = done >= total > self.last_done
        if not (end or done - self.last_done >= self.every or now - self.last_t >= self.seconds):
            return False
        self.last_t, self.last_done = now, done
        return True

    def elapsed(self) -> float:
        return self.clock() - self.t0
