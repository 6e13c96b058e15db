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
from pipelines import tables as tb
from pipelines import tracking
from pipelines.paths import redact
from pipelines.report_figures import plot_contraction, plot_loss_vs_compute, plot_training_curves
from pipelines.results import final_val_bpb, run_metric
from pipelines.tables import Column

TAG_PREFIX = "aunet."


# ---------------------------------------------------------------------------------- tables
UNITS_NOTE = (
    "The batch-size and learning-rate formulas BSZ = 0.66 C^0.321 and LR = 6.6 C^-0.176 are "
    "quoted from the paper; they are in neither the official code nor its configs and their "
    "units are UNVERIFIED (docs/flops.md). C is training FLOPs (forward + backward) as counted by "
    "aunet.flops (flops_per_byte x training bytes) and BSZ is in bytes per optimizer step."
)
BPB = tb.fixed(4)
FIT_COLUMNS = (
    Column("variant", "variant"),
    Column("runs", "runs"),
    Column("budgets", "budgets"),
    Column("E", "E (bits/byte)", BPB),
    Column("E_sd", "± E", BPB),
    Column("A", "A (bits/byte·FLOPs^α)", tb.sig(3)),
    Column("A_sd", "± A", tb.sig(3)),
    Column("alpha", "α", BPB),
    Column("alpha_sd", "± α", BPB),
    Column("r2", "R²", BPB),
    Column("loss_at_10x", "L(10·C_max) (bits/byte)", BPB),
    Column("loss_at_100x", "L(100·C_max) (bits/byte)", BPB),
    Column("status", "status"),
)
RUN_COLUMNS = (
    Column("variant", "variant"),
    Column("budget", "budget (FLOPs)", tb.sig(3)),
    Column("C", "C (FLOPs)", tb.sig(4)),
    Column("params", "params", tb.count),
    Column("bytes", "bytes seen", tb.sig(3)),
    Column("lr", "lr", tb.sig(3)),
    Column("batch_bytes", "batch (bytes/step)", tb.count),
    Column("loss", "val (bits/byte)", BPB),
    Column("run_id", "MLflow run", link="link"),
)
VS_COLUMNS = (
    Column("budget", "budget (FLOPs)", tb.sig(3)),
    Column("variant", "variant"),
    Column("loss", "val (bits/byte)", BPB),
    Column("baseline_loss", "baseline (bits/byte)", BPB),
    Column("delta", "Δ (bits/byte)", lambda v: f"{float(v):+.4f}"),
    Column("ratio", "Δ (%)", tb.signed_pct),
)
OPTIMA_COLUMNS = (
    Column("variant", "variant"),
    Column("budget", "budget (FLOPs)", tb.sig(3)),
    Column("N_opt", "N* (params)", tb.sig(3)),
    Column("D_opt", "D* (bytes)", tb.sig(3)),
    Column("loss_opt", "L* (bits/byte)", BPB),
)


def contraction_rows(contraction: Mapping[str, Sequence[float]]) -> tuple[list[dict], list[Column]]:
    """Bytes per token of each pooling stage, for variants that pool (a byte model's only stage
    is the bytes themselves, 1.00 by definition, which says nothing)."""
    pooled = {v: c for v, c in contraction.items() if len(c) > 1}
    depth = max((len(c) for c in pooled.values()), default=1)
    cols = [Column("variant", "variant")] + [
        Column(f"stage{s}", f"stage {s} (bytes/token)", tb.fixed(2)) for s in range(1, depth)
    ]
    rows = [
        {"variant": v, **{f"stage{s}": x for s, x in enumerate(c) if s}} for v, c in pooled.items()
    ]
    return rows, cols


