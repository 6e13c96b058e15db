"""The per-worker training loop that ``pipelines.train`` runs under Ray Train's ``TorchTrainer``.

Every rank runs the same sequence of collectives (FSDP, the metric all-reduce, evaluation, DCP,
``ray.train.report``), so the loop must never branch on the rank except for writing files and
MLflow. A checkpoint holds the DCP-sharded model and optimizer, and per rank its RNG states; rank 0
adds ``trainer_state.json`` (step, data position, scheduler, counters, the MLflow run id). Restored,
it continues at the first batch the run has not trained on.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from aunet.checkpoint import save_pretrained
from aunet.loss import LN2
from aunet.model import AUNet
from aunet.optim import build_optimizer, build_scheduler, clip_gradients
from aunet.parallel import all_reduce_sum, local_device, param_dtype, peak_flops, shard
from pipelines.data import DataPosition, TrainBatches, val_batches

STATE_FILE = "trainer_state.json"


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, dataset: str, batch_size: int, rank: int, world: int, batches: int
) -> float | None:
    """Mean bits/byte over the first ``batches`` validation batches (all ranks); None if empty."""
    model.eval()
    nats, count = 0.0, 0.0
    for b in val_batches(dataset, batch_size, rank=rank, world_size=world, max_batches=batches):
        out = model(b.tokens, b.levels, b.targets)
        nats += float(out.ce) * b.tokens.numel()
        count += b.tokens.numel()
    model.train()
    nats, count = all_reduce_sum([nats, count])
    return nats / count / LN2 if count else None


class _StepLog:
    """Rank 0's ``steps.jsonl``: one JSON line per step, appended (restarts add lines)."""

    def __init__(self, run_dir: str, rank: int):
        self.path = None
        if rank == 0 and "://" not in run_dir:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(run_dir) / "steps.jsonl"

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _open_tracker(cfg: dict[str, Any], spec, plan, world: int, resumed_id: str | None):
    from pipelines.preprocess import code_version
    from pipelines.runtime import ray_job_id
    from pipelines.spec import flatten
    from pipelines.tracking import Tracker

    t = cfg["tracking"]
    tags = {
        "aunet.variant": cfg["variant"] or "",
        "aunet.experiment_file": cfg["spec_file"] or "",
        "aunet.run_dir": cfg["run_dir"],
    }
    commit, job = code_version().get("git_commit"), ray_job_id()
    tags.update({"git_commit": commit} if commit else {})
    tags.update({"ray_job_id": job} if job else {})
    tracker = Tracker(
        t["uri"],
        t["experiment"],
        run_key=f"{cfg['run_dir']}#{cfg['launch_id']}",
        run_name=cfg["run_name"],
        artifact_location=t["artifact_location"],
        parent_run_id=t["parent_run_id"],
        tags=tags,
        run_id=resumed_id,
    )
    tracker.log_params(
        {
            **flatten(spec),
            **plan.params(),
            "derived.world_size": world,
            "derived.num_stages": spec.model.num_stages,
            "derived.split_strategy": json.dumps(spec.model.split_strategy),
            "derived.variant": cfg["variant"],
        }
    )
    if not tracker.resumed:
        import yaml

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
            tracker.log_artifact(str(Path(tmp) / "config.yaml"))
        tracker.log_artifact(str(Path(cfg["dataset"]) / "manifest.json"), "dataset")
    return tracker


def _save_checkpoint(model, opt, state: dict[str, Any], rank: int, step: int, metrics: dict):
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
        torch.save(_rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
        if rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"step_{step:07d}",
        )


def _load_checkpoint(ckpt, model, opt, rank: int) -> dict[str, Any]:
    with ckpt.as_directory() as d:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=d)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng = Path(d) / f"rng_rank{rank}.pt"
        if rng.is_file():  # absent when the world size grew: keep the fresh seed
            _set_rng_state(torch.load(rng, weights_only=False))
        return json.loads((Path(d) / STATE_FILE).read_text())


