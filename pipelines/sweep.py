"""Ablation sweeps: one Ray Tune trial per variant, each trained by ``pipelines.train``'s code.

``python -m pipelines.sweep <sweep.yaml> [a.b=v | --set a.b=v ...]``  (``sweep.x=v`` too)
``python -m pipelines.sweep --summary <sweep dir | MLflow parent run id> [--tracking-uri URI]``

A sweep file is an experiment spec plus a ``sweep:`` section (see experiments/ablations/*.yaml).
Why it is built this way:
- A trial is a Tune function that fits ``pipelines.train.build_trainer``'s ``TorchTrainer`` named
  after the trial (docs/platform.md, Sweeps): the training code is the same as a single run's, and a
  restored or retried trial resumes its own Train checkpoint instead of starting over.
- Compute matching: with ``train.flop_budget`` every variant is planned by
  ``pipelines.plan.plan_training`` (the nearest whole step, the dataset's measured bytes per
  token), so trials differ by at most half a step of FLOPs; the driver refuses a sweep where that
  exceeds the tolerance (docs/flops.md).
- The split strategy changes the level masks, so every distinct dataset is preprocessed once on
  the driver before any trial starts: concurrent trials never race on a dataset directory.
- Everything of a sweep lives in ``<storage_path>/sweeps/<name>`` (Tune state, Train runs, one
  JSON per trial, the parent MLflow run id), so the same command resumes a killed sweep.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pipelines import schema, tracking
from pipelines.paths import is_uri, redact
from pipelines.results import (
    best_row,
    collect,
    format_table,
    summary_metrics,
    summary_rows,
    trial_file,
    write_json,
    write_results,
)
from pipelines.spec import ExperimentSpec, SpecError, flatten, parse_cli
from pipelines.sweep_spec import SWEEP_KEYS, Sweep, categorical_grid, label_value, load_sweep


# ---------------------------------------------------------------------------------- planning
def prepare(spec: ExperimentSpec, sweep: Sweep) -> list[dict[str, Any]]:
    """Preprocess each distinct dataset once; plan every categorical variant; check the FLOPs.

    The split strategy is part of a dataset's identity (its level masks), so a sweep over
    strategies builds one dataset per strategy, each once, before any trial starts."""
    from pipelines.data import read_manifest
    from pipelines.plan import plan_training
    from pipelines.preprocess import preprocess

    rows, built = [], set()
    for config in categorical_grid(sweep):
        label = sweep.label(config)
        try:
            v = spec.with_overrides(sweep.overrides(config))
        except SpecError as e:
            raise SpecError(f"sweep variant {label}: {e}") from None
        if v.dataset_dir() not in built:
            preprocess(v)
            built.add(v.dataset_dir())
        manifest = read_manifest(v.dataset_dir())
        if not manifest["splits"]["val"]["sequences"]:
            raise SpecError(
                f"data.val_fraction: the validation split of {v.dataset_dir()} is "
                "empty; a sweep ranks trials by validation bits/byte"
            )
        plan = plan_training(v, manifest)
        dev = plan.total_flops / v.train.flop_budget - 1 if v.train.flop_budget else None
        if dev is not None and abs(dev) > sweep.flop_tolerance:
            raise SpecError(
                f"sweep variant {label}: {plan.steps} steps spend "
                f"{plan.total_flops:.3g} FLOPs, {dev:+.1%} off train.flop_budget "
                f"(tolerance {sweep.flop_tolerance:.0%}); raise the budget or lower "
                "train.batch_size"
            )
        rows.append(
            {
                "variant": label,
                "num_params": plan.num_params,
                "steps": plan.steps,
                "batch_size": plan.batch_size,
                "flops": plan.total_flops,
                "dataset_hash": manifest["config_hash"],
            }
        )
    return rows


# ---------------------------------------------------------------------------------- trials
@dataclasses.dataclass(frozen=True)
class Context:
    """What every trial needs, fixed per sweep (pickled into the trainable)."""

    spec: dict[str, Any]
    sweep: Sweep
    sweep_dir: str
    parent_run_id: str
    tracking_uri: str
    spec_file: str
    cwd: str  # the driver's: relative paths inside train.eval_suite's YAML are the user's


def run_trial(config: dict[str, Any], ctx: Context) -> None:
    """One Tune trial: train the variant ``config`` names; record it; report the final metrics."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.data import read_manifest
    from pipelines.plan import plan_training
    from pipelines.train import build_trainer, eval_suite_for
    from pipelines.train_worker import FaultInjection

    t0 = time.time()
    tune_ctx = tune.get_context()
    trial_id, name = tune_ctx.get_trial_id(), tune_ctx.get_trial_name()
    sweep = ctx.sweep
    record_file = trial_file(ctx.sweep_dir, trial_id, ".json")
    if record_file.is_file():  # Tune's saved state can lag a SIGKILL: never train a trial twice
        done = json.loads(record_file.read_text())
        if done["status"] == "finished":
            bpb = done["val_bits_per_byte"]
            tune.report(
                {
                    sweep.metric: math.nan if bpb is None else bpb,
                    "flops": done["flops"],
                    "step": done["final_step"],
                    "finished": 1,
                }
            )
            return
    attempts_file = trial_file(ctx.sweep_dir, trial_id, ".attempts")
    attempts_file.parent.mkdir(parents=True, exist_ok=True)
    with open(attempts_file, "a") as f:  # one line per start: restores and retries are visible
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    attempts = len(attempts_file.read_text().splitlines())
    label = sweep.label(config)
    spec = ExperimentSpec.from_dict(ctx.spec, source="sweep base spec")
    spec = spec.with_overrides(sweep.overrides(config))
    manifest = read_manifest(spec.dataset_dir())
    plan = plan_training(spec, manifest)
    record = {
        "trial_id": trial_id,
        "trial": name,
        "variant": label,
        "config": config,
        "overrides": sweep.overrides(config),
        "status": "running",
        "attempts": attempts,
        "num_params": plan.num_params,
        "steps": plan.steps,
        "batch_size": plan.batch_size,
        "flops": plan.total_flops,
        "flop_budget": spec.train.flop_budget,
    }
    write_json(record_file, record)
    fault = None
    if sweep.fault and all(
        str(config.get(k)) == str(v) for k, v in (sweep.fault.get("match") or {}).items()
    ):
        marker = str(trial_file(ctx.sweep_dir, trial_id, ".fault"))
        fault = FaultInjection(step=sweep.fault["step"], rank=0, marker=marker)
    trainer = build_trainer(
        spec,
        name,
        str(Path(ctx.sweep_dir) / "runs"),
        dataset_path=spec.dataset_dir(),
        plan=plan,
        manifest=manifest,
        callbacks=[TuneReportCallback()],
        parent_run_id=ctx.parent_run_id,
        tracking_uri=ctx.tracking_uri,
        spec_file=ctx.spec_file,
        variant=label,
        fault=fault,
        launch_id=f"trial-{trial_id}",
        eval_suite=eval_suite_for(spec, ctx.cwd),
    )
    out = trainer.fit().return_value or {}
    record.update(
        status="finished",
        val_bits_per_byte=out.get("val_bits_per_byte"),
        final_step=out.get("step"),
        mlflow_run_id=out.get("mlflow_run_id"),
        wall_s=round(time.time() - t0, 1),
    )
    if record["mlflow_run_id"]:
        _tag_child(ctx, record)
    write_json(record_file, record)
    bpb = record["val_bits_per_byte"]
    tune.report(
        {
            sweep.metric: math.nan if bpb is None else bpb,
            "flops": plan.total_flops,
            "step": record["final_step"] or plan.steps,
            "finished": 1,
        }
    )


