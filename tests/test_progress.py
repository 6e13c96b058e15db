"""pipelines.progress: the cadence rule every pipeline's progress lines follow, and the figures."""

from __future__ import annotations

import io

from pipelines.progress import Cadence, duration, eta, rate, say


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_cadence_every_units_after_seconds_and_at_the_end():
    clock = FakeClock()
    c = Cadence(every=4, seconds=30.0, clock=clock)
    fired = []
    for done in range(1, 11):  # 1 s per unit: the unit count decides
        clock.t += 1.0
        if c.due(done, 10):
            fired.append(done)
    assert fired == [4, 8, 10]
    c = Cadence(every=100, seconds=30.0, clock=clock)
    fired = []
    for done in range(1, 11):  # 13 s per unit: the time decides, the end line comes once
        clock.t += 13.0
        if c.due(done, 10):
            fired.append(done)
    assert fired == [3, 6, 9, 10]
    assert not c.due(10, 10)  # nothing new, no time passed


def test_cadence_time_lines_without_new_units():
    """A sweep's trials run for minutes: lines keep coming while nothing finishes."""
    clock = FakeClock()
    c = Cadence(every=1, seconds=30.0, clock=clock)
    fired = []
    for _ in range(7):
        clock.t += 10.0
        fired.append(c.due(0, 4))
    assert fired == [False, False, True, False, False, True, False]


def test_figures():
    assert duration(float("nan")) == "?"
    assert duration(187) == "3m07s" and duration(3720) == "1h02m"
    assert rate(12_345_678, "B/s") == "12.3 MB/s" and rate(0.5, "B/s") == "0.5 B/s"
    assert eta(10.0, 2, 6) == 20.0 and eta(10.0, 0, 6) != eta(10.0, 0, 6)  # NaN
    out = io.StringIO()
    say("x: a | b", out)
    assert out.getvalue() == "x: a | b\n"
