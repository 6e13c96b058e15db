"""Scaling-law studies: variants x compute budgets, trained through the sweep, fitted from MLflow.

``python -m pipelines.scaling plan <study.yaml> [a.b=v ...]``    the cells, nothing trained
``python -m pipelines.scaling run <study.yaml> [a.b=v ...]``     train every cell (resumable)
``python -m pipelines.scaling report <study.yaml | experiment> [--study NAME] [--out DIR]
                                     [--tracking-uri URI] [--r2-threshold X] [--bootstrap N]``

A study file is an experiment spec (the shared data, training and tracking settings) plus a
``study:`` section (see experiments/scaling/small.yaml). Why it is built this way:
- Each cell (variant, budget[, size factor, lr factor]) becomes one categorical choice of a sweep
  file written to ``<storage_path>/scaling/<study>/sweep.yaml``, so ``pipelines.sweep`` trains it
  (compute-matched steps, nested MLflow runs, Tune resume). The file is a pure function of the
  study, so running ``run`` again resumes the same sweep.
- Model size follows a data-to-model rule: D = bytes_per_param x N with C = flops_per_byte(N) x D
  (``aunet.flops.compute_optimal``, width scaling of the variant's template). The default, 214
  bytes per parameter, is what we take as the paper's rule: the official 2B_1level config, which
  uses exactly 1e21 FLOPs (docs/flops.md), trains 1.324e9 params on 283e9 bytes. The paper does not
  state the ratio in the mirror; ``study.bytes_per_param`` changes it (2B_2level sits at 259).
  ``size_factors`` multiply N (via bytes_per_param / f^2) to make iso-FLOP profiles.
- Batch size and learning rate default to the paper's formulas (``aunet.flops``; units unverified).
- The report reads runs from MLflow only, found by the tags ``run`` sets on them
  (``aunet.study``, ``aunet.variant``, ``aunet.budget``, ``aunet.role=cell``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipelines import schema
from pipelines.cli import run_main
from pipelines.corpus import check_sources
from pipelines.paths import absolute_tracking_uri, is_uri
from pipelines.runtime import check_tracking_reachable
from pipelines.spec import (
    ExperimentSpec,
    SpecError,
    parse_cli,
)
from pipelines.study_spec import Study, StudyFit, load_study

TAG_PREFIX = "aunet."


@dataclasses.dataclass(frozen=True)
class Cell:
    label: str
    variant: str
    budget: float
    size_factor: float
    lr_factor: float
    overrides: dict[str, Any]
    params: int
    steps: int
    batch_size: int
    lr: float
    batch_bytes: float = 0.0  # bytes per step (a BPE cell: tokens x bytes per token)


# ---------------------------------------------------------------------------------- cells
def _fmt_budget(b: float) -> str:
    return f"{b:.3g}"


def plan_cells(spec: ExperimentSpec, study: Study) -> list[Cell]:
    """Size, batch and lr of every cell: the rule, the formulas, and steps from the budget.

    Steps come from ``pipelines.plan.plan_training`` with each variant's dataset manifest when
    that dataset is built (``run`` builds them first), so the plan is what the sweep trains.
    """
    from aunet.flops import compute_optimal, learning_rate
    from pipelines.data import is_complete, read_manifest
    from pipelines.entropy_fit import dataset_spec
    from pipelines.plan import plan_training, stream_bytes_per_token

    cells = []
    for variant, vo in study.variants.items():
        base = spec.with_overrides(vo)
        T = base.data.seq_len  # a BPE variant's windows count tokens
        built = is_complete(base.dataset_dir())
        manifest = read_manifest(base.dataset_dir()) if built else None
        if base.tokenizer is not None and manifest is None:
            raise SpecError(
                f"study.variants.{variant}: a tokenizer variant is sized with its dataset's "
                "bytes per token; build it first (python -m pipelines.preprocess, or run)"
            )
        # A token model: its tokenizer's vocabulary, FLOPs per byte at the measured compression.
        model = dataset_spec(base, manifest).model
        bpt = {"bytes_per_token": stream_bytes_per_token(manifest)} if base.tokenizer else {}
        for budget in study.budgets:
            for sf in study.size_factors:
                sized = compute_optimal(
                    model,
                    budget,
                    T,
                    scale=study.scale,
                    bytes_per_param=study.bytes_per_param / sf**2,
                    **bpt,
                )["config"]
                key = "model.layers" if study.scale == "depth" else "model.dimensions"
                value = list(sized.layers if study.scale == "depth" else sized.dimensions)
                for lf in study.lr_factors:
                    ov: dict[str, Any] = {
                        **vo,
                        key: value,
                        "train.flop_budget": budget,
                        "train.steps": None,
                    }
                    if study.batch_size != "law":
                        ov["train.batch_size"] = study.batch_size
                    if study.lr != "law" or len(study.lr_factors) > 1:
                        lr0 = learning_rate(budget) if study.lr == "law" else float(study.lr)
                        ov["train.lr"] = lr0 * lf
                    plan = plan_training(base.with_overrides(ov), manifest)
                    # a multiple of log_every: train logs evaluations only on logging steps
                    log = spec.train.log_every
                    every = max(log, plan.steps // study.evals_per_run // log * log)
                    ov["train.eval_every"] = every
                    ov["train.checkpoint_every"] = every * max(1, study.evals_per_run // 2)
                    label = f"{variant}@{_fmt_budget(budget)}"
                    label += f",Nx{sf:g}" if len(study.size_factors) > 1 else ""
                    label += f",lrx{lf:g}" if len(study.lr_factors) > 1 else ""
                    cells.append(
                        Cell(
                            label,
                            variant,
                            budget,
                            sf,
                            lf,
                            ov,
                            plan.num_params,
                            plan.steps,
                            plan.batch_size,
                            plan.lr,
                            plan.bytes_per_step,
                        )
                    )
    return cells


def format_cells(cells: Sequence[Cell], seq_len: int) -> str:
    head = f"{'cell':28s} {'params':>14s} {'steps':>6s} {'batch':>6s} {'lr':>9s}  model"
    lines = [head, "-" * len(head)]
    for c in cells:
        model = {
            k: v
            for k, v in c.overrides.items()
            if k.startswith("model.dimensions") or k.startswith("model.layers")
        }
        batch = c.batch_bytes or c.batch_size * seq_len
        lines.append(
            f"{c.label:28s} {c.params:14,d} {c.steps:6d} {batch:6.0f} "
            f"{c.lr:9.3g}  {json.dumps(model)}"
        )
    return "\n".join(lines)


def study_dir(spec: ExperimentSpec, study: Study) -> Path:
    if is_uri(spec.resources.storage_path):
        raise SpecError("resources.storage_path: studies need a local (or mounted) path")
    return Path(spec.resources.storage_path) / "scaling" / study.name


def write_sweep_file(spec: ExperimentSpec, study: Study, cells: Sequence[Cell], path: Path) -> None:
    """The sweep file of the study: one categorical dimension ``cell`` (deterministic text)."""
    raw = spec.to_dict()
    raw.pop("variants", None)
    sw = {"max_concurrent_trials": 1, "max_failures": 1, "flop_tolerance": 0.05, **study.sweep}
    raw["sweep"] = {
        "name": f"scaling-{study.name}",
        "search": "grid",
        "metric": "val_bits_per_byte",
        "mode": "min",
        **sw,
        "space": {"cell": {"choices": {c.label: c.overrides for c in cells}}},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(raw, sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def tag_runs(uri: str, study: Study, cells: Sequence[Cell], rows: Sequence[Mapping]) -> int:
    """Tag every finished trial's MLflow run with its study, variant and budget (idempotent)."""
    from pipelines import tracking

    by_label = {c.label: c for c in cells}
    n = 0
    for r in rows:
        c = by_label.get(json.loads(r.get("params") or "{}").get("cell"))  # the trial's config
        if c is None or not r.get("mlflow_run_id") or r.get("status") != "finished":
            continue
        tags = {
            "study": study.name,
            "variant": c.variant,
            "budget": repr(c.budget),
            "size_factor": f"{c.size_factor:g}",
            "lr_factor": f"{c.lr_factor:g}",
            "cell": c.label,
            "role": "cell",
        }
        tracking.tag_run(uri, r["mlflow_run_id"], {TAG_PREFIX + k: v for k, v in tags.items()})
        n += 1
    return n