def train_loop_per_worker(cfg: dict[str, Any]) -> dict[str, Any] | None:
    import ray.train

    from pipelines.spec import ExperimentSpec
    from pipelines.train import TrainPlan

    spec = ExperimentSpec.from_dict(cfg["spec"], source="train loop config")
    plan = TrainPlan(**cfg["plan"])
    tr, res = spec.train, spec.resources
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = local_device(res.use_gpu)
    dtype = param_dtype(tr.dtype, device)

    torch.manual_seed(spec.model.seed)  # identical initial weights on every rank
    model = AUNet(spec.model)
    shard(
        model,
        dtype != torch.float32,
        compile=tr.compile,
        activation_checkpointing=tr.activation_checkpointing,
    )
    model.to(device)
    opt = build_optimizer(
        model,
        plan.lr,
        weight_decay=tr.weight_decay,
        betas=tr.betas,
        eps=tr.eps,
        decay_norms_and_embeddings=tr.decay_norms_and_embeddings,
    )
    sched = build_scheduler(opt, plan.warmup_steps, plan.steps, tr.lr_min_ratio)
    torch.manual_seed(tr.seed + rank)
    random.seed(tr.seed + rank)

    state: dict[str, Any] = {"step": 0, "position": DataPosition().to_dict(), "tokens": None}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        state = _load_checkpoint(ckpt, model, opt, rank)
        for key in ("batch_size", "seq_len"):
            if state["plan"][key] != cfg["plan"][key]:
                raise ValueError(
                    f"run {cfg['run_name']}: its checkpoint has {key}="
                    f"{state['plan'][key]}, the spec {cfg['plan'][key]}; "
                    "use another run name (--fresh)"
                )
        if state["model"] != spec.model.to_dict():
            raise ValueError(
                f"run {cfg['run_name']}: its checkpoint has another model config; "
                "use another run name (--fresh)"
            )
        sched.load_state_dict(state["scheduler"])
    tracker = (
        _open_tracker(cfg, spec, plan, world, state.get("mlflow_run_id")) if rank == 0 else None
    )
    log = _StepLog(cfg["run_dir"], rank)
    attempt = uuid.uuid4().hex[:8]
    data = TrainBatches(
        cfg["dataset"],
        plan.batch_size,
        rank=rank,
        world_size=world,
        seed=tr.seed,
        position=DataPosition.from_dict(state["position"]),
    )
    batches = iter(data)
    peak = peak_flops(device)
    K = spec.model.num_stages
    tokens = state["tokens"] or [0] * (K + 1)
    fault = cfg.get("fault")
    step, val_bpb, other_s = state["step"], state.get("val_bits_per_byte"), 0.0
    if rank == 0 and step:
        print(f"train: {cfg['run_name']} resumed after step {step} at {state['position']}")

    while step < plan.steps:
        t_start = time.perf_counter()
        position = data.position
        batch = next(batches)
        tok, lev, tgt = (x.to(device, non_blocking=True) for x in batch)
        t_data = time.perf_counter()
        lr = sched.get_last_lr()[0]
        out = model(tok, lev, tgt)
        out.loss.backward()
        grad_norm = clip_gradients(model.parameters(), tr.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())  # synchronises the device: the timing below is real
        t_comp = time.perf_counter()
        step += 1
        sums = all_reduce_sum([loss, float(out.ce.detach()), *map(float, out.stage_tokens)])
        step_tokens = [int(x) for x in sums[2:]]
        tokens = [a + b for a, b in zip(tokens, step_tokens)]
        data_s, compute_s = t_data - t_start, t_comp - t_data
        step_s = data_s + compute_s + other_s
        metrics = {
            "loss": sums[0] / world,
            "bits_per_byte": sums[1] / world / LN2,
            "lr": lr,
            "grad_norm": grad_norm,
            "bytes_per_s": plan.bytes_per_step / step_s,
            "flops_per_s": plan.flops_per_step / step_s,
            "flops": plan.flops_per_step * step,
            "time/data_s": data_s,
            "time/compute_s": compute_s,
            "time/other_s": other_s,
            "time/overhead_fraction": (data_s + other_s) / step_s,
            "epoch": position.epoch,
        }
        if peak:
            metrics["mfu"] = metrics["flops_per_s"] / (peak * world)
        for s in range(K + 1):
            metrics[f"tokens/stage{s}"] = step_tokens[s]
            metrics[f"tokens_total/stage{s}"] = tokens[s]
        last = step == plan.steps
        if step % tr.eval_every == 0 or last:
            t_eval = time.perf_counter()
            val_bpb = evaluate(model, cfg["dataset"], plan.batch_size, rank, world, tr.eval_batches)
            metrics["val/bits_per_byte"] = val_bpb
            metrics["time/eval_s"] = time.perf_counter() - t_eval
        if tr.eval_suite_every and step % tr.eval_suite_every == 0 and not last:
            t_suite = time.perf_counter()  # (the last step's suite runs on the saved final weights)
            suite = _suite_eval(
                cfg["eval_suite"], spec, _full_state(model), plan.seq_len, device, rank
            )
            metrics.update(suite)
            metrics["time/eval_suite_s"] = time.perf_counter() - t_suite
        if tracker is not None and (
            step % tr.log_every == 0 or last or "time/eval_suite_s" in metrics
        ):
            tracker.log_metrics(metrics, step)
        log.write(
            {
                "step": step,
                "attempt": attempt,
                "time": time.time(),
                "position": position.to_dict(),
                "ids": data.global_ids(position).tolist(),
                **metrics,
            }
        )
        report = {
            "step": step,
            "loss": metrics["loss"],
            "flops": metrics["flops"],
            "val_bits_per_byte": val_bpb,
        }
        if step % tr.checkpoint_every == 0 or last:
            t_ck = time.perf_counter()
            state = {
                "step": step,
                "position": data.position.to_dict(),
                "tokens": tokens,
                "scheduler": sched.state_dict(),
                "val_bits_per_byte": val_bpb,
                "mlflow_run_id": tracker.run_id if tracker else None,
                "plan": cfg["plan"],
                "model": spec.model.to_dict(),
                "world_size": world,
            }
            _save_checkpoint(model, opt, state, rank, step, report)
            if tracker is not None:
                tracker.log_metrics({"time/checkpoint_s": time.perf_counter() - t_ck}, step)
        elif "val/bits_per_byte" in metrics:
            ray.train.report(report)  # evaluation results reach Tune callbacks too
        if (
            fault
            and (step, rank) == (fault["step"], fault["rank"])
            and not Path(fault["marker"]).exists()
        ):
            Path(fault["marker"]).write_text(str(step))
            _wait_registered(cfg["run_dir"], step - step % tr.checkpoint_every)
            os._exit(1)  # a real process death (test-only fault injection)
        other_s = time.perf_counter() - t_comp - metrics.get("time/eval_s", 0.0)
        other_s -= metrics.get("time/eval_suite_s", 0.0)
        if "time/eval_s" in metrics or step % tr.checkpoint_every == 0:
            other_s = 0.0  # periodic work is reported on its own, not as per-step overhead

    full = _full_state(model)  # a collective gather, written by rank 0 alone
    final_dir = f"{cfg['run_dir']}/final"
    if rank != 0:
        return None
    meta = {
        "run_name": cfg["run_name"],
        "step": step,
        "val_bits_per_byte": val_bpb,
        "plan": cfg["plan"],
        "variant": cfg["variant"],
        "mlflow_run_id": tracker.run_id if tracker is not None else None,
    }
    _save_final(full, final_dir, spec, meta)
    run_id = None
    if tracker is not None:
        tracker.log_metrics({"final/val_bits_per_byte": val_bpb}, step)
        tracker.log_artifact(final_dir, "final")
        if spec.tracking.log_model and "://" not in final_dir:
            _log_model(final_dir, tracker)
    if cfg["eval_suite"] is not None:
        metrics = _suite_eval(cfg["eval_suite"], spec, full, plan.seq_len, device, rank)
        if tracker is not None:
            tracker.log_metrics(metrics, step)
    if tracker is not None:
        tracker.close("FINISHED")
        run_id = tracker.run_id
    return {
        "step": step,
        "val_bits_per_byte": val_bpb,
        "final_checkpoint": final_dir,
        "mlflow_run_id": run_id,
    }