def report_tables(
    rows: Sequence[Mapping[str, Any]],
    points: Sequence[Mapping[str, Any]],
    extra: Mapping[str, Any],
    contraction: Mapping[str, Sequence[float]],
) -> list[tuple[str, str, list[Mapping[str, Any]], Sequence[Column], str]]:
    """(caption, label, rows, columns, note) of every table the report shows, in page order."""
    variants = list(dict.fromkeys(p["variant"] for p in points))
    baseline = ft.baseline_variant(variants)
    vs = ft.versus_baseline(ft.frontier_points(points), baseline)
    optima = [
        {"variant": v, **o} for v, co in extra["compute_optimal"].items() for o in co["optima"]
    ]
    c_rows, c_cols = contraction_rows(contraction)
    out = [
        (
            "Fits L(C) = E + A·C^-α of the best run per (variant, budget)",
            "tab:fits",
            list(rows),
            FIT_COLUMNS,
            "± columns are bootstrap standard deviations over runs; predictions only for fits "
            "with enough budgets and R² above the threshold, else n/a (reason).",
        ),
        (
            f"Each variant vs {baseline} at equal training FLOPs",
            "tab:vs-baseline",
            vs,
            VS_COLUMNS,
            f"Δ < 0: better than {baseline}. Best run per (variant, budget).",
        ),
        (
            "Runs",
            "tab:runs",
            [dict(p) for p in sorted(points, key=lambda q: (q["variant"], q["C"]))],
            RUN_COLUMNS,
            "MLflow run ids link to the tracking server's run page when the store is a server.",
        ),
        (
            "Compute-optimal model size and data per budget",
            "tab:optima",
            optima,
            OPTIMA_COLUMNS,
            "Needs >= 3 model sizes per budget (study.size_factors).",
        ),
    ]
    if c_rows:
        out.append(
            (
                "Measured per-stage contraction",
                "tab:contraction",
                c_rows,
                c_cols,
                "From the runs' train/tokens_total/stage* metrics; byte models left out (1.00).",
            )
        )
    return out


def refit_text(extra: Mapping[str, Any]) -> str:
    lines = []
    for key, name in (("lr_refit", "lr"), ("batch_refit", "batch (bytes/step)")):
        r = extra.get(key)
        if not r:
            lines.append(f"{name}: no variation in the grid (set study.lr_factors to refit it)")
            continue
        best = ", ".join(
            f"{b['variant']}@{b['budget']:.3g}: {list(b.values())[-1]:.3g}" for b in r["best"]
        )
        f = r.get("fit")
        law = f"{name}* = {f['k']:.3g}·C^{f['b']:+.3f}" if f else f"{name}*: fewer than 2 budgets"
        lines.append(f"{law} (best per cell: {best})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- HTML
def render_html(
    title: str,
    provenance: Mapping[str, str],
    tables: Sequence[tuple[str, str, Sequence[Mapping[str, Any]], Sequence[Column], str]],
    cross: Sequence[Mapping[str, Any]],
    images: Mapping[str, Path],
    sections: Mapping[str, str],
) -> str:
    """One HTML page with everything inlined (PNG as base64): it opens anywhere, offline."""
    esc = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ccc;"
        "padding:3px 6px}td{text-align:right}img{max-width:100%}"
        ".warn{background:#fff3cd;padding:.5em}.prov th{text-align:left}</style>",
        f"</head><body><h1>{esc(title)}</h1>",
        tb.provenance_html(provenance),
        f"<p class='warn'><b>Units unverified.</b> {esc(UNITS_NOTE)}</p>",
    ]
    for i, (caption, _label, rows, cols, note) in enumerate(tables):
        parts.append(f"<h2>{esc(caption)}</h2><p>{esc(note)}</p>")
        parts.append(tb.render_html(rows, cols) if rows else "<p>(none)</p>")
        if i == 0:
            items = "".join(
                f"<li>{esc(' vs '.join(c['variants']))}: C = {c['C']:.3g} FLOPs "
                f"(loss {c['loss']:.4f} bits/byte; {esc(c['better_above'])} better above"
                f"{', extrapolated' if c['extrapolated'] else ''})</li>"
                for c in cross
            )
            none = "<p>none between valid fits in the plotted range.</p>"
            parts.append(f"<h3>Crossover compute</h3>{f'<ul>{items}</ul>' if cross else none}")
    for caption, path in images.items():
        parts.append(f"<h2>{esc(caption)}</h2>{_img(path)}")
        parts.append(f"<p>Vector versions: {esc(path.stem)}.svg, {esc(path.stem)}.pdf</p>")
    for head, text in sections.items():
        parts.append(f"<h2>{esc(head)}</h2><pre>{esc(text)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_latex(
    title: str,
    provenance: Mapping[str, str],
    tables: Sequence[tuple[str, str, Sequence[Mapping[str, Any]], Sequence[Column], str]],
) -> str:
    """Every non-empty table as a booktabs ``table`` float, provenance as comments."""
    parts = [f"% {title}\n", tb.provenance_latex(provenance)]
    for caption, label, rows, cols, _note in tables:
        if rows:
            parts.append("\n" + tb.render_latex(rows, cols, caption, label))
    return "".join(parts)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


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
        bpb = final_val_bpb(r)
        if r.info.status != "FINISHED" or cell in seen or bpb is None:
            continue
        seen.add(cell)
        steps, C = int(float(p["plan.steps"])), float(p["plan.total_flops"])
        K = int(float(p.get("derived.pooling_stages", p.get("derived.num_stages", 0))))
        tok = [run_metric(m, f"train/tokens_total/stage{s}") for s in range(K + 1)]
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
            "loss": bpb,
            "contraction": contraction,
            "run_id": r.info.run_id,
            "link": tb.run_link(uri, r.info.experiment_id, r.info.run_id),
            "git_commit": t.get("git_commit"),
            "spec_file": t.get(f"{TAG_PREFIX}experiment_file"),
            "dataset": t.get(f"{TAG_PREFIX}dataset_hash"),
        }
        points.append(point)
        per_step = C / steps
        hist = {  # an old run's training loss is "loss" (before the train/ group, issue 20)
            k: [(step * per_step, v) for step, v in tracking.metric_history(uri, r.info.run_id, k)]
            for k in ("train/loss", "val/bits_per_byte")
        }
        hist["train/loss"] = hist["train/loss"] or [
            (step * per_step, v) for step, v in tracking.metric_history(uri, r.info.run_id, "loss")
        ]
        bpt = float(p.get("plan.bytes_per_token", 1.0))  # a BPE run's loss is per token: per byte
        hist["train/loss"] = [(c, v / bpt) for c, v in hist["train/loss"]]
        curves.append(
            {
                "variant": point["variant"],
                "budget": point["budget"],
                "train": sorted(hist["train/loss"]),
                "val": sorted(hist["val/bits_per_byte"]),
            }
        )
    points.sort(key=lambda q: (q["variant"], q["C"]))
    return points, curves