def run_study(path: str, overrides: Sequence[str] = ()) -> tuple[list[dict[str, Any]], bool]:
    """Build the datasets, write the study's sweep file, run (or resume) the sweep, tag the
    finished runs. The datasets come first so that the cells are planned with their measured
    bytes per token: the sweep file is then the same on every run of the command (resume)."""
    from pipelines import tracking
    from pipelines.preprocess import preprocess
    from pipelines.runtime import check_tracking_reachable, init_ray
    from pipelines.sweep import run_sweep

    spec, study = load_study(path, overrides)
    check_tracking_reachable(spec.tracking.tracking_uri)
    init_ray(spec.resources, tracking_uri=spec.tracking.tracking_uri)
    datasets: dict[str, ExperimentSpec] = {}  # one per split strategy
    for vo in study.variants.values():
        variant = spec.with_overrides(vo)
        datasets.setdefault(variant.dataset_dir(), variant)
    for variant in datasets.values():
        preprocess(variant)
    cells = plan_cells(spec, study)
    print(
        f"scaling: study {study.name}: {len(cells)} cells\n"
        + format_cells(cells, spec.data.seq_len),
        file=sys.stderr,
    )
    d = study_dir(spec, study)
    sweep_file = d / "sweep.yaml"
    write_sweep_file(spec, study, cells, sweep_file)
    rows, complete = run_sweep(str(sweep_file))
    uri = spec.tracking.tracking_uri
    n = tag_runs(uri, study, cells, rows)
    sweep_dir = Path(spec.resources.storage_path, "sweeps", f"scaling-{study.name}")
    parent = tracking.parent_run_id(sweep_dir / tracking.PARENT_RUN_FILE)
    if parent is not None:
        tracking.tag_run(uri, parent, {"aunet.study": study.name})
    print(f"scaling: tagged {n} finished runs with aunet.study={study.name}", file=sys.stderr)
    return rows, complete


