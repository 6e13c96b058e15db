"""Scaling-study reports: runs read from MLflow, fitted, plotted, written as a self-contained HTML.

Runs are found by their tags only (``aunet.study``, ``aunet.role=cell``; ``pipelines.scaling``
sets them), never from local files, so a report can be built on any machine that reaches the
tracking store. Everything the page shows is also written as files (PNG, CSV, JSON) and logged as
artifacts of a ``report-<study>`` run in the same experiment.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import fitting as ft
from pipelines import tracking
from pipelines.fitting import TABLE_KEYS, PowerLawFit, cell_text
from pipelines.results import pyplot

TAG_PREFIX = "aunet."


# ---------------------------------------------------------------------------------- plots
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
    ax.set_xlabel("training FLOPs C (aunet.flops accounting)")
    ax.set_ylabel("final validation bits/byte")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_contraction(contraction: Mapping[str, Sequence[float]], path: Path) -> None:
    """Bytes per stage-s token, per variant (stage 0 = bytes = 1)."""
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
    ax.set_title("per-stage contraction (from run metrics tokens_total/stage*)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training_curves(
    curves: Sequence[Mapping[str, Any]], path: Path, variants: Sequence[str] | None = None
) -> None:
    """One panel per budget: train loss (bits/byte, thin) and validation bits/byte (markers) vs
    FLOPs spent, one colour per variant."""
    plt = pyplot()
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
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(budgets) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------- HTML
UNITS_NOTE = (
    "The batch-size and learning-rate formulas BSZ = 0.66 C^0.321 and LR = 6.6 C^-0.176 are "
    "quoted from the paper; they are in neither the official code nor its configs and their "
    "units are UNVERIFIED (docs/flops.md). C is training FLOPs (forward + backward) as counted by "
    "aunet.flops (flops_per_byte x training bytes) and BSZ is in bytes per optimizer step."
)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _html_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell_text(k, r.get(k)))}</td>" for k in keys) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(
    title: str,
    rows: Sequence[Mapping[str, Any]],
    cross: Sequence[Mapping[str, Any]],
    images: Mapping[str, Path],
    sections: Mapping[str, str],
    points: Sequence[Mapping[str, Any]],
) -> str:
    """One HTML page with everything inlined (PNG as base64): it opens anywhere, offline."""
    esc = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;"
        "padding:3px 6px}img{max-width:100%}.warn{background:#fff3cd;padding:.5em}</style>",
        f"</head><body><h1>{esc(title)}</h1>",
        f"<p class='warn'><b>Units unverified.</b> {esc(UNITS_NOTE)}</p>",
        "<h2>Fits: L(C) = E + A·C<sup>-alpha</sup></h2>",
        "<p>Loss is the final validation bits/byte of the best run per (variant, budget); C "
        "that run's training FLOPs. Uncertainties "
        "(*_sd) are bootstrap standard deviations over runs. Predictions are given only for fits "
        "with enough budgets and R² above the threshold; otherwise they read n/a (reason).</p>",
        _html_table(rows, TABLE_KEYS),
    ]
    if cross:
        items = "".join(
            f"<li>{esc(' vs '.join(c['variants']))}: C = {c['C']:.3g} FLOPs "
            f"(loss {c['loss']:.4f}; {esc(c['better_above'])} better above"
            f"{', extrapolated' if c['extrapolated'] else ''})</li>"
            for c in cross
        )
        parts.append(f"<h3>Crossover compute</h3><ul>{items}</ul>")
    else:
        parts.append(
            "<h3>Crossover compute</h3><p>none between valid fits in the plotted range.</p>"
        )
    for caption, path in images.items():
        parts.append(f"<h2>{esc(caption)}</h2>{_img(path)}")
    for head, text in sections.items():
        parts.append(f"<h2>{esc(head)}</h2><pre>{esc(text)}</pre>")
    keys = ["variant", "budget", "C", "params", "bytes", "lr", "batch_bytes", "loss", "run_id"]
    pts = [{k: p.get(k) for k in keys} for p in points]
    parts.append("<h2>Runs</h2><pre>" + esc(json.dumps(pts, indent=1, default=str)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------- report
def find_studies(uri: str, experiment: str) -> list[str]:
    filt = f"tags.`{TAG_PREFIX}role` = 'cell'"
    runs = tracking.search_runs(uri, filt, experiment_names=[experiment])
    return sorted({r.data.tags.get(f"{TAG_PREFIX}study", "") for r in runs} - {""})


def collect_points(uri: str, experiment: str, study: str) -> tuple[list[dict], list[dict]]:
    """(points, curves) of the study's finished runs; the latest run per cell wins."""
    filt = f"tags.`{TAG_PREFIX}study` = '{study}' and tags.`{TAG_PREFIX}role` = 'cell'"
    runs = tracking.search_runs(
        uri, filt, experiment_names=[experiment], order_by=["attributes.end_time DESC"]
    )
    points, curves, seen = [], [], set()
    for r in runs:
        t, p, m = r.data.tags, r.data.params, r.data.metrics
        cell = t.get(f"{TAG_PREFIX}cell")
        if r.info.status != "FINISHED" or cell in seen or "final/val_bits_per_byte" not in m:
            continue
        seen.add(cell)
        steps, C = int(float(p["plan.steps"])), float(p["plan.total_flops"])
        K = int(float(p.get("derived.num_stages", 0)))
        tok = [m.get(f"tokens_total/stage{s}") for s in range(K + 1)]
        contraction = [tok[0] / x for x in tok] if all(tok) else None
        point = {
            "variant": t[f"{TAG_PREFIX}variant"],
            "budget": float(t[f"{TAG_PREFIX}budget"]),
            "cell": cell,
            "C": C,
            "params": int(float(p["plan.num_params"])),
            "bytes": steps * float(p["plan.bytes_per_step"]),
            "lr": float(p["plan.lr"]),
            "batch_bytes": float(p["plan.bytes_per_step"]),
            "loss": m["final/val_bits_per_byte"],
            "contraction": contraction,
            "run_id": r.info.run_id,
        }
        points.append(point)
        per_step = C / steps
        hist = {
            k: [(step * per_step, v) for step, v in tracking.metric_history(uri, r.info.run_id, k)]
            for k in ("loss", "val/bits_per_byte")
        }
        curves.append(
            {
                "variant": point["variant"],
                "budget": point["budget"],
                "train": sorted(hist["loss"]),
                "val": sorted(hist["val/bits_per_byte"]),
            }
        )
    points.sort(key=lambda q: (q["variant"], q["C"]))
    return points, curves


