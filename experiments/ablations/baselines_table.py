"""The table of the baselines ablation (baselines.yaml): each variant at its best learning rate.

``python experiments/ablations/baselines_table.py [sweep.yaml] [--markdown]``

Per variant (byte Transformer, BPE at two vocabularies, AU-Net 2, AU-Net 3), the trial with the
lowest final val bits/byte among its learning rates (the sweep's own metric) gives the row:
parameters, training FLOPs, bytes seen (a BPE model's tokens x the training split's bytes per
token), the final val bits/byte on the dataset's val split, and the end-of-trial eval suite's
bits/byte on the held-out documents, overall and per language (MLflow metrics
``eval/val/<lang>/bits_per_byte``), then the best lr and the val bits/byte at every lr. Reads the
sweep's trial records, the dataset manifests and MLflow; runs nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipelines import tables as tb
from pipelines.data import read_manifest
from pipelines.paths import join_path
from pipelines.sweep_spec import load_sweep
from pipelines.tracking import get_run

LANGS = ("en", "de", "fr", "ru", "ja", "zh")


def rows(path: str) -> tuple[list[dict[str, Any]], list[tb.Column]]:
    """One row per variant (the sweep's ``variant`` choices, in order) and the table's columns."""
    spec, sweep = load_sweep(path)
    sweep_dir = Path(join_path(spec.resources.storage_path, "sweeps", sweep.name))
    trials: dict[str, list[dict[str, Any]]] = {}
    for p in sorted((sweep_dir / "trials").glob("*.json")):
        rec = json.loads(p.read_text())
        trials.setdefault(rec["config"]["variant"], []).append(rec)
    lrs = sorted({float(r["config"]["train.lr"]) for recs in trials.values() for r in recs})
    choices = next(d for d in sweep.dims if d.key == "variant").choices or {}
    out = []
    for variant, overrides in choices.items():
        done = [r for r in trials.get(variant, []) if r.get("val_bits_per_byte") is not None]
        row: dict[str, Any] = {"variant": variant}
        for r in done:
            row[f"lr{float(r['config']['train.lr']):g}"] = r["val_bits_per_byte"]
        if done:
            best = min(done, key=lambda r: r["val_bits_per_byte"])
            metrics = get_run(spec.tracking.tracking_uri, best["mlflow_run_id"]).data.metrics
            v = spec.with_overrides(overrides)
            manifest = read_manifest(v.dataset_dir())
            row.update(
                params=best["num_params"],
                flops=best["flops"],
                bytes=metrics.get("train/bytes_seen"),
                bpt=(manifest.get("bytes_per_token") or {}).get("all", 1.0),
                steps=best["final_step"],
                val=best["val_bits_per_byte"],
                eval=metrics.get("eval/val/bits_per_byte"),
                lr=float(best["config"]["train.lr"]),
                **{g: metrics.get(f"eval/val/{g}/bits_per_byte") for g in LANGS},
            )
        out.append(row)
    bpb = tb.fixed(3)
    cols = [
        tb.Column("variant", "variant"),
        tb.Column("params", "params", tb.count),
        tb.Column("flops", "FLOPs", tb.sig(3)),
        tb.Column("bytes", "bytes seen", tb.sig(3)),
        tb.Column("bpt", "bytes/token", tb.fixed(2)),
        tb.Column("steps", "steps"),
        tb.Column("lr", "best lr", tb.sig(2)),
        tb.Column("val", "val bpb", bpb),
        tb.Column("eval", "held-out bpb", bpb),
        *(tb.Column(g, g, bpb) for g in LANGS),
        *(tb.Column(f"lr{lr:g}", f"val bpb @ lr {lr:g}", bpb) for lr in lrs),
    ]
    return out, cols


def markdown(table: list[dict[str, Any]], cols: list[tb.Column]) -> str:
    lines = ["| " + " | ".join(c.header for c in cols) + " |"]
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    lines += ["| " + " | ".join(c.text(r) for c in cols) + " |" for r in table]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    path = args[0] if args else str(Path(__file__).with_name("baselines.yaml"))
    table, cols = rows(path)
    print(markdown(table, cols) if "--markdown" in argv else tb.render_text(table, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