def report_main(argv: list[str]) -> int:
    import argparse

    from pipelines.report import build_report, find_studies
    from pipelines.tracking import cli_uri

    ap = argparse.ArgumentParser(prog="python -m pipelines.scaling report")
    ap.add_argument("target", help="study YAML, or the MLflow experiment holding the study")
    ap.add_argument("--study", help="study name (when the experiment holds several)")
    ap.add_argument("--out", help="report directory (default <storage>/scaling/<study>/report)")
    ap.add_argument("--tracking-uri", help="else the study's, MLFLOW_TRACKING_URI, mlflow.db")
    ap.add_argument("--r2-threshold", type=float)
    ap.add_argument("--min-budgets", type=int)
    ap.add_argument("--bootstrap", type=int)
    args = ap.parse_args(argv)
    fit, spec_file = dataclasses.asdict(StudyFit()), None
    if args.target.endswith((".yaml", ".yml")) and Path(args.target).is_file():
        spec_file = str(Path(args.target).absolute())
        spec, study = load_study(args.target)
        uri, experiment = spec.tracking.tracking_uri, spec.tracking.experiment
        name, fit, out = study.name, study.fit_settings(), study_dir(spec, study) / "report"
    else:
        uri = cli_uri(args.tracking_uri)
        check_tracking_reachable(uri)  # in seconds, not after MLflow's minutes of retries
        experiment, name = args.target, args.study
        found = [] if name else find_studies(uri, experiment)
        if not name and len(found) != 1:
            raise LookupError(f"experiment {experiment!r} holds studies {found}: pick with --study")
        name = name or found[0]
        out = Path("outputs", "scaling", name, "report")
    uri = absolute_tracking_uri(args.tracking_uri) if args.tracking_uri else uri
    for key in ("r2_threshold", "min_budgets", "bootstrap"):
        fit[key] = getattr(args, key) if getattr(args, key) is not None else fit[key]
    out = Path(args.out if args.out else out).absolute()
    check_tracking_reachable(uri)
    result = build_report(uri, experiment, name, out, fit, spec_file=spec_file)
    print(result["table"])
    for c in result["crossovers"]:
        where = ", extrapolated" if c["extrapolated"] else ""
        print(
            f"crossover {' vs '.join(c['variants'])}: C = {c['C']:.3g} FLOPs "
            f"({c['better_above']} better above{where})"
        )
    print(
        f"report: {out / 'report.html'}, tables.tex (LaTeX), figures as PNG/SVG/PDF "
        f"(MLflow run {result['report_run_id']})"
    )
    return 0


HELP_FLAGS = (
    ("key=value, --set key=value", "plan, run: override a spec key, or study.key=value"),
    ("report --help", "the report's own flags"),
    ("--debug", "show the traceback of an error (or AUNET_DEBUG=1)"),
    ("-h, --help", "this text"),
)


def _help(cmd: str) -> str:
    from pipelines.spec import help_text

    study = schema.help_text(Study, "study.", "study section keys (study: in the file):")
    sections = [study] if cmd == "report" else [help_text(), study]
    return schema.cli_help(__doc__ or "", HELP_FLAGS, sections)


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv, extra=(LookupError,))  # LookupError: report, no such study


def _main(argv: list[str]) -> int:
    cmd, rest = (argv[0], argv[1:]) if argv else ("", [])
    if schema.wants_help(argv):
        print(_help(cmd), end="")
        if cmd == "report":  # then its argparse flags; argparse ends with SystemExit(0)
            with contextlib.suppress(SystemExit):
                report_main(["--help"])
        return 0
    if cmd == "report":
        return report_main(rest)
    if cmd not in ("plan", "run"):
        print("usage: python -m pipelines.scaling {plan|run|report} ...", file=sys.stderr)
        return 2
    t0, (path, overrides) = time.perf_counter(), parse_cli(rest)
    spec, study = load_study(path, overrides)
    if cmd == "plan":
        print(format_cells(plan_cells(spec, study), spec.data.seq_len))
        return 0
    for vo in study.variants.values():  # a missing data path fails before Ray starts
        check_sources(spec.with_overrides(vo).data.sources)
    rows, complete = run_study(path, overrides)
    state = "done" if complete else "interrupted (run the same command to resume)"
    print(f"scaling: study {state}: {len(rows)} cells, {time.perf_counter() - t0:.0f} s")
    return 0 if complete else 130


if __name__ == "__main__":
    sys.exit(main())