def frontier_points(points: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The lowest-loss run per (variant, budget): with several sizes or lrs per budget, L(C) is
    the envelope of what each budget can reach, not a cloud of suboptimal runs."""
    best: dict[tuple[str, float], Mapping[str, Any]] = {}
    for p in points:
        key = (p["variant"], p["budget"])
        if key not in best or p["loss"] < best[key]["loss"]:
            best[key] = p
    return list(best.values())


def build_report(
    uri: str, experiment: str, study: str, out: Path, fit: Mapping[str, Any]
) -> dict[str, Any]:
    """Fit, plot and write the report files; log them to a report run. Returns the fit rows."""
    points, curves = collect_points(uri, experiment, study)
    if not points:
        raise LookupError(f"no finished runs tagged aunet.study={study!r} in {experiment!r}")
    out.mkdir(parents=True, exist_ok=True)
    variants = list(dict.fromkeys(p["variant"] for p in points))
    fits, frontier = {}, frontier_points(points)
    for v in variants:
        ps = [p for p in frontier if p["variant"] == v]
        fits[v] = ft.fit_power_law(
            [p["C"] for p in ps],
            [p["loss"] for p in ps],
            budgets=[p["budget"] for p in ps],
            bootstrap=int(fit["bootstrap"]),
            seed=int(fit["seed"]),
            r2_threshold=float(fit["r2_threshold"]),
            min_budgets=int(fit["min_budgets"]),
        )
    C_max = max(p["C"] for p in points)
    rows = ft.fit_rows(fits, C_max)
    cross = ft.crossovers(fits, min(p["C"] for p in points), 100 * C_max)
    title = f"scaling study {study} ({experiment})"
    images = {
        "Loss vs compute": out / "loss_vs_compute.png",
        "Per-stage contraction": out / "contraction.png",
        "Training curves per budget": out / "training_curves.png",
    }
    plot_loss_vs_compute(points, fits, images["Loss vs compute"], title)
    contraction = {}
    for v in variants:
        cs = [p["contraction"] for p in points if p["variant"] == v and p["contraction"]]
        if cs:
            contraction[v] = [float(x) for x in np.mean(np.array(cs), axis=0)]
    plot_contraction(contraction, images["Per-stage contraction"])
    plot_training_curves(curves, images["Training curves per budget"], variants)
    extra = {
        "compute_optimal": {
            v: ft.compute_optimal([p for p in points if p["variant"] == v]) for v in variants
        },
        "lr_refit": ft.hyperparam_refit(points, "lr"),
        "batch_refit": ft.hyperparam_refit(points, "batch_bytes"),
    }
    sections = {
        "Compute-optimal size and data": json.dumps(extra["compute_optimal"], indent=1)
        + "\n(needs >= 3 model sizes per budget: study.size_factors)",
        "Batch size / learning rate refit": json.dumps(
            {"lr": extra["lr_refit"], "batch_bytes": extra["batch_refit"]}, indent=1
        )
        + "\n(null: the grid has no lr / batch variation; set study.lr_factors to refit LR)",
        "Per-stage contraction (bytes per token)": json.dumps(contraction, indent=1),
        "Fit settings": json.dumps(dict(fit), indent=1),
    }
    (out / "report.html").write_text(render_html(title, rows, cross, images, sections, points))
    ft.write_csv(rows, out / "fits.csv")
    result = {
        "study": study,
        "experiment": experiment,
        "fits": rows,
        "fit_details": {v: f.to_dict() for v, f in fits.items()},
        "crossovers": cross,
        **extra,
        "contraction": contraction,
        "points": points,
        "units_note": UNITS_NOTE,
    }
    (out / "fits.json").write_text(json.dumps(result, indent=1, default=str))
    result["report_run_id"] = _log_report(uri, experiment, study, out, rows)
    result["table"] = ft.format_table(rows)
    return result


def _log_report(uri: str, experiment: str, study: str, out: Path, rows: Sequence[Mapping]) -> str:
    exp_id = tracking.find_experiment(uri, experiment)
    if exp_id is None:
        raise LookupError(f"MLflow experiment {experiment!r} not found")
    tags = {f"{TAG_PREFIX}study": study, f"{TAG_PREFIX}role": "report"}
    run_id = tracking.create_run(uri, exp_id, f"report-{study}", tags)
    metrics = {
        f"{r['variant']}/{k}": r[k]
        for r in rows
        for k in ("E", "A", "alpha", "r2")
        if isinstance(r.get(k), float) and math.isfinite(r[k])
    }
    tracking.log_summary(uri, run_id, files=[out], metrics=metrics, artifact_path="report")
    return run_id