def build_report(
    uri: str,
    experiment: str,
    study: str,
    out: Path,
    fit: Mapping[str, Any],
    spec_file: str | None = None,
) -> dict[str, Any]:
    """Fit, plot and write the report files; log them to a report run. Returns the fit rows.

    Files: report.html (self-contained), tables.tex (booktabs), fits.csv, fits.json, and every
    figure as PNG, SVG and PDF."""
    points, curves = collect_points(uri, experiment, study)
    if not points:
        raise LookupError(f"no finished runs tagged aunet.study={study!r} in {experiment!r}")
    out.mkdir(parents=True, exist_ok=True)
    variants = list(dict.fromkeys(p["variant"] for p in points))
    fits, frontier = {}, ft.frontier_points(points)
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
    contraction = {}
    for v in variants:
        cs = [p["contraction"] for p in points if p["variant"] == v and p["contraction"]]
        if cs:
            contraction[v] = [float(x) for x in np.mean(np.array(cs), axis=0)]
    images = {
        "Loss vs compute": out / "loss_vs_compute.png",
        "Training curves per budget": out / "training_curves.png",
    }
    plot_loss_vs_compute(points, fits, images["Loss vs compute"], title)
    plot_training_curves(curves, images["Training curves per budget"], variants)
    pooled = {v: c for v, c in contraction.items() if len(c) > 1}
    if pooled:  # a byte model's 1.00 alone is a chart that says nothing
        images["Per-stage contraction"] = out / "contraction.png"
        plot_contraction(pooled, images["Per-stage contraction"])
    extra = {
        "compute_optimal": {
            v: ft.compute_optimal([p for p in points if p["variant"] == v]) for v in variants
        },
        "lr_refit": ft.hyperparam_refit(points, "lr"),
        "batch_refit": ft.hyperparam_refit(points, "batch_bytes"),
    }
    prov = tb.provenance(
        study=study,
        experiment=experiment,
        **{"tracking store": redact(uri)},
        **{"spec file": spec_file or {p["spec_file"] for p in points}},
        **{"dataset hash": {p["dataset"] for p in points}},
        **{"runs' code": {p["git_commit"] for p in points}},
    )
    tables = report_tables(rows, points, extra, contraction)
    sections = {
        "Batch size / learning rate refit": refit_text(extra),
        "Fit settings": "\n".join(f"{k}: {v}" for k, v in fit.items()),
    }
    (out / "report.html").write_text(render_html(title, prov, tables, cross, images, sections))
    (out / "tables.tex").write_text(render_latex(title, prov, tables))
    ft.write_csv(rows, out / "fits.csv")
    result = {
        "study": study,
        "experiment": experiment,
        "provenance": prov,
        "fits": rows,
        "fit_details": {v: f.to_dict() for v, f in fits.items()},
        "crossovers": cross,
        **extra,
        "contraction": contraction,
        "versus_baseline": tables[1][2],
        "points": points,
        "units_note": UNITS_NOTE,
    }
    (out / "fits.json").write_text(json.dumps(result, indent=1, default=str))
    result["report_run_id"] = _log_report(uri, experiment, study, out, rows)
    result["table"] = tb.render_text(rows, FIT_COLUMNS[:-1]) + "".join(
        f"\n{r['variant']}: {r['status']}" for r in rows
    )
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
