"""A sweep's results: per-trial records, the ranked table, its CSV, JSON and plot, and the summary
read back from a sweep directory or from MLflow.

Apart from ``pipelines.sweep`` (the Tune program) because the table is read without running
anything (``python -m pipelines.sweep --summary``) and its pieces serve the scaling report too
(``pyplot``). Layout of a sweep directory: ``trials/<trial id>.json`` (the trial's record,
replaced atomically), ``trials/<trial id>.attempts`` (one line per start), ``results.{csv,json,
tex}``, the plot as ``results.{png,svg,pdf}``, ``summary.html`` and ``best.yaml`` once the sweep
has run to the end.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from pipelines import tables as tb
from pipelines.tables import Column

RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id
VAL = "val/bits_per_byte"
OLD_FINAL = "final/val_bits_per_byte"  # runs logged before the metric groups (issue 20)


def final_val_bpb(run: Any) -> float | None:
    """A finished training run's final validation bits/byte (an ``mlflow`` Run), else None.

    Training validates at its last step, so the final value is the latest point of
    ``val/bits_per_byte`` (the value MLflow's runs table shows) once the run is FINISHED, which a
    run is only when all its metrics are stored (docs/platform.md). Runs logged before the
    ``train/``, ``val/``, ``perf/`` groups also have a one-point ``final/val_bits_per_byte``.
    """
    m = run.data.metrics
    if OLD_FINAL in m:
        return float(m[OLD_FINAL])
    return float(m[VAL]) if run.info.status == "FINISHED" and VAL in m else None


def run_metric(metrics: Mapping[str, float], key: str) -> float | None:
    """``metrics[key]``, or for an old run its name before the ``train/`` group (issue 20)."""
    if key in metrics:
        return metrics[key]
    return metrics.get(key.removeprefix("train/"))


COLUMNS = (
    "rank",
    "variant",
    "trial",
    "num_params",
    "steps",
    "batch_size",
    "flops",
    "flops_vs_budget",
    "val_bits_per_byte",
    "status",
    "attempts",
    "wall_s",
    "mlflow_run_id",
)


class Labeler(Protocol):
    """What ``collect`` needs of a sweep: variant names and the direction of its metric."""

    mode: str

    def label(self, config: Mapping[str, Any]) -> str: ...


# ---------------------------------------------------------------------------------- records
def trial_file(sweep_dir: str, trial_id: str, suffix: str) -> Path:
    return Path(sweep_dir) / "trials" / f"{trial_id}{suffix}"


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)  # a reader never sees half a record


def collect(sweep_dir: str, trials: Sequence[Any] | None, sweep: Labeler | None) -> list[dict]:
    """One row per trial from the per-trial records, Tune's statuses when given; ranked."""
    records = {
        p.stem: json.loads(p.read_text()) for p in sorted(Path(sweep_dir, "trials").glob("*.json"))
    }
    items = (
        [(t.trial_id, t) for t in trials] if trials is not None else [(k, None) for k in records]
    )
    rows = []
    for trial_id, t in items:
        rec = records.get(trial_id, {})
        last = (t.last_result or {}) if t is not None else {}
        config = dict(t.config) if t is not None else rec.get("config", {})
        status = rec.get("status", "pending")
        if t is not None and t.status == "ERROR":
            status = "error"
        elif t is not None and t.status == "TERMINATED" and status != "finished":
            status = "stopped early"  # ASHA
        attempts = trial_file(sweep_dir, trial_id, ".attempts")
        budget = rec.get("flop_budget")
        flops = rec.get("flops") if status == "finished" else last.get("flops", rec.get("flops"))
        rows.append(
            {
                "variant": sweep.label(config) if sweep else rec.get("variant"),
                "trial": rec.get("trial", trial_id),
                "num_params": rec.get("num_params"),
                "steps": rec.get("final_step") or last.get("step") or rec.get("steps"),
                "batch_size": rec.get("batch_size"),
                "flops": flops,
                "flops_vs_budget": flops / budget - 1 if flops and budget else None,
                "val_bits_per_byte": rec.get("val_bits_per_byte", last.get("val_bits_per_byte")),
                "status": status,
                "wall_s": rec.get("wall_s"),
                "mlflow_run_id": rec.get("mlflow_run_id"),
                "attempts": len(attempts.read_text().splitlines()) if attempts.is_file() else 0,
                "params": json.dumps({k: v for k, v in sorted(config.items())}),
            }
        )
    return rank(rows, (sweep.mode if sweep else "min"))


def rows_from_runs(runs: Iterable[Any]) -> list[dict[str, Any]]:
    """The table of a sweep that has not finished, from its child runs (``mlflow`` Run objects:
    the ``sweep.*`` and ``plan.*`` params and the final metric each trial logs); ranked."""
    rows = []
    for c in runs:
        p = c.data.params
        config = {
            k[len("sweep.") :]: v
            for k, v in p.items()
            if k.startswith("sweep.") and k != "sweep.variant"
        }
        bpb = final_val_bpb(c)
        flops = float(p["plan.total_flops"]) if "plan.total_flops" in p else None
        rows.append(
            {
                "variant": p.get("sweep.variant") or c.info.run_name,
                "trial": c.info.run_name,
                "num_params": p.get("plan.num_params"),
                "steps": p.get("plan.steps"),
                "flops": flops,
                "val_bits_per_byte": bpb,
                "status": "finished" if bpb is not None else c.info.status.lower(),
                "params": json.dumps(config),
            }
        )
    return rank(rows)


def summary_rows(target: str, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """The table of a sweep dir (its results.csv, else its trial records) or a parent run id."""
    from pipelines import tracking

    d = Path(target)
    if d.is_dir():
        if (d / "results.csv").is_file():
            return read_csv(d / "results.csv")
        if (d / "trials").is_dir():
            return collect(str(d), None, None)
        raise FileNotFoundError(f"{d}: not a sweep directory (no results.csv, no trials/)")
    if not RUN_ID.fullmatch(target):  # a path that is not there: say so, not "no such run"
        raise FileNotFoundError(f"{target}: no such sweep directory (nor an MLflow run id)")
    uri = tracking.cli_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_run_artifact(uri, target, "results.csv", tmp)
        if path is not None:
            return read_csv(path)
    return rows_from_runs(tracking.child_runs(uri, target))  # the sweep has not finished


# ---------------------------------------------------------------------------------- ranking
def rank(rows: list[dict[str, Any]], mode: str = "min") -> list[dict[str, Any]]:
    """Finished trials ranked by final validation bits/byte (1 = best); the rest unranked."""
    done = [r for r in rows if r["status"] == "finished" and r["val_bits_per_byte"] is not None]
    done.sort(key=lambda r: float(r["val_bits_per_byte"]) * (1 if mode == "min" else -1))
    for i, r in enumerate(done, 1):
        r["rank"] = i
    rest = [r for r in rows if r not in done]
    for r in rest:
        r["rank"] = None
    return done + rest


def best_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return next((r for r in rows if r["rank"] == 1), None)


def summary_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The sweep's own numbers for its parent run: trial counts, best value, worst FLOP gap."""
    metrics = {
        "trials_finished": float(sum(r["status"] == "finished" for r in rows)),
        "trials_error": float(sum(r["status"] == "error" for r in rows)),
    }
    best = best_row(rows)
    if best is not None:
        metrics["best_val_bits_per_byte"] = float(best["val_bits_per_byte"])
    devs = [
        abs(r["flops_vs_budget"])
        for r in rows
        if r["status"] == "finished" and r["flops_vs_budget"] is not None
    ]
    if devs:
        metrics["flops_max_deviation"] = float(max(devs))
    return metrics


# ---------------------------------------------------------------------------------- files
def _fmt(key: str, v: Any) -> str:
    if v is None or v == "":
        return "-"
    if key == "flops":
        return f"{float(v):.4g}"
    if key == "flops_vs_budget":
        return f"{float(v):+.2%}"
    if key == "val_bits_per_byte":
        return f"{float(v):.4f}"
    if key == "num_params":
        return f"{int(float(v)):,}"
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    keys = [k for k in (*COLUMNS, "params") if any(k in r for r in rows)]
    keys = [k for k in keys if k != "mlflow_run_id"]
    cells = [[_fmt(k, r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda cs: "  ".join(c.ljust(w) for c, w in zip(cs, widths)).rstrip()  # noqa: E731
    return "\n".join([line(keys), line(["-" * w for w in widths]), *map(line, cells)])


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS, "params"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return [{k: (v if v != "" else None) for k, v in r.items()} for r in csv.DictReader(f)]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (drivers and Ray workers have no
    display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Bar chart of final validation bits/byte per variant (finished trials)."""
    plt = pyplot()
    done = [r for r in rows if r["rank"] is not None]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(done) + 2), 3.5))
    names = [f"{r['variant']}\n{r['trial'][-5:]}" for r in done]
    vals = [float(r["val_bits_per_byte"]) for r in done]
    bars = ax.bar(range(len(done)), vals, color="tab:blue")
    for b, r in zip(bars, done):
        ax.annotate(
            f"{float(r['val_bits_per_byte']):.3f}\n{float(r['flops']):.2g} FLOPs",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xticks(range(len(done)), names, fontsize=7)
    ax.set_ylabel("final validation bits/byte")
    ax.set_title(title, fontsize=9)
    if vals:
        lo, hi = min(vals), max(vals)
        ax.set_ylim(max(0.0, lo - 0.2 * (hi - lo + 0.05)), hi + 0.3 * (hi - lo + 0.05))
    fig.tight_layout()
    tb.save_figure(fig, path)
    plt.close(fig)


SUMMARY_COLUMNS = (
    Column("rank", "rank"),
    Column("variant", "variant"),
    Column("trial", "trial"),
    Column("num_params", "params", tb.count),
    Column("steps", "steps"),
    Column("batch_size", "batch (sequences)"),
    Column("flops", "C (FLOPs)", tb.sig(4)),
    Column("flops_vs_budget", "C vs budget", tb.signed_pct),
    Column("val_bits_per_byte", "val (bits/byte)", tb.fixed(4)),
    Column("status", "status"),
    Column("mlflow_run_id", "MLflow run", link="link"),
)


def write_results(
    rows: Sequence[Mapping[str, Any]],
    out: Path,
    title: str,
    provenance: Mapping[str, Any] | None = None,
) -> list[Path]:
    """results.csv, results.json, results.tex, summary.html and the plot (PNG, SVG, PDF) in
    ``out``; their paths. The summary page is the scaling report's kind of page for a sweep: a
    provenance header, the ranked table with units, the plot inlined."""
    import base64
    import html

    files = [out / "results.csv", out / "results.json", out / "results.png"]
    write_csv(rows, files[0])
    write_json(files[1], rows)
    plot(rows, files[2], title)
    files += [out / "results.svg", out / "results.pdf"]
    prov = tb.provenance(**dict(provenance or {}))
    table = [{**r, "link": r.get("link")} for r in rows]
    (out / "results.tex").write_text(
        f"% {title}\n"
        + tb.provenance_latex(prov)
        + tb.render_latex(table, SUMMARY_COLUMNS, title, "tab:sweep")
    )
    png = base64.b64encode(files[2].read_bytes()).decode("ascii")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ccc;"
        "padding:3px 6px}img{max-width:100%}.prov th{text-align:left}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{tb.provenance_html(prov)}"
        f"<h2>Trials, ranked</h2>{tb.render_html(table, SUMMARY_COLUMNS)}"
        f'<h2>Final validation bits/byte</h2><img alt="results" src="data:image/png;base64,{png}">'
        "<p>Vector versions: results.svg, results.pdf; LaTeX: results.tex.</p></body></html>"
    )
    (out / "summary.html").write_text(page)
    return files + [out / "results.tex", out / "summary.html"]