def _tag_child(ctx: Context, record: dict[str, Any]) -> None:
    """The sweep's own params on the trial's MLflow run (train.py logs the spec and plan)."""
    params = {f"sweep.{k}": label_value(v) for k, v in record["config"].items()}
    params["sweep.variant"] = record["variant"]
    tags = {"aunet.sweep": ctx.sweep.name, "aunet.sweep_trial": record["trial"]}
    tracking.tag_run(ctx.tracking_uri, record["mlflow_run_id"], tags, params)


# ---------------------------------------------------------------------------------- driver
def sweep_dir_for(spec: ExperimentSpec, sweep: Sweep) -> str:
    if is_uri(spec.resources.storage_path):
        raise SpecError("resources.storage_path: sweeps need a local (or mounted) path")
    return os.path.join(spec.resources.storage_path, "sweeps", sweep.name)


def _parent_run(sweep_dir: str, uri: str, spec: ExperimentSpec, sweep: Sweep) -> str:
    """The sweep's MLflow parent run: created once, its id kept in the sweep dir for resumes."""
    space = {
        f"sweep.space.{d.key}": json.dumps(d.choices or [d.kind, d.bounds]) for d in sweep.dims
    }
    settings = {
        f"sweep.{k}": json.dumps(getattr(sweep, k))
        for k in SWEEP_KEYS
        if k not in ("space", "name")
    }
    return tracking.parent_run(
        Path(sweep_dir) / tracking.PARENT_RUN_FILE,
        uri,
        spec.tracking.experiment,
        run_name=f"sweep-{sweep.name}",
        tags={"aunet.sweep": sweep.name, "aunet.sweep_dir": sweep_dir},
        params={**{f"base.{k}": v for k, v in flatten(spec).items()}, **space, **settings},
        artifact_location=spec.tracking.artifact_location,
    )


