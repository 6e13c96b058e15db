"""Scaling-law fits: loss vs compute with bootstrap errors, crossovers, compute-optimal sizes.

Why it is built this way:
- Loss vs compute follows ``L(C) = E + A * C^-alpha``. Fitting it on raw C is ill-conditioned (C
  spans orders of magnitude, A is huge), so the fit runs on ``x = ln(C / C0)`` (C0 the geometric
  mean of the points) with residuals in ``ln L`` and reports A back in FLOP units.
- Uncertainties come from a bootstrap over runs (case resampling), the only error estimate that
  does not assume the law is right; draws with fewer than 3 distinct budgets are skipped.
- A fit never extrapolates silently: too few budgets or an R^2 under the threshold turn every
  prediction into ``n/a (reason)`` in the table rows (and so in the CSV, JSON and HTML).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class PowerLawFit:
    """``L(C) = E + A C^-alpha``; ``*_sd`` are bootstrap standard deviations."""

    n_points: int
    n_budgets: int
    C_min: float
    C_max: float
    E: float = math.nan
    A: float = math.nan
    alpha: float = math.nan
    E_sd: float = math.nan
    A_sd: float = math.nan
    alpha_sd: float = math.nan
    r2: float = math.nan
    n_boot: int = 0
    valid: bool = False
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    boot: np.ndarray | None = field(default=None, repr=False)  # (n_boot, 3): E, A, alpha

    def predict(self, C: np.ndarray | float) -> np.ndarray:
        return self.E + self.A * np.asarray(C, dtype=float) ** -self.alpha

    def band(self, C: np.ndarray, q: tuple[float, float] = (2.5, 97.5)) -> np.ndarray | None:
        """(2, len(C)) percentile band of the bootstrap curves, None without draws."""
        if self.boot is None or len(self.boot) < 10:
            return None
        E, A, a = (self.boot[:, i : i + 1] for i in range(3))
        curves = E + A * np.asarray(C, dtype=float)[None, :] ** -a
        return np.percentile(curves, q, axis=0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("boot")
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()
        }


def _model(x: np.ndarray, E: float, a: float, alpha: float) -> np.ndarray:
    """ln L at x = ln(C/C0); ``a`` = ln of the amplitude at C0."""
    return np.log(E + np.exp(a - alpha * x))


def _starts(x: np.ndarray, L: np.ndarray) -> list[tuple[float, float, float]]:
    """Initial guesses: E a fraction of the lowest loss, (a, alpha) from a line through the rest."""
    out = []
    for frac in (0.0, 0.5, 0.9):
        E0 = frac * L.min()
        slope, icpt = np.polyfit(x, np.log(np.maximum(L - E0, 1e-12)), 1)
        out.append((E0, float(icpt), float(np.clip(-slope, 1e-3, 4.0))))
    return out


def _fit_once(
    x: np.ndarray, y: np.ndarray, start: tuple[float, float, float] | None = None
) -> tuple[float, float, float] | None:
    """Least squares in ln L from ``start``, else from a few starts (the objective has flat
    valleys); None if all fail."""
    from scipy.optimize import curve_fit

    L = np.exp(y)
    best, best_sse = None, math.inf
    for p0 in [start] if start is not None else _starts(x, L):
        p0 = (min(p0[0], 0.999 * L.max()), p0[1], p0[2])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p, _ = curve_fit(
                    _model,
                    x,
                    y,
                    p0=p0,
                    bounds=([0.0, -60.0, 0.0], [L.max(), 60.0, 5.0]),
                    maxfev=20000,
                )
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((_model(x, *p) - y) ** 2))
        if np.all(np.isfinite(p)) and sse < best_sse:
            best, best_sse = (float(p[0]), float(p[1]), float(p[2])), sse
    return best


def fit_power_law(
    C: Sequence[float],
    L: Sequence[float],
    *,
    budgets: Sequence[float] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    r2_threshold: float = 0.9,
    min_budgets: int = 3,
) -> PowerLawFit:
    """Fit ``L = E + A C^-alpha`` to runs (C in FLOPs); ``budgets`` (nominal, one per run) count
    the distinct budgets, else the distinct C values do."""
    C_arr, L_arr = np.asarray(C, dtype=float), np.asarray(L, dtype=float)
    if C_arr.shape != L_arr.shape or np.any(C_arr <= 0) or np.any(L_arr <= 0):
        raise ValueError("fit_power_law: C and L must be equal-length positive sequences")
    groups = np.asarray(budgets if budgets is not None else C_arr, dtype=float)
    n_budgets = len(np.unique(groups))
    lo, hi = (float(C_arr.min()), float(C_arr.max())) if C_arr.size else (math.nan, math.nan)
    fit = PowerLawFit(len(C_arr), n_budgets, lo, hi)
    if n_budgets < 3:
        fit.reason = f"{n_budgets} budget{'s' if n_budgets != 1 else ''} (< 3): no fit"
        return fit
    C0 = float(np.exp(np.mean(np.log(C_arr))))
    x, y = np.log(C_arr / C0), np.log(L_arr)
    p = _fit_once(x, y)
    if p is None:
        fit.reason = "the least-squares fit did not converge"
        return fit
    E, a, alpha = p
    fit.E, fit.A, fit.alpha = E, math.exp(a) * C0**alpha, alpha
    pred = fit.predict(C_arr)
    ss_tot = float(np.sum((L_arr - L_arr.mean()) ** 2))
    fit.r2 = 1.0 - float(np.sum((L_arr - pred) ** 2)) / ss_tot if ss_tot > 0 else math.nan
    if len(C_arr) <= 3:
        fit.notes.append(
            "3 points for 3 parameters: no residual degree of freedom tests the law, "
            "and every bootstrap draw is the same 3 points (sd ~ 0)"
        )
    if E <= 1e-9:
        fit.notes.append("E at its bound 0: a pure power law over this range")
    if alpha >= 5.0 - 1e-6:
        fit.notes.append("alpha at its bound 5")
    rng = np.random.default_rng(seed)
    draws, attempts = [], 0
    while len(draws) < bootstrap and attempts < 5 * bootstrap:
        attempts += 1
        idx = rng.integers(0, len(C_arr), len(C_arr))
        if len(np.unique(groups[idx])) < 3:
            continue
        q = _fit_once(x[idx], y[idx], p) or _fit_once(x[idx], y[idx])
        if q is not None:
            draws.append((q[0], math.exp(q[1]) * C0 ** q[2], q[2]))
    if len(draws) >= 2:
        fit.boot = np.array(draws)
        fit.n_boot = len(draws)
        fit.E_sd, fit.A_sd, fit.alpha_sd = (float(s) for s in fit.boot.std(axis=0, ddof=1))
    if bootstrap and fit.n_boot < bootstrap:
        fit.notes.append(f"bootstrap: {fit.n_boot} of {bootstrap} draws usable")
    if n_budgets < min_budgets:
        fit.reason = f"{n_budgets} budgets (< {min_budgets})"
    elif not fit.r2 >= r2_threshold:
        fit.reason = f"R^2 {fit.r2:.3f} < {r2_threshold:g}"
    fit.valid = fit.reason is None
    return fit


def prediction(fit: PowerLawFit, C: float) -> float | str:
    """The predicted loss at C, or ``n/a (reason)`` when the fit may not extrapolate."""
    if not fit.valid:
        return f"n/a ({fit.reason})"
    return float(fit.predict(C))


def _gap(t: float, fa: PowerLawFit, fb: PowerLawFit) -> float:
    return float(fa.predict(math.exp(t)) - fb.predict(math.exp(t)))


def crossovers(fits: Mapping[str, PowerLawFit], C_lo: float, C_hi: float) -> list[dict[str, Any]]:
    """Compute values where two valid fitted curves cross within [C_lo, C_hi] (brentq refined)."""
    from scipy.optimize import brentq

    names = [n for n, f in fits.items() if f.valid]
    grid = np.logspace(math.log10(C_lo), math.log10(C_hi), 400)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            fa, fb = fits[a], fits[b]
            d = fa.predict(grid) - fb.predict(grid)
            for j in np.nonzero(np.sign(d[:-1]) * np.sign(d[1:]) < 0)[0]:
                lo, hi = math.log(grid[j]), math.log(grid[j + 1])
                lc = brentq(_gap, lo, hi, args=(fa, fb))
                c = math.exp(lc)
                better = a if float(fa.predict(c * 1.01)) < float(fb.predict(c * 1.01)) else b
                out.append(
                    {
                        "variants": [a, b],
                        "C": c,
                        "loss": float(fa.predict(c)),
                        "better_above": better,
                        "extrapolated": c > max(fa.C_max, fb.C_max),
                    }
                )
    return out


def loglinear(x: Sequence[float], y: Sequence[float]) -> dict[str, float] | None:
    """``y = k x^b`` by least squares in log-log; None under 2 distinct x."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(np.unique(lx)) < 2:
        return None
    b, lk = np.polyfit(lx, ly, 1)
    return {"k": float(math.exp(lk)), "b": float(b), "n": len(lx)}


