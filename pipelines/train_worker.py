"""The per-worker training loop that ``pipelines.train`` runs under Ray Train's ``TorchTrainer``.

The loop reads top to bottom; its collaborators each own one concern: ``WorkerArgs`` (what the
driver sends), ``TrainState`` and ``Checkpointer`` (what is saved, when, and the restore:
``pipelines.checkpointing``), ``StepMeter`` (timings and the per-step metrics) and ``StepLog``
(rank 0's ``steps.jsonl``) and ``validate`` (``pipelines.train_metrics``), the MLflow ``Tracker``
(rank 0), and ``FaultInjection`` (tests only). A token-id dataset's tokenizer (the BPE baseline,
docs/data.md) is loaded and verified once per worker: validation divides by the exact bytes of
the target tokens, the eval suites tokenize with it, and it is logged to MLflow and saved with
the final checkpoint.

Every rank runs the same sequence of collectives (FSDP, the metric all-reduce, validation, DCP,
``ray.train.report``), so the loop never branches on the rank except for writing files and MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aunet.entropy import abbreviate
from aunet.model import AUNet
from aunet.optim import build_optimizer, build_scheduler, clip_gradients
from aunet.parallel import all_reduce_sum, local_device, param_dtype, peak_flops, shard
from pipelines.checkpointing import Checkpointer, TrainState, full_state, save_final
from pipelines.data import TrainBatches, manifest_tokenizer
from pipelines.paths import is_uri, join_path, redact
from pipelines.plan import TrainPlan
from pipelines.runtime import quiet_ray_console, ray_job_id
from pipelines.spec import ExperimentSpec
from pipelines.train_metrics import Progress, StepLog, StepMeter, say, validate

if TYPE_CHECKING:
    from aunet.tokenizer import BPETokenizer
    from pipelines.eval_config import EvalConfig
    from pipelines.tracking_run import Tracker


@dataclass(frozen=True)
class TrackingArgs:
    uri: str
    experiment: str
    artifact_location: str | None
    parent_run_id: str | None


@dataclass(frozen=True)
class FaultInjection:
    """Test-only: rank ``rank`` exits its process after step ``step``, once (``marker`` file)."""

    step: int
    rank: int
    marker: str

    def after_step(self, step: int, rank: int, run_dir: str, checkpoint_every: int) -> None:
        if (step, rank) != (self.step, self.rank) or Path(self.marker).exists():
            return
        Path(self.marker).write_text(str(step))
        _wait_registered(run_dir, step - step % checkpoint_every)
        os._exit(1)  # a real process death


@dataclass(frozen=True)
class WorkerArgs:
    """Everything a worker needs, resolved by the driver (paths absolute, tracking URI final).

    Crosses the process boundary as Ray's ``train_loop_config`` (``to_config``/``from_config``).
    ``launch_id`` is part of the MLflow run key: stable per Tune trial, fresh per driver ``fit``.
    ``eval_suite`` is loaded by the driver, whose relative paths are the user's.
    """

    spec: ExperimentSpec
    plan: TrainPlan
    dataset: str
    manifest: dict[str, Any] | None
    run_name: str
    run_dir: str
    launch_id: str
    variant: str | None
    spec_file: str | None
    tracking: TrackingArgs
    fault: FaultInjection | None = None
    eval_suite: EvalConfig | None = None

    def to_config(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WorkerArgs:
        return cls(**config)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    import ray.train

    quiet_ray_console()
    args = WorkerArgs.from_config(config)
    spec, plan = args.spec, args.plan
    tr = spec.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = local_device(spec.resources.use_gpu)
    tok = manifest_tokenizer(args.dataset)  # None for bytes; sha256-verified against the manifest
    model, opt, sched = _build(spec, plan, device)
    torch.manual_seed(tr.seed + rank)
    random.seed(tr.seed + rank)

    state = TrainState(num_levels=spec.model.num_stages + 1)
    checkpointer = Checkpointer(
        tr.checkpoint_every,
        rank=rank,
        world_size=world,
        run_name=args.run_name,
        run_dir=args.run_dir,
        plan=plan.to_dict(),
        model_config=spec.model.to_dict(),
    )
    if checkpointer.restore(model, opt, sched, state) and rank == 0:
        say(f"train: {args.run_name} resumed after step {state.step} at {state.position}")
    attention = {"aunet.attention": model.attn_backend}  # a tag at creation: outage-safe
    tracker = _open_tracker(args, world, state, attention, tok) if rank == 0 else None
    state.mlflow_run_id = tracker.run_id if tracker is not None else None
    log, attempt = StepLog(args.run_dir, rank), uuid.uuid4().hex[:8]
    data = TrainBatches(
        args.dataset,
        plan.batch_size,
        rank=rank,
        world_size=world,
        seed=tr.seed,
        position=state.position,
    )
    peak = tr.peak_flops or peak_flops(device)
    batches, meter = iter(data), StepMeter(plan, world, peak, device)
    progress = (
        Progress(plan, tr.progress_every, tr.progress_seconds, state.step, peak and peak * world)
        if rank == 0
        else None
    )

    while state.step < plan.steps:
        meter.begin()
        position = data.position
        batch = [x.to(device, non_blocking=True) for x in next(batches).model_inputs()]
        meter.data_loaded()
        lr = sched.get_last_lr()[0]
        loss, ce, stage_tokens, grad_norm = train_step(model, opt, sched, batch, tr.grad_clip)
        meter.computed()
        state.step, state.position = state.step + 1, data.position
        step, last = state.step, state.step == plan.steps
        sums = all_reduce_sum([loss, ce, *stage_tokens])
        metrics = meter.metrics(step, sums, lr, grad_norm, position.epoch, state)
        metrics.update(_periodic_evals(args, model, state, last, rank, world, device, tok))
        if tracker is not None and _logged(args, step, metrics):
            tracker.log_metrics(metrics, step, replayable=True)  # steps.jsonl holds them too
        log.write(step, attempt, position, data.global_ids(position), metrics)
        if progress is not None:
            progress.update(step, metrics)
        report = {"step": step, "loss": metrics["train/loss"], "flops": metrics["train/flops"]}
        report["val_bits_per_byte"] = state.val_bits_per_byte
        if checkpointer.due(step, last):
            t_ck = time.perf_counter()
            checkpointer.save(model, opt, sched, state, report)
            if tracker is not None:
                tracker.log_metrics({"perf/checkpoint_s": time.perf_counter() - t_ck}, step)
        elif _VAL in metrics:
            ray.train.report(report)  # validation results reach Tune callbacks too
        if args.fault is not None:
            args.fault.after_step(step, rank, args.run_dir, tr.checkpoint_every)
        meter.end(metrics, periodic=_VAL in metrics or step % tr.checkpoint_every == 0)

    return _finish(args, model, state, tracker, device, rank, tok)


def train_step(
    model, opt, sched, batch, grad_clip: float
) -> tuple[float, float, list[float], float]:
    """One optimizer step on this rank's ``batch`` (tokens, levels, targets, target_levels:
    [B/W, T]; ``Batch.model_inputs``): target_levels train the level head when lambda_level > 0.

    Returns (loss, ce, tokens per stage, grad norm) as floats: reading the loss synchronises the
    device, so the caller's timing of the step is real.
    """
    out = model(*batch)
    out.loss.backward()
    grad_norm = clip_gradients(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    loss = float(out.loss.detach())
    return loss, float(out.ce.detach()), [float(n) for n in out.stage_tokens], grad_norm


_VAL, _SUITE_S = "val/bits_per_byte", "perf/eval_suite_s"
MLFLOW_MARKER = "mlflow_unsent.json"  # metrics Tracker.close could not send (issue 18)


def _periodic_evals(
    args: WorkerArgs, model, state: TrainState, last: bool, rank: int, world: int, device, tok
) -> dict[str, float]:
    """Validation every ``train.eval_every`` steps and at the end (updates ``state``); the eval
    suite every ``train.eval_suite_every`` steps (the last step's runs on the final weights)."""
    tr, step, out = args.spec.train, state.step, {}
    if step % tr.eval_every == 0 or last:
        t0 = time.perf_counter()
        bpb = validate(model, args.dataset, args.plan.batch_size, rank, world, tr.eval_batches, tok)
        state.val_bits_per_byte = out[_VAL] = bpb
        if bpb is not None:  # the compute axis at this very point: bits/byte vs FLOPs in MLflow
            out["val/flops"] = args.plan.flops_per_step * step
            out["val/bytes_seen"] = args.plan.bytes_per_step * step
        out["perf/eval_s"] = time.perf_counter() - t0
    if tr.eval_suite_every and step % tr.eval_suite_every == 0 and not last:
        t0 = time.perf_counter()
        out.update(_suite_eval(args.eval_suite, args.spec, full_state(model), device, rank, tok))
        out[_SUITE_S] = time.perf_counter() - t0
    return out


def _build(spec: ExperimentSpec, plan: TrainPlan, device: torch.device):
    """(model, optimizer, scheduler): identical initial weights on every rank, then sharded."""
    tr = spec.train
    torch.manual_seed(spec.model.seed)
    model = AUNet(spec.model)
    shard(
        model,
        param_dtype(tr.dtype, device) != torch.float32,
        compile=tr.compile,
        activation_checkpointing=tr.activation_checkpointing,
    )
    model.to(device)
    chosen = model.set_attention(tr.attention, device, param_dtype(tr.dtype, device))
    uncapped = [s for s, c in enumerate(spec.model.capacities) if s > 0 and c < 1]
    if tr.compile and uncapped:  # docs/performance.md (Compiled blocks and static shapes)
        say(f"train: warning: compile with uncapped stages {uncapped} recompiles per length")
    say(f"train: attention {chosen} (train.attention={tr.attention}), dtype {tr.dtype}")
    opt = build_optimizer(
        model,
        plan.lr,
        weight_decay=tr.weight_decay,
        betas=tr.betas,
        eps=tr.eps,
        decay_norms_and_embeddings=tr.decay_norms_and_embeddings,
    )
    return model, opt, build_scheduler(opt, plan.warmup_steps, plan.steps, tr.lr_min_ratio)


def _finish(args: WorkerArgs, model, state: TrainState, tracker, device, rank: int, tok):
    """The consolidated final checkpoint (with the tokenizer of a token-id dataset), its MLflow
    logging and the end-of-run suite (rank 0)."""
    full = full_state(model)  # a collective gather, written by rank 0 alone
    final_dir = f"{args.run_dir}/final"
    if rank != 0:
        return None
    spec, step, bpb = args.spec, state.step, state.val_bits_per_byte
    meta = {
        "run_name": args.run_name,
        "step": step,
        "val_bits_per_byte": bpb,
        "plan": args.plan.to_dict(),
        "variant": args.variant,
        "mlflow_run_id": state.mlflow_run_id,
    }
    save_final(full, final_dir, spec.model, meta, tok)
    if tracker is not None:
        tracker.log_artifact(final_dir, "final")
        if spec.tracking.log_model and not is_uri(final_dir):
            link = (_VAL, "val/flops", "val/bytes_seen")  # the final validation (its last point)
            tracker.log_model(final_dir, args.run_name, spec.tracking.register_model, link)
    if args.eval_suite is not None:
        metrics = _suite_eval(args.eval_suite, spec, full, device, rank, tok)
        if tracker is not None:
            tracker.log_metrics(metrics, step)
    if tracker is not None:
        tracker.close("FINISHED")
    return {
        "step": step,
        "val_bits_per_byte": bpb,
        "final_checkpoint": final_dir,
        "mlflow_run_id": state.mlflow_run_id,
    }


def _logged(args: WorkerArgs, step: int, metrics: dict[str, Any]) -> bool:
    """Whether step ``step`` goes to MLflow: every ``train.log_every`` steps, the last one, and
    those with an eval suite. The loop and the replay of ``steps.jsonl`` both ask here."""
    last = step == args.plan.steps
    return step % args.spec.train.log_every == 0 or last or _SUITE_S in metrics


def _open_tracker(
    args: WorkerArgs, world: int, state: TrainState, extra_tags: dict[str, str], tok=None
) -> Tracker:
    """Rank 0's MLflow run: reopened by the checkpoint's run id or the run key, else created.

    A reopened run is backfilled from ``steps.jsonl`` up to the restored step, and from the
    marker an earlier ``Tracker.close`` left when the store did not answer (issue 18): the same
    command run again completes the run's metrics and finishes it.
    """
    from pipelines.data import is_complete, read_manifest
    from pipelines.preprocess import code_version
    from pipelines.spec import flatten
    from pipelines.tracking import dataset_input
    from pipelines.tracking_run import Tracker

    spec, t = args.spec, args.tracking
    manifest = read_manifest(args.dataset) if is_complete(args.dataset) else {}
    tags = {
        "aunet.variant": args.variant or "",
        "aunet.experiment_file": args.spec_file or "",
        "aunet.run_dir": args.run_dir,
        "aunet.dataset_hash": manifest.get("config_hash", ""),  # identity (docs/data.md)
        **extra_tags,
    }
    commit, job = code_version().get("git_commit"), ray_job_id()
    tags.update({"git_commit": commit} if commit else {})
    tags.update({"ray_job_id": job} if job else {})
    tracker = Tracker(
        t.uri,
        t.experiment,
        run_key=f"{args.run_dir}#{args.launch_id}",
        run_name=args.run_name,
        artifact_location=t.artifact_location,
        parent_run_id=t.parent_run_id,
        tags=tags,
        run_id=state.mlflow_run_id,
        **_tracker_files(args),
        resumed_step=state.step,
        system_metrics_s=spec.tracking.system_metrics_s,
    )
    params = {
        **flatten(spec),
        **args.plan.params(),
        "derived.world_size": world,
        # Pooling stages K (the bytes are stage 0): the paper's "AU-Net 2" has K = 1.
        "derived.pooling_stages": spec.model.num_stages,
        "derived.split_strategy": json.dumps(spec.model.split_strategy),
        "derived.variant": args.variant,
    }
    # A resolved entropy stage carries its model (KBs), a param at most 6000 chars: sha256 stays.
    tracker.log_params({k: abbreviate(v) if isinstance(v, str) else v for k, v in params.items()})
    if not tracker.resumed:
        import yaml

        with tempfile.TemporaryDirectory() as tmp:
            config = spec.to_dict()  # the logged copy holds no credentials
            config["tracking"]["tracking_uri"] = redact(spec.tracking.tracking_uri)
            (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            tracker.log_artifact(str(Path(tmp) / "config.yaml"))
        tracker.log_artifact(join_path(args.dataset, "manifest.json"), "dataset")
        if tok is not None:  # the verified tokenizer.json the dataset was encoded with
            tracker.log_artifact(
                join_path(args.dataset, manifest["tokenizer"]["file"]), "tokenizer"
            )
        if manifest:
            tracker.log_input(dataset_input(args.dataset, manifest))
    return tracker


def _tracker_files(args: WorkerArgs) -> dict[str, Any]:
    """The Tracker's replay source and marker: rank 0's files in a local run directory."""
    from pipelines.tracking_run import StepReplay

    if is_uri(args.run_dir):
        return {}
    run = Path(args.run_dir)
    replay = StepReplay(run / "steps.jsonl", lambda step, record: _logged(args, step, record))
    return {"replay": replay, "marker": run / MLFLOW_MARKER}


def _suite_eval(
    suite: EvalConfig | None,
    spec: ExperimentSpec,
    full: dict[str, torch.Tensor],
    device: torch.device,
    rank: int,
    tok: BPETokenizer | None = None,
) -> dict[str, float]:
    """The ``suite`` on ``full`` weights -> eval/<task>/<metric> (rank 0; the other ranks get {});
    a token model's suite scores bytes through ``tok``.

    Rank 0 scores a plain (unsharded) copy, so the suite's variable-length batches and greedy
    generation need no collective; the other ranks go on and wait in the next step's all-gather.
    The copy is in float32 on the training device and freed on return.
    """
    from pipelines.evaluate import evaluate

    if rank != 0:
        return {}
    model = AUNet(spec.model)
    model.load_state_dict(full)
    return evaluate(model.to(device).eval(), suite, context=spec.data.seq_len, tokenizer=tok)


def _wait_registered(run_dir: str, ckpt_step: int, timeout_s: float = 30.0) -> None:
    """Test-only fault injection: die only once the controller has recorded the last checkpoint.

    ``ray.train.report`` returns before the controller persists the checkpoint in its snapshot;
    dying in between would make the restart begin from an older checkpoint (a race, not a bug).
    """
    snapshot = Path(run_dir) / "checkpoint_manager_snapshot.json"
    if ckpt_step <= 0 or is_uri(run_dir):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if snapshot.is_file() and f"step_{ckpt_step:07d}" in snapshot.read_text():
            return
        time.sleep(0.1)
