"""The table of the multilingual splitting ablation (split_multilingual.yaml).

``python experiments/ablations/split_multilingual_table.py [sweep.yaml]``

Per variant: the measured bytes per stage-s position on its dataset (the manifest's
``contraction``; the entropy variant's thresholds in bits too), training steps, the final val
bits/byte on the dataset's own val split, and the end-of-trial eval suite's bits/byte on the
held-out documents, overall and per language (MLflow metrics ``eval/val/<lang>/bits_per_byte``
of each trial's run). Reads the sweep's trial records, the dataset manifests and MLflow; runs
nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipelines.data import read_manifest
from pipelines.paths import join_path
from pipelines.sweep_spec import categorical_grid, load_sweep
from pipelines.tracking import get_run

LANGS = ("zh", "ja", "en", "de", "fr", "ru")


def main(argv: list[str]) -> int:
    path = argv[0] if argv else str(Path(__file__).with_name("split_multilingual.yaml"))
    spec, sweep = load_sweep(path)
    sweep_dir = Path(join_path(spec.resources.storage_path, "sweeps", sweep.name))
    records = {}
    for p in sorted((sweep_dir / "trials").glob("*.json")):
        rec = json.loads(p.read_text())
        records[rec["variant"]] = rec
    head = ["variant", "bytes/pos s1", "bytes/pos s2", "steps", "val bpb", "eval bpb"]
    rows = [[*head, *LANGS]]
    notes = []
    for config in categorical_grid(sweep):
        label = sweep.label(config)
        v = spec.with_overrides(sweep.overrides(config))
        manifest = read_manifest(v.dataset_dir())
        rec = records.get(label, {})
        metrics = {}
        if rec.get("mlflow_run_id"):
            metrics = get_run(spec.tracking.tracking_uri, rec["mlflow_run_id"]).data.metrics
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        rows.append(
            [
                label.split("=", 1)[1],
                *(fmt(c) for c in manifest["contraction"]),
                str(rec.get("final_step") or rec.get("steps") or "-"),
                fmt(rec.get("val_bits_per_byte")),
                fmt(metrics.get("eval/val/bits_per_byte")),
                *(fmt(metrics.get(f"eval/val/{g}/bits_per_byte")) for g in LANGS),
            ]
        )
        for k, st in (manifest.get("entropy") or {}).get("stages", {}).items():
            notes.append(f"{label}: {k} {st['target']} -> t={st['threshold_bits']} bits")
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) + len(LANGS))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for n in notes:
        print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