def compute_optimal(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per budget with >= 3 model sizes: the loss-minimising N (parabola in ln N) and D; then
    ``N*(C)`` and ``D*(C)`` power laws over budgets (Chinchilla's approach 2)."""
    by_budget: dict[float, list[Mapping[str, Any]]] = {}
    for p in points:
        by_budget.setdefault(float(p["budget"]), []).append(p)
    optima = []
    for budget, ps in sorted(by_budget.items()):
        lN = np.log([float(p["params"]) for p in ps])
        if len(np.unique(lN)) < 3:
            continue
        c2, c1, c0 = np.polyfit(lN, [float(p["loss"]) for p in ps], 2)
        if c2 <= 0:
            continue
        v = -c1 / (2 * c2)
        if not lN.min() <= v <= lN.max():  # the optimum lies outside the sizes tried
            continue
        slope, icpt = np.polyfit(lN, np.log([float(p["bytes"]) for p in ps]), 1)
        optima.append(
            {
                "budget": budget,
                "N_opt": math.exp(v),
                "D_opt": math.exp(icpt + slope * v),
                "loss_opt": float(c0 + c1 * v + c2 * v * v),
            }
        )
    out: dict[str, Any] = {"optima": optima}
    if len(optima) >= 2:
        C = [o["budget"] for o in optima]
        out["N_opt"] = loglinear(C, [o["N_opt"] for o in optima])
        out["D_opt"] = loglinear(C, [o["D_opt"] for o in optima])
    return out


def hyperparam_refit(points: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any] | None:
    """Best ``key`` (lr or batch bytes) per (variant, budget) with >= 2 values tried, then
    ``key* = k C^b`` over budgets; None when the grid has no variation in ``key``."""
    cells: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for p in points:
        cells.setdefault((str(p["variant"]), float(p["budget"])), []).append(p)
    best = []
    for (variant, budget), ps in sorted(cells.items()):
        if len({float(p[key]) for p in ps}) >= 2:
            b = min(ps, key=lambda p: float(p["loss"]))
            best.append({"variant": variant, "budget": budget, key: float(b[key])})
    if not best:
        return None
    return {"best": best, "fit": loglinear([b["budget"] for b in best], [b[key] for b in best])}


# ---------------------------------------------------------------------------------- tables
TABLE_KEYS = (
    "variant",
    "runs",
    "budgets",
    "E",
    "E_sd",
    "A",
    "A_sd",
    "alpha",
    "alpha_sd",
    "r2",
    "loss_at_10x",
    "loss_at_100x",
    "status",
)


def fit_rows(fits: Mapping[str, PowerLawFit], C_ref: float) -> list[dict[str, Any]]:
    """One row per variant; predictions at 10x and 100x ``C_ref`` (the largest budget run)."""
    rows = []
    for name, f in fits.items():
        row: dict[str, Any] = {"variant": name, "runs": f.n_points, "budgets": f.n_budgets}
        for k in ("E", "E_sd", "A", "A_sd", "alpha", "alpha_sd", "r2"):
            v = getattr(f, k)
            row[k] = None if not math.isfinite(v) else v
        row["loss_at_10x"] = prediction(f, 10 * C_ref)
        row["loss_at_100x"] = prediction(f, 100 * C_ref)
        row["status"] = "ok" if f.valid else f"no extrapolation: {f.reason}"
        if f.notes:
            row["status"] += "; " + "; ".join(f.notes)
        rows.append(row)
    return rows


def cell_text(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if key in ("runs", "budgets"):
        return str(v)
    if key in ("A", "A_sd"):
        return f"{v:.3g}"
    return f"{v:.4f}"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    keys = [k for k in TABLE_KEYS if k != "status"]
    cells = [[cell_text(k, r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda cs: "  ".join(c.ljust(w) for c, w in zip(cs, widths)).rstrip()  # noqa: E731
    out = [line(keys), line(["-" * w for w in widths]), *map(line, cells)]
    out += [f"{r['variant']}: {r['status']}" for r in rows]
    return "\n".join(out)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(TABLE_KEYS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def frontier_points(points: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The lowest-loss run per (variant, budget): with several sizes or lrs per budget, L(C) is
    the envelope of what each budget can reach, not a cloud of suboptimal runs."""
    best: dict[tuple[str, float], Mapping[str, Any]] = {}
    for p in points:
        key = (p["variant"], p["budget"])
        if key not in best or p["loss"] < best[key]["loss"]:
            best[key] = p
    return list(best.values())


def baseline_variant(variants: Sequence[str]) -> str:
    """The variant named ``baseline`` (the byte Transformer in the shipped specs), else the
    first one."""
    return "baseline" if "baseline" in variants else variants[0]


def versus_baseline(frontier: Sequence[Mapping[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Each variant against the baseline at every budget both reached (best run per cell)."""
    base = {float(p["budget"]): float(p["loss"]) for p in frontier if p["variant"] == baseline}
    rows = []
    for p in sorted(frontier, key=lambda q: (float(q["budget"]), str(q["variant"]))):
        b = base.get(float(p["budget"]))
        if p["variant"] == baseline or b is None:
            continue
        loss = float(p["loss"])
        rows.append(
            {
                "budget": float(p["budget"]),
                "variant": p["variant"],
                "loss": loss,
                "baseline_loss": b,
                "delta": loss - b,
                "ratio": loss / b - 1,
            }
        )
    return rows
