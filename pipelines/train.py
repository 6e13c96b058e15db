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

import dataclasses
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aunet.flops import (
    batch_size_bytes,
    flops_per_byte,
    learning_rate,
    num_params,
    steps_for_budget,
)
from aunet.optim import warmup_steps
from pipelines.runtime import (
    artifact_location_for,
    check_tracking_reachable,
    init_ray,
    is_uri,
    join_path,
    resolve_tracking_uri,
)
from pipelines.spec import ExperimentSpec, SpecError, load_spec, parse_cli

if TYPE_CHECKING:
    from pipelines.eval_config import EvalConfig


@dataclass(frozen=True)
class TrainPlan:
    """What the spec leaves open, resolved: batch, lr, steps and the FLOP accounting.

    ``batch_size`` is in sequences of ``seq_len`` bytes per optimizer step (all ranks together).
    FLOPs are ``aunet.flops.flops_per_byte`` (forward + backward) at the config's capacities, with
    the dataset's measured bytes per token for uncapped stages.
    """

    seq_len: int
    batch_size: int
    steps: int
    warmup_steps: int
    lr: float
    flops_per_byte: float
    num_params: int
    batch_from_scaling_law: bool
    lr_from_scaling_law: bool

    @property
    def bytes_per_step(self) -> int:
        return self.seq_len * self.batch_size

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_byte * self.bytes_per_step

    @property
    def total_flops(self) -> float:
        return self.flops_per_step * self.steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def params(self) -> dict[str, Any]:
        """Everything worth an MLflow param, derived values included."""
        extra = {"bytes_per_step": self.bytes_per_step, "total_flops": self.total_flops}
        return {f"plan.{k}": v for k, v in {**self.to_dict(), **extra}.items()}


def _bytes_per_token(spec: ExperimentSpec, manifest: dict[str, Any] | None) -> dict[str, Any]:
    ratios = (manifest or {}).get("contraction")
    K = spec.model.num_stages
    if ratios and len(ratios) == K and all(r for r in ratios):
        return {"bytes_per_token": tuple(float(r) for r in ratios)}
    return {}


