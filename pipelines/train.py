"""Train AU-Net variants with Ray Train (FSDP2), DCP checkpoints, resume and MLflow.

``python -m pipelines.train <experiment.yaml> [variant=NAME] [--fresh] [a.b=v | --set a.b=v ...]``

Without ``variant=``, every variant of the spec's ``variants:`` mapping is trained, one after
the other (or the spec itself when it has none). A run is named
``<tracking.run_name or name>-<variant>`` and lives in ``<resources.storage_path>/<run>``: the
same command again resumes it from its last checkpoint (a finished run only rewrites its final
checkpoint); ``--fresh`` starts a new run with a time-stamped name. The preprocessed dataset is
built first if it is missing.

Per run: ``<run>/step_NNNNNNN/`` DCP checkpoints (model, optimizer, scheduler, data position,
RNG), ``<run>/final/`` the consolidated model (``aunet.checkpoint.load_pretrained``),
``<run>/steps.jsonl`` rank 0's record of every step (data position, sequence ids, loss,
timings), and one MLflow run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.checkpointing import (
    check_resumable,
    latest_saved_state,
    require_intact_checkpoint,
)
from pipelines.data import manifest_tokenizer
from pipelines.entropy_fit import dataset_spec
from pipelines.paths import is_uri, join_path
from pipelines.plan import TrainPlan, plan_training
from pipelines.runtime import (
    VERBOSE_ENV,
    artifact_location_for,
    check_tracking_reachable,
    init_ray,
    verbose,
)
from pipelines.spec import ExperimentSpec, SpecError, load_spec, parse_cli
from pipelines.storage import forwarded_env, read_bytes, write_bytes
from pipelines.storage import resolve as storage_resolve

LAUNCH_ID_FILE = "launch_id"

if TYPE_CHECKING:
    from pipelines.eval_config import EvalConfig
    from pipelines.train_worker import FaultInjection


@dataclass(frozen=True)
class TrainResult:
    run_name: str
    run_dir: str
    final_checkpoint: str
    steps: int
    val_bits_per_byte: float | None
    mlflow_run_id: str | None
    tracking_uri: str
    wall_s: float
    metrics: dict[str, Any] | None
    num_params: int | None = None
    total_flops: float | None = None

    def median_bytes_per_s(self) -> float | None:
        """Median training throughput over the run's steps (rank 0's ``steps.jsonl``); None
        when the run directory is remote or holds no steps."""
        path = Path(self.run_dir) / "steps.jsonl"
        if is_uri(self.run_dir) or not path.is_file():
            return None
        lines = [json.loads(x) for x in path.read_text().splitlines() if x]
        rates = [x.get("perf/bytes_per_s", x.get("bytes_per_s")) for x in lines]  # old: no prefix
        rates = sorted(r for r in rates if r)
        return float(rates[len(rates) // 2]) if rates else None


def run_name_for(spec: ExperimentSpec, variant: str | None = None) -> str:
    base = spec.tracking.run_name or spec.name
    return f"{base}-{variant}" if variant else base


def eval_suite_for(spec: ExperimentSpec, cwd: str | None = None) -> EvalConfig | None:
    """``train.eval_suite`` validated and with its task paths made absolute against ``cwd``."""
    if not spec.train.eval_suite:
        return None
    from pipelines.eval_config import load_eval_config

    return load_eval_config(spec.train.eval_suite, cwd=cwd)


def build_trainer(
    spec: ExperimentSpec,
    run_name: str,
    storage_path: str | None = None,
    *,
    dataset_path: str,
    plan: TrainPlan,
    manifest: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
    spec_file: str | None = None,
    variant: str | None = None,
    fault: FaultInjection | None = None,
    launch_id: str | None = None,
    eval_suite: EvalConfig | None = None,
):
    """The ``TorchTrainer`` of one run (Ray must be initialised); ``fit()`` it to train.

    Reusable from a Tune trial: pass ``callbacks=[TuneReportCallback()]`` and a ``run_name`` that
    is stable per trial so a restored sweep resumes each trial's Train run, and a ``launch_id``
    stable per trial so a retried trial reopens its MLflow run even when it failed before its
    first checkpoint (default: a new id per fit; worker restarts within a fit share it).
    ``eval_suite``: ``train.eval_suite`` loaded by the caller (``eval_suite_for``), whose relative
    paths are the user's, not the worker's (Ray runs workers in a session directory); loaded here
    against this process's directory when not given. ``fault`` is for tests only.
    """
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    from aunet.parallel import backend_for
    from pipelines.train_worker import TrackingArgs, WorkerArgs, train_loop_per_worker

    spec = dataset_spec(spec, manifest)  # entropy stages as the dataset resolved them
    res = spec.resources
    storage = storage_path or res.storage_path
    # A URI goes to Ray as the filesystem pipelines.storage resolves (the same S3 options as the
    # datasets'); the workers' storage credentials travel in their runtime_env (docs/data.md).
    fs, ray_storage = storage_resolve(storage) if is_uri(storage) else (None, storage)
    forwarded = forwarded_env()
    uri = tracking_uri or spec.tracking.tracking_uri
    args = WorkerArgs(
        spec=spec,
        plan=plan,
        dataset=dataset_path,
        manifest=manifest,
        run_name=run_name,
        run_dir=join_path(storage, run_name),
        launch_id=launch_id or uuid.uuid4().hex,
        variant=variant,
        spec_file=spec_file,
        tracking=TrackingArgs(
            uri=uri,
            experiment=spec.tracking.experiment,
            artifact_location=artifact_location_for(uri, spec.tracking.artifact_location),
            parent_run_id=parent_run_id,
        ),
        fault=fault,
        eval_suite=eval_suite if eval_suite is not None else eval_suite_for(spec),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=args.to_config(),
        scaling_config=ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.use_gpu,
            resources_per_worker={
                "CPU": res.cpus_per_worker,
                **({"GPU": 1} if res.use_gpu else {}),
            },
        ),
        torch_config=TorchConfig(backend=backend_for(res.use_gpu)),
        run_config=RunConfig(
            name=run_name,
            storage_path=ray_storage,
            storage_filesystem=fs,
            worker_runtime_env={"env_vars": forwarded} if forwarded else None,
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
            # Ray Train's own INFO lines (controller, placement groups) go to its log files only;
            # AUNET_VERBOSE=1 (train --verbose) shows them on the terminal too.
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )


def train(
    spec: ExperimentSpec,
    *,
    variant: str | None = None,
    run_name: str | None = None,
    callbacks: Sequence[Any] = (),
    parent_run_id: str | None = None,
    spec_file: str | None = None,
    fault: FaultInjection | None = None,
) -> TrainResult:
    """Preprocess if needed, then train one run to the end (resuming it if it exists)."""
    from pipelines.preprocess import preprocess

    t0 = time.perf_counter()
    if variant is not None:
        spec = spec.with_variant(variant)
    uri = spec.tracking.tracking_uri  # resolved once, at load (env override, absolute)
    check_tracking_reachable(uri)  # fail in seconds, before any compute
    suite = eval_suite_for(spec)  # likewise a bad eval YAML
    name = run_name or run_name_for(spec, variant)
    run_dir = join_path(spec.resources.storage_path, name)
    saved = latest_saved_state(run_dir)
    require_intact_checkpoint(run_dir)  # a damaged run fails in one line, before Ray starts
    explicit = {"seq_len": spec.data.seq_len}  # the batch may need the dataset: checked below
    explicit.update({"batch_size": spec.train.batch_size} if spec.train.batch_size else {})
    _check_resumable(saved, explicit, _published_spec(spec), name)  # before Ray starts
    init_ray(spec.resources, tracking_uri=uri, env_vars=forwarded_env())
    info = preprocess(spec)
    manifest_tokenizer(info.path)  # a token dataset's tokenizer.json verified here, in one line
    train_rows = info.sequences["train"]
    plan = plan_training(spec, info.manifest)  # the vocabulary of a token dataset: one line if not
    if train_rows < plan.batch_size:
        raise SpecError(
            f"train.batch_size: {plan.batch_size} sequences per step, but the dataset "
            f"{info.path} has only {train_rows} training sequences"
        )
    _check_resumable(saved, plan.to_dict(), dataset_spec(spec, info.manifest), name)
    unit = "bytes" if plan.bytes_per_token == 1.0 else f"tokens ({plan.bytes_per_token:.3g} B)"
    print(
        f"train: run {name}: {plan.num_params:,} params, {plan.steps} steps x "
        f"{plan.batch_size} x {plan.seq_len} {unit}, lr {plan.lr:.3g}, {plan.total_flops:.3g} "
        f"FLOPs ({plan.flops_per_byte:.3g}/byte)",
        file=sys.stderr,
    )
    trainer = build_trainer(
        spec,
        name,
        dataset_path=str(info.path),
        plan=plan,
        manifest=info.manifest,
        callbacks=callbacks,
        parent_run_id=parent_run_id,
        tracking_uri=uri,
        spec_file=spec_file,
        variant=variant,
        fault=fault,
        launch_id=launch_id_for(run_dir),
        eval_suite=suite,
    )
    result = trainer.fit()
    out = result.return_value or {}
    return TrainResult(
        run_name=name,
        run_dir=run_dir,
        final_checkpoint=out.get("final_checkpoint", join_path(run_dir, "final")),
        steps=int(out.get("step", plan.steps)),
        val_bits_per_byte=out.get("val_bits_per_byte"),
        mlflow_run_id=out.get("mlflow_run_id"),
        tracking_uri=uri,
        wall_s=time.perf_counter() - t0,
        metrics=result.metrics,
        num_params=plan.num_params,
        total_flops=plan.total_flops,
    )


def _published_spec(spec: ExperimentSpec) -> ExperimentSpec | None:
    """The spec as its published dataset resolved it (entropy stages, a tokenizer's vocabulary);
    None when the dataset decides and is not built yet, so the check waits for preprocessing."""
    from pipelines.data import is_complete, read_manifest
    from pipelines.entropy_fit import has_entropy

    if not has_entropy(spec.model.split_strategy) and spec.tokenizer is None:
        return spec
    if not is_complete(spec.dataset_dir()):
        return None
    return dataset_spec(spec, read_manifest(spec.dataset_dir()))


def _check_resumable(
    saved: dict[str, Any] | None, plan: dict[str, Any], spec: ExperimentSpec | None, name: str
) -> None:
    """A run directory whose checkpoint another spec wrote fails here, in one line, instead of
    in every retried worker (``spec`` with entropy stages as its dataset resolved them)."""
    if saved is None or spec is None:
        return
    try:
        check_resumable(saved, plan, spec.model.to_dict(), name)
    except ValueError as e:
        raise SpecError(str(e)) from None


def launch_id_for(run_dir: str) -> str:
    """The id that keys this run's MLflow run until the run directory is deleted.

    Kept in ``<run_dir>/launch_id``, so the same command after a driver killed before the first
    checkpoint reopens its MLflow run instead of leaving it RUNNING beside a new one.
    """
    fs, root = storage_resolve(run_dir)
    path = f"{root}/{LAUNCH_ID_FILE}"
    saved = read_bytes(fs, path)
    if saved is not None:
        return saved.decode().strip()
    launch = uuid.uuid4().hex
    write_bytes(fs, path, launch.encode())
    return launch


def summary(result: TrainResult, experiment: str) -> str:
    """What the CLI prints after a run; the store's URI with its credentials redacted."""
    from pipelines.paths import redact
    from pipelines.tracking import ui_command

    bpb = result.val_bits_per_byte
    lines = [
        f"train: run {result.run_name} done: {result.steps} steps, validation bits/byte "
        f"{'n/a' if bpb is None else f'{bpb:.4f}'}, {result.wall_s:.0f} s",
        f"  final checkpoint: {result.final_checkpoint}",
        f"  MLflow: experiment {experiment!r}, run {result.mlflow_run_id}, "
        f"store {redact(result.tracking_uri)}",
    ]
    if not is_uri(result.tracking_uri) or result.tracking_uri.startswith(("sqlite:", "file:")):
        lines.append(
            f"  open the UI: {ui_command(result.tracking_uri)}  (then http://127.0.0.1:5000)"
        )
    else:
        lines.append(f"  open the UI: {ui_command(result.tracking_uri)}")
    return "\n".join(lines)


def _pop_flags(argv: list[str]) -> tuple[list[str], str | None, bool]:
    variant, fresh, rest = None, False, []
    it = iter(argv)
    for arg in it:
        if arg.startswith("variant="):
            variant = arg.split("=", 1)[1]
        elif arg == "--variant":
            variant = next(it, None)
        elif arg == "--fresh":
            fresh = True
        elif arg == "--verbose":  # read by build_trainer and the workers (Ray copies the env)
            os.environ[VERBOSE_ENV] = "1"
        else:
            rest.append(arg)
    return rest, variant, fresh


HELP_FLAGS = (
    ("variant=NAME, --variant NAME", "train only this entry of variants:"),
    ("--fresh", "start a new, time-stamped run instead of resuming"),
    ("--verbose", "also show Ray's own INFO lines (else only in Ray's log files)"),
    ("key=value, --set key=value", "override a spec key"),
    ("--debug", "show the traceback of an error (or AUNET_DEBUG=1)"),
    ("-h, --help", "this text"),
)


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_main

    return run_main(_main, argv)


def _main(argv: list[str]) -> int:
    from pipelines.corpus import check_sources
    from pipelines.schema import cli_help, wants_help
    from pipelines.spec import help_text

    if wants_help(argv):
        print(cli_help(__doc__ or "", HELP_FLAGS, [help_text()]), end="")
        return 0
    rest, variant, fresh = _pop_flags(argv)
    path, overrides = parse_cli(rest)
    spec = load_spec(path, overrides)
    variants = [variant] if variant else list(spec.variants or []) or [None]
    for v in variants:  # a bad name or a missing data path fails here, before anything runs
        check_sources((spec.with_variant(v) if v is not None else spec).data.sources)
    stamp = time.strftime("%Y%m%d-%H%M%S") if fresh else None
    results = []
    for v in variants:
        name = run_name_for(spec, v) + (f"-{stamp}" if stamp else "")
        result = train(spec, variant=v, run_name=name, spec_file=str(Path(path).absolute()))
        print(summary(result, spec.tracking.experiment), flush=True)
        results.append(result)
    if len(results) > 1:
        print(summary_table(results))
    return 0


def summary_table(results: list[TrainResult]) -> str:
    """The variants side by side: what each cost (params, FLOPs, throughput) beside what it
    reached, so equal-compute comparisons read off one table."""
    from pipelines import tables as tb

    cols = [
        tb.Column("run", "run"),
        tb.Column("params", "params", tb.count),
        tb.Column("flops", "FLOPs", tb.sig(3)),
        tb.Column("bpb", "val (bits/byte)", tb.fixed(4)),
        tb.Column("bytes_s", "median bytes/s", tb.sig(3)),
        tb.Column("wall", "wall (s)", lambda v: f"{v:.0f}"),
    ]
    rows = [
        {
            "run": r.run_name,
            "params": r.num_params,
            "flops": r.total_flops,
            "bpb": r.val_bits_per_byte,
            "bytes_s": r.median_bytes_per_s(),
            "wall": r.wall_s,
        }
        for r in results
    ]
    return "train: summary\n" + tb.render_text(rows, cols)


if __name__ == "__main__":
    sys.exit(main())