def _log_model(final_dir: str, tracker) -> None:
    """The final checkpoint as an MLflow pyfunc model (``mlflow models serve``); never fatal."""
    try:
        import mlflow

        from pipelines.serve import log_generation_model

        mlflow.set_tracking_uri(tracker.uri)
        uri = log_generation_model(final_dir, run_id=tracker.run_id)
        tracker.set_tags({"aunet.model_uri": uri})
    except Exception as e:  # the run's metrics and checkpoint artifact are already safe
        print(f"train: pyfunc model not logged ({type(e).__name__}: {e})", flush=True)


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on the CPU: a collective every rank must enter (rank 0 gets them)."""
    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def _suite_eval(
    suite, spec, full: dict[str, torch.Tensor], seq_len: int, device: torch.device, rank: int
) -> dict[str, float]:
    """The ``suite`` (an ``EvalConfig``) on ``full`` weights -> eval/<task>/<metric> (rank 0;
    the other ranks get {}).

    Rank 0 scores a plain (unsharded) copy, so the suite's variable-length batches and greedy
    generation need no collective; the other ranks go on and wait in the next step's all-gather.
    The copy is in float32 on the training device and freed on return.
    """
    from pipelines.evaluate import evaluate

    if rank != 0:
        return {}
    model = AUNet(spec.model)
    model.load_state_dict(full)
    return evaluate(model.to(device).eval(), suite, context=seq_len)


def _wait_registered(run_dir: str, ckpt_step: int, timeout_s: float = 30.0) -> None:
    """Test-only fault injection: die only once the controller has recorded the last checkpoint.

    ``ray.train.report`` returns before the controller persists the checkpoint in its snapshot;
    dying in between would make the restart begin from an older checkpoint (a race, not a bug).
    """
    snapshot = Path(run_dir) / "checkpoint_manager_snapshot.json"
    if ckpt_step <= 0 or "://" in run_dir:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if snapshot.is_file() and f"step_{ckpt_step:07d}" in snapshot.read_text():
            return
        time.sleep(0.1)


def _save_final(full: dict[str, torch.Tensor], final_dir: str, spec, meta: dict) -> None:
    """``save_pretrained`` locally, or into a temp dir copied to a ``pyarrow.fs`` URI."""
    if "://" not in final_dir:
        save_pretrained(full, final_dir, config=spec.model, metadata=meta)
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(full, tmp, config=spec.model, metadata=meta)
        pyarrow.fs.copy_files(tmp, final_dir)