def _tuner(ctx: Context):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from pipelines.sweep_progress import SweepProgress

    sweep = ctx.sweep

    def trainable(config: dict[str, Any]) -> None:
        run_trial(config, ctx)

    fn = tune.with_resources(trainable, {"cpu": 0.01})  # the Train workers hold the real CPUs
    path = os.path.join(ctx.sweep_dir, "tune")
    if tune.Tuner.can_restore(path):
        print(f"sweep: resuming {path}", file=sys.stderr)
        return tune.Tuner.restore(path, trainable=fn, resume_unfinished=True)
    scheduler = None
    if sweep.scheduler:
        s, budget = sweep.scheduler, ctx.spec["train"].get("flop_budget")
        time_attr = s.get("time_attr", "flops" if budget else "step")
        max_t = s.get("max_t", budget if time_attr == "flops" else ctx.spec["train"]["steps"])
        scheduler = ASHAScheduler(
            time_attr=time_attr,
            max_t=max_t,
            grace_period=s.get("grace_period", max_t / 8),
            reduction_factor=s.get("reduction_factor", 2),
        )
    search_alg = OptunaSearch(seed=sweep.seed) if sweep.search == "optuna" else None
    seconds = ctx.spec["train"]["progress_seconds"]
    progress = SweepProgress(sweep.metric, sweep.mode, seconds, sweep.label)
    return tune.Tuner(
        fn,
        param_space={d.key: d.tune_domain(sweep.search) for d in sweep.dims},
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            num_samples=sweep.num_samples,
            max_concurrent_trials=sweep.max_concurrent_trials,
            search_alg=search_alg,
            scheduler=scheduler,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=ctx.sweep_dir,
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            callbacks=[progress],
        ),
    )


def run_sweep(path: str, overrides: Sequence[str] = ()) -> tuple[list[dict[str, Any]], bool]:
    """Run (or resume) a sweep to the end; returns its results table and whether it completed."""
    from pipelines.runtime import check_tracking_reachable, init_ray

    spec, sweep = load_sweep(path, overrides)
    sweep_dir = sweep_dir_for(spec, sweep)
    Path(sweep_dir, "trials").mkdir(parents=True, exist_ok=True)
    uri = spec.tracking.tracking_uri
    check_tracking_reachable(uri)
    init_ray(spec.resources, tracking_uri=uri)
    planned = prepare(spec, sweep)
    print("sweep: planned variants\n" + format_table(planned), file=sys.stderr)
    ctx = Context(
        spec.to_dict(),
        sweep,
        sweep_dir,
        _parent_run(sweep_dir, uri, spec, sweep),
        uri,
        str(Path(path).absolute()),
        os.getcwd(),
    )
    grid = _tuner(ctx).fit()
    trials = grid._experiment_analysis.trials  # statuses are not on ``Result``
    rows = collect(sweep_dir, trials, sweep)
    complete = all(t.status in ("TERMINATED", "ERROR") for t in trials)
    finalize(ctx, spec, rows, complete, {r["dataset_hash"] for r in planned})
    return rows, complete