def plan_training(
    spec: ExperimentSpec, manifest: dict[str, Any] | None = None, world_size: int | None = None
) -> TrainPlan:
    """Resolve batch size, lr and steps from the spec, by the scaling laws where left null.

    The laws (``BSZ = 0.66 C^0.321`` bytes, ``LR = 6.6 C^-0.176``; units unverified, spec §5) take
    C = training FLOPs: ``train.flop_budget`` when given, else the run's own FLOPs, found by
    fixed-point iteration since they depend on the batch size. A derived batch is rounded to whole
    sequences, at least one per worker, and up to a multiple of the worker count.
    """
    tr, T, cfg = spec.train, spec.data.seq_len, spec.model
    world = world_size or spec.resources.num_workers
    fpb = flops_per_byte(cfg, T, **_bytes_per_token(spec, manifest))

    def sequences(C: float) -> int:
        n = max(world, round(batch_size_bytes(C) / T))
        return -(-n // world) * world

    if tr.batch_size is not None:
        batch = tr.batch_size
        if batch % world:
            raise SpecError(f"train.batch_size: {batch} is not a multiple of {world} workers")
    elif tr.flop_budget is not None:
        batch = sequences(tr.flop_budget)
    else:
        batch = world
        for _ in range(100):  # C grows with the batch at exponent 0.321 < 1: this converges
            nxt = sequences(fpb * T * batch * tr.steps)
            if nxt == batch:
                break
            batch = nxt
    steps = tr.steps
    if steps is None:
        steps = steps_for_budget(cfg, T, batch, tr.flop_budget, **_bytes_per_token(spec, manifest))
        if steps < 1:
            raise SpecError(
                f"train.flop_budget: {tr.flop_budget:.3g} FLOPs is less than one step "
                f"({fpb * T * batch:.3g} FLOPs)"
            )
    total = fpb * T * batch * steps
    return TrainPlan(
        seq_len=T,
        batch_size=batch,
        steps=steps,
        warmup_steps=warmup_steps(tr.warmup, steps),
        lr=tr.lr if tr.lr is not None else learning_rate(total),
        flops_per_byte=fpb,
        num_params=num_params(cfg),
        batch_from_scaling_law=tr.batch_size is None,
        lr_from_scaling_law=tr.lr is None,
    )


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
    fault: dict[str, Any] | None = None,
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
    against this process's directory when not given. ``fault`` is for tests only:
    ``{"step": n, "rank": r, "marker": path}`` makes rank r exit its process after step n, once.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from aunet.parallel import backend_for
    from pipelines.train_worker import train_loop_per_worker

    res = spec.resources
    storage = storage_path or res.storage_path
    uri = tracking_uri or resolve_tracking_uri(spec.tracking)
    loop_config = {
        "spec": spec.to_dict(),
        "plan": plan.to_dict(),
        "dataset": dataset_path,
        "manifest": manifest,
        "run_name": run_name,
        "run_dir": join_path(storage, run_name),
        "launch_id": launch_id or uuid.uuid4().hex,  # part of the MLflow run key
        "variant": variant,
        "spec_file": spec_file,
        "tracking": {
            "uri": uri,
            "experiment": spec.tracking.experiment,
            "artifact_location": artifact_location_for(uri, spec.tracking.artifact_location),
            "parent_run_id": parent_run_id,
        },
        "fault": fault,
        "eval_suite": eval_suite if eval_suite is not None else eval_suite_for(spec),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
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
            storage_path=storage,
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
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
    fault: dict[str, Any] | None = None,
) -> TrainResult:
    """Preprocess if needed, then train one run to the end (resuming it if it exists)."""
    from pipelines.preprocess import preprocess

    t0 = time.perf_counter()
    if variant is not None:
        spec = spec.with_variant(variant)
    uri = resolve_tracking_uri(spec.tracking)
    check_tracking_reachable(uri)  # fail in seconds, before any compute
    suite = eval_suite_for(spec)  # likewise a bad eval YAML
    init_ray(spec.resources, tracking_uri=uri)
    info = preprocess(spec)
    train_rows = info.sequences["train"]
    plan = plan_training(spec, info.manifest)
    if train_rows < plan.batch_size:
        raise SpecError(
            f"train.batch_size: {plan.batch_size} sequences per step, but the dataset "
            f"{info.path} has only {train_rows} training sequences"
        )
    name = run_name or run_name_for(spec, variant)
    print(
        f"train: run {name}: {plan.num_params:,} params, {plan.steps} steps x "
        f"{plan.batch_size} x {plan.seq_len} bytes, lr {plan.lr:.3g}, {plan.total_flops:.3g} "
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
        eval_suite=suite,
    )
    result = trainer.fit()
    out = result.return_value or {}
    run_dir = join_path(spec.resources.storage_path, name)
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
    )


def summary(result: TrainResult, experiment: str) -> str:
    from pipelines.tracking import ui_command

    bpb = result.val_bits_per_byte
    lines = [
        f"train: run {result.run_name} done: {result.steps} steps, validation bits/byte "
        f"{'n/a' if bpb is None else f'{bpb:.4f}'}, {result.wall_s:.0f} s",
        f"  final checkpoint: {result.final_checkpoint}",
        f"  MLflow: experiment {experiment!r}, run {result.mlflow_run_id}, "
        f"store {result.tracking_uri}",
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
        else:
            rest.append(arg)
    return rest, variant, fresh


HELP_FLAGS = (
    ("variant=NAME, --variant NAME", "train only this entry of variants:"),
    ("--fresh", "start a new, time-stamped run instead of resuming"),
    ("key=value, --set key=value", "override a spec key"),
    ("-h, --help", "this text"),
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from pipelines.schema import cli_help, wants_help
    from pipelines.spec import help_text

    if wants_help(argv):
        print(cli_help(__doc__ or "", HELP_FLAGS, [help_text()]), end="")
        return 0
    try:
        rest, variant, fresh = _pop_flags(argv)
        path, overrides = parse_cli(rest)
        spec = load_spec(path, overrides)
        variants = [variant] if variant else list(spec.variants or []) or [None]
        for v in variants:
            if v is not None:
                spec.with_variant(v)  # a bad name fails here, before anything runs
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S") if fresh else None
    results = []
    for v in variants:
        name = run_name_for(spec, v) + (f"-{stamp}" if stamp else "")
        result = train(spec, variant=v, run_name=name, spec_file=str(Path(path).absolute()))
        print(summary(result, spec.tracking.experiment), flush=True)
        results.append(result)
    if len(results) > 1:
        print("train: summary (validation bits/byte, wall time):")
        for r in results:
            bpb = "n/a" if r.val_bits_per_byte is None else f"{r.val_bits_per_byte:.4f}"
            print(f"  {r.run_name:40s} {bpb:>8s} {r.wall_s:7.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
