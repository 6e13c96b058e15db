"""Steady-state training throughput of the quickstart AU-Net through the real pipeline (Ray Train).

    python tests/benchmarks/train.py [--steps 40] [--variant aunet2] [--workers 1 2]

For each worker count, one ``pipelines.train.train`` run of the quickstart spec (FSDP over gloo,
MLflow on, one checkpoint and evaluation at the end only) on the shipped corpus. From rank 0's
``steps.jsonl`` it reports, over the steady-state steps (the first 5 and the last are left out:
warm-up, and the final evaluation/checkpoint):
- bytes/s: global training bytes per second of wall time, median over steps;
- overhead: the fraction of step wall time spent outside forward/backward/optimizer, i.e. data
  loading plus everything between two steps (metric all-reduce, MLflow queueing, the step log,
  ``ray.train.report``), summed over the steps. Target: under 10 %.
1 worker gets both cores (2 threads); 2 workers get one core each. The box is shared: run it
alone, and read the figures as a lower bound when the load average is above 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def measure(workers: int, steps: int, variant: str, root: Path) -> dict:
    from pipelines.spec import load_spec
    from pipelines.train import train

    spec = load_spec(
        REPO / "experiments" / "quickstart.yaml",
        [
            f"train.steps={steps}",
            f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}",
            f"resources.num_workers={workers}",
            f"resources.cpus_per_worker={2 // workers}",
            f"resources.storage_path={root}",
            f"tracking.tracking_uri=sqlite:///{root}/mlruns.db",
            f"tracking.artifact_location={root}/artifacts",
            f"data.dataset_dir={root}/dataset",
        ],
    )
    t0 = time.perf_counter()
    result = train(spec, variant=variant, run_name=f"bench-{workers}w")
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in Path(result.run_dir, "steps.jsonl").read_text().splitlines()]
    steady = records[5:-1]
    step_s = [r["time/data_s"] + r["time/compute_s"] + r["time/other_s"] for r in steady]
    outside = sum(r["time/data_s"] + r["time/other_s"] for r in steady)
    return {
        "workers": workers,
        "steps_measured": len(steady),
        "bytes_per_s": statistics.median(r["bytes_per_s"] for r in steady),
        "gflops_per_s": statistics.median(r["flops_per_s"] for r in steady) / 1e9,
        "step_s_median": statistics.median(step_s),
        "overhead_fraction": outside / sum(step_s),
        "data_s_mean": statistics.mean(r["time/data_s"] for r in steady),
        "other_s_mean": statistics.mean(r["time/other_s"] for r in steady),
        "fit_wall_s": wall,
        "val_bits_per_byte": result.val_bits_per_byte,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--variant", default="aunet2")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    os.chdir(REPO)
    from pipelines.runtime import init_ray
    from pipelines.spec import ResourcesConfig

    init_ray(ResourcesConfig(), num_cpus=2)
    print(f"load average: {os.getloadavg()[0]:.1f}", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="aunet-bench-train-") as tmp:
        for w in args.workers:
            rows.append(measure(w, args.steps, args.variant, Path(tmp)))
    print(
        f"{'workers':>7} {'bytes/s':>9} {'GFLOP/s':>8} {'step s':>7} {'overhead':>9} {'fit s':>6}"
    )
    for r in rows:
        cols = (r["workers"], r["bytes_per_s"], r["gflops_per_s"], r["step_s_median"])
        print(
            "{:>7} {:>9.0f} {:>8.2f} {:>7.3f}".format(*cols),
            f"{r['overhead_fraction']:>8.1%} {r['fit_wall_s']:>6.0f}",
        )
    print("RESULT", json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
