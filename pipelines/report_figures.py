"""The scaling report's figures: loss vs compute with fits, training curves per budget, per-stage
contraction. Each is saved as PNG (inlined in report.html), SVG and PDF (pipelines.tables).

Apart from ``pipelines.report`` (which reads MLflow, fits and writes the page) so that each stays
short; these functions take plain rows and write files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import tables as tb
from pipelines.fitting import PowerLawFit
from pipelines.results import pyplot


def plot_loss_vs_compute(
    points: Sequence[Mapping[str, Any]], fits: Mapping[str, PowerLawFit], path: Path, title: str
) -> None:
    """Final validation bits/byte vs training FLOPs (log-log), fits to 100x the largest C."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    C_all = [float(p["C"]) for p in points]
    grid = np.logspace(math.log10(min(C_all)) - 0.1, math.log10(100 * max(C_all)), 200)
    for i, (name, f) in enumerate(fits.items()):
        col = colors[i % len(colors)]
        ps = [p for p in points if p["variant"] == name]
        ax.scatter([p["C"] for p in ps], [p["loss"] for p in ps], color=col, zorder=3, s=22)
        if not math.isfinite(f.E):
            ax.plot([], [], color=col, label=f"{name}: no fit ({f.reason})")
            continue
        inside = grid <= f.C_max * 1.0001
        label = f"{name}: {f.E:.3f} + {f.A:.3g} C^-{f.alpha:.3f} (R² {f.r2:.3f})"
        ax.plot(grid[inside], f.predict(grid[inside]), color=col, label=label)
        ls = "--" if f.valid else ":"
        ax.plot(grid[~inside], f.predict(grid[~inside]), color=col, ls=ls, alpha=0.8)
        band = f.band(grid)
        if band is not None:
            ax.fill_between(grid, band[0], band[1], color=col, alpha=0.15, lw=0)
        if not f.valid:
            ax.text(
                grid[-1],
                float(f.predict(grid[-1])),
                f" n/a: {f.reason}",
                color=col,
                fontsize=7,
                ha="right",
                va="bottom",
            )
    ax.axvline(max(C_all), color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    readable_log_y(ax)
    ax.set_xlabel("training FLOPs C (aunet.flops accounting)")
    ax.set_ylabel("final validation bits/byte")
    ax.set_title(title, fontsize=10)
    ax.legend(
        fontsize=7,
        loc="upper right",
        title="variant: fit (points: best run per budget)",
        title_fontsize=7,
    )
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    tb.save_figure(fig, path)
    plt.close(fig)


def readable_log_y(ax: Any) -> None:
    """Plain numbers on a log y axis: bits/byte spans less than a decade, where matplotlib's
    default would print one or no label at all."""
    from matplotlib import ticker

    ax.yaxis.set_major_locator(
        ticker.LogLocator(base=10, subs=(1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0))
    )
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def plot_contraction(contraction: Mapping[str, Sequence[float]], path: Path) -> None:
    """Bytes per stage-s token, per variant that pools (stage 0 = bytes = 1)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(contraction)
    depth = max((len(v) for v in contraction.values()), default=0)
    width = 0.8 / max(1, depth)
    for s in range(depth):
        xs = [i + s * width for i, n in enumerate(names) if len(contraction[n]) > s]
        ys = [contraction[n][s] for n in names if len(contraction[n]) > s]
        bars = ax.bar(xs, ys, width, label=f"stage {s}")
        for b, y in zip(bars, ys):
            ax.annotate(
                f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7
            )
    ax.set_xticks([i + width * (depth - 1) / 2 for i in range(len(names))], names)
    ax.set_ylabel("bytes per stage token (measured)")
    ax.set_title("per-stage contraction (from run metrics train/tokens_total/stage*)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tb.save_figure(fig, path)
    plt.close(fig)


def plot_training_curves(
    curves: Sequence[Mapping[str, Any]], path: Path, variants: Sequence[str] | None = None
) -> None:
    """One panel per budget: train loss (bits/byte, thin line) and validation bits/byte
    (markers) vs FLOPs spent, one colour per variant; the legend says which line is which."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    budgets = sorted({float(c["budget"]) for c in curves})
    variants = list(variants or dict.fromkeys(c["variant"] for c in curves))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n = max(1, len(budgets))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, budget in zip(axes.flat, budgets):
        for c in curves:
            if float(c["budget"]) != budget:
                continue
            col = colors[variants.index(c["variant"]) % len(colors)]
            if c["train"]:
                x, y = zip(*c["train"])
                ax.plot(x, np.asarray(y) / math.log(2), color=col, lw=0.8, alpha=0.6)
            if c["val"]:
                x, y = zip(*c["val"])
                ax.plot(x, y, "o-", color=col, ms=3, label=c["variant"])
        ax.set_xscale("log")
        ax.set_title(f"budget {budget:.3g} FLOPs", fontsize=9)
        ax.set_xlabel("FLOPs spent", fontsize=8)
        ax.set_ylabel("bits/byte", fontsize=8)
        handles, _ = ax.get_legend_handles_labels()
        handles += [
            Line2D([], [], color="grey", lw=0.8, alpha=0.6, label="train loss"),
            Line2D([], [], color="grey", marker="o", ms=3, label="validation"),
        ]
        ax.legend(handles=handles, fontsize=7)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(budgets) :]:
        ax.axis("off")
    fig.tight_layout()
    tb.save_figure(fig, path, dpi=110)
    plt.close(fig)