# ---------------------------------------------------------------------------------- results
def finalize(
    ctx: Context, spec: ExperimentSpec, rows: list[dict], complete: bool, datasets: set[str]
) -> None:
    """Results (CSV, JSON, LaTeX, summary page), plot and best config into the sweep dir and
    onto the parent run; ``datasets``: the config hashes of the datasets the trials read."""
    out = Path(ctx.sweep_dir)
    prov = {
        "sweep": ctx.sweep.name,
        "spec file": ctx.spec_file,
        "dataset hash": datasets,
        "tracking store": redact(ctx.tracking_uri),
        "MLflow parent run": ctx.parent_run_id,
    }
    title = f"sweep {ctx.sweep.name}: final validation bits/byte"
    files = write_results(rows, out, title, prov)
    best = best_row(rows)
    if best is not None:
        config = json.loads(best["params"])
        best_spec = spec.with_overrides(ctx.sweep.overrides(config))
        text = (
            f"# best of sweep {ctx.sweep.name}: {best['variant']} ({best['trial']}), "
            f"final validation bits/byte {best['val_bits_per_byte']:.4f}\n"
        )
        (out / "best.yaml").write_text(text + yaml.safe_dump(best_spec.to_dict(), sort_keys=False))
        files.append(out / "best.yaml")
    tracking.log_summary(
        ctx.tracking_uri,
        ctx.parent_run_id,
        files=files,
        metrics=summary_metrics(rows),
        status="FINISHED" if complete else "KILLED",
    )


HELP_FLAGS = (
    ("key=value, --set key=value", "override a spec key, or a sweep key as sweep.key=value"),
    ("--summary TARGET", "print the results of a sweep dir or MLflow parent run, run nothing"),
    ("--tracking-uri URI", "with --summary: the MLflow store (else env, else mlflow.db)"),
    ("--debug", "show the traceback of an error (or AUNET_DEBUG=1)"),
    ("-h, --help", "this text"),
)


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_main

    return run_main(_main, argv)


def _main(argv: list[str]) -> int:
    from pipelines.corpus import check_sources

    if schema.wants_help(argv):
        from pipelines.spec import help_text

        sweep_keys = schema.help_text(Sweep, "sweep.", "sweep section keys (sweep: in the file):")
        print(schema.cli_help(__doc__ or "", HELP_FLAGS, [help_text(), sweep_keys]), end="")
        return 0
    if argv[:1] == ["--summary"]:
        if len(argv) < 2:
            print(
                "usage: --summary <sweep dir | MLflow parent run id> [--tracking-uri URI]",
                file=sys.stderr,
            )
            return 2
        uri = argv[argv.index("--tracking-uri") + 1] if "--tracking-uri" in argv else None
        try:
            rows = summary_rows(argv[1], uri)
        except FileNotFoundError as e:  # already names the path
            print(f"error: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # a wrong run id or store: say which, no traceback
            print(f"error: {argv[1]}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        print(format_table(rows))
        return 0
    t0 = time.perf_counter()
    path, overrides = parse_cli(argv)
    spec, _ = load_sweep(path, overrides)
    check_sources(spec.data.sources)  # a missing data path fails before Ray starts
    rows, complete = run_sweep(path, overrides)
    devs = [abs(r["flops_vs_budget"]) for r in rows if r["flops_vs_budget"] is not None]
    print(format_table(rows))
    if devs:
        print(f"compute matching: every trial within {max(devs):.2%} of train.flop_budget")
    state = "done" if complete else "interrupted (run the same command to resume)"
    print(f"sweep {state}: {len(rows)} trials, {time.perf_counter() - t0:.0f} s")
    return 0 if complete else 130


if __name__ == "__main__":
    sys.exit(main())
