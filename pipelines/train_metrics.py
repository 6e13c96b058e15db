"""What a training step measures and records: timings, the logged metrics, ``steps.jsonl``.

``steps.jsonl`` is rank 0's own record of every step (data position, the global sequence ids of
its batch, every metric): it is the ground truth that the resume tests check, and it survives a
tracking server that is down (docs/checkpoints.md). Metric names carry their MLflow chart group,
``train/``, ``val/`` or ``perf/`` (docs/platform.md, Metric names).

Bits per byte for every variant: a token model's validation divides the summed token NLL by the
exact bytes of the target tokens (the tokenizer's ``token_lengths``; BOS and EOS have none), so
it is on the byte models' axis. Its ``train/bits_per_byte`` and ``bytes_seen`` use the training
split's average bytes per token instead (``TrainPlan.bytes_per_token``): cheap per step, and exact
in expectation over the stream, not per batch.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aunet.loss import LN2
from aunet.parallel import all_reduce_sum
from pipelines.checkpointing import TrainState
from pipelines.data import DataPosition, val_batches
from pipelines.paths import is_uri
from pipelines.plan import TrainPlan
from pipelines.progress import duration, rate, say

if TYPE_CHECKING:
    from aunet.tokenizer import BPETokenizer


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    dataset: str,
    batch_size: int,
    rank: int,
    world: int,
    batches: int,
    tok: BPETokenizer | None = None,
) -> float | None:
    """Bits/byte over the first ``batches`` validation batches (all ranks); None if empty.

    Bytes: every target is a byte (BOS/EOS targets count as one, as in training's loss). Tokens
    (``tok``): the summed NLL of all targets over the bytes the targets spell.
    """
    model.eval()
    lengths = None if tok is None else torch.from_numpy(tok.token_lengths)
    nats = count = 0.0
    for b in val_batches(dataset, batch_size, rank=rank, world_size=world, max_batches=batches):
        out = model(*b.model_inputs())
        nats += float(out.ce) * b.targets.numel()
        count += b.targets.numel() if lengths is None else int(lengths[b.targets].sum())
    model.train()
    nats, count = all_reduce_sum([nats, count])
    return nats / count / LN2 if count else None


def peak_memory_bytes(device: torch.device) -> float:
    """This rank's peak memory so far: ``torch.cuda.max_memory_allocated`` on a GPU (tensors
    only, what ``aunet.memory`` estimates), the process's peak RSS on CPU (everything)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


class StepMeter:
    """Per-step timings and the metrics rank 0 logs.

    A step's time is data + compute + the previous step's leftover work (``other_s``: logging,
    the step log, reports); periodic work (validation, suites, checkpoints) is timed on its own
    and not charged as per-step overhead.
    """

    def __init__(
        self, plan: TrainPlan, world: int, peak: float | None, device: torch.device | None = None
    ) -> None:
        self.plan, self.world, self.peak = plan, world, peak
        self.device = device or torch.device("cpu")
        self.other_s = 0.0

    def begin(self) -> None:
        self.t_start = time.perf_counter()

    def data_loaded(self) -> None:
        self.t_data = time.perf_counter()

    def computed(self) -> None:
        self.t_comp = time.perf_counter()

    def metrics(
        self,
        step: int,
        sums: list[float],
        lr: float,
        grad_norm: float,
        epoch: int,
        state: TrainState,
    ) -> dict[str, float]:
        """``sums`` = all-reduced [loss, ce, tokens per stage...]; adds them to ``state.tokens``."""
        plan, world = self.plan, self.world
        step_tokens = [int(x) for x in sums[2:]]
        state.tokens = [a + b for a, b in zip(state.tokens, step_tokens)]
        data_s, compute_s = self.t_data - self.t_start, self.t_comp - self.t_data
        step_s = data_s + compute_s + self.other_s
        metrics = {
            "train/loss": sums[0] / world,
            "train/bits_per_byte": sums[1] / world / LN2 / plan.bytes_per_token,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/flops": plan.flops_per_step * step,
            "train/bytes_seen": plan.bytes_per_step * step,
            "train/epoch": epoch,
            "perf/bytes_per_s": plan.bytes_per_step / step_s,
            "perf/flops_per_s": plan.flops_per_step / step_s,
            "perf/data_s": data_s,
            "perf/compute_s": compute_s,
            "perf/other_s": self.other_s,
            "perf/overhead_fraction": (data_s + self.other_s) / step_s,
        }
        if self.peak:
            metrics["perf/mfu"] = metrics["perf/flops_per_s"] / (self.peak * world)
        metrics["perf/peak_memory_bytes"] = peak_memory_bytes(self.device)
        for s, n in enumerate(step_tokens):
            metrics[f"train/tokens/stage{s}"] = n
            metrics[f"train/tokens_total/stage{s}"] = state.tokens[s]
        return metrics

    def end(self, metrics: dict[str, float], periodic: bool) -> None:
        """Charge what happened after the compute to the next step, unless it was periodic."""
        other = time.perf_counter() - self.t_comp - metrics.get("perf/eval_s", 0.0)
        other -= metrics.get("perf/eval_suite_s", 0.0)
        self.other_s = 0.0 if periodic else other


class Progress:
    """Rank 0's progress line: every ``every`` steps, at least every ``seconds``, and at the last
    step: step/total, loss, train and (when just measured) validation bits/byte, bytes/s and
    FLOP/s over the steps since the previous line (MFU when the device's peak is known), and the
    ETA from this attempt's mean step time.

    A line, not a redrawn bar: a Ray worker's stdout is a pipe that Ray forwards to the driver's
    terminal line by line, where a bar's redraws would each become a line.
    """

    def __init__(
        self,
        plan: TrainPlan,
        every: int,
        seconds: float,
        start_step: int,
        peak_total: float | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.plan, self.every, self.seconds, self.peak = plan, every, seconds, peak_total
        self.clock, self.start = clock, start_step
        self.t0 = self.last_t = clock()
        self.last_step = start_step

    def update(self, step: int, metrics: dict[str, float]) -> str | None:
        """Print and return the line when one is due, else None."""
        now = self.clock()
        total = self.plan.steps
        due = step >= total or step - self.last_step >= self.every
        if not due and now - self.last_t < self.seconds:
            return None
        dt, n = max(now - self.last_t, 1e-9), step - self.last_step
        done = step - self.start
        eta = (now - self.t0) / done * (total - step) if done else float("nan")
        flops_s = n * self.plan.flops_per_step / dt
        parts = [
            f"step {step}/{total} ({step / total:.0%})",
            f"loss {metrics['train/loss']:.4f}",
            f"bits/byte {metrics['train/bits_per_byte']:.4f}",
        ]
        if "val/bits_per_byte" in metrics:
            parts.append(f"val bits/byte {metrics['val/bits_per_byte']:.4f}")
        parts.append(rate(n * self.plan.bytes_per_step / dt, "B/s"))
        mfu = f" (MFU {flops_s / self.peak:.1%})" if self.peak else ""
        parts += [rate(flops_s, "FLOP/s") + mfu, f"ETA {duration(eta)}"]
        line = "train: " + " | ".join(parts)
        say(line)
        self.last_t, self.last_step = now, step
        return line


class StepLog:
    """Rank 0's ``steps.jsonl``: one JSON line per step, appended (restarts add lines)."""

    def __init__(self, run_dir: str, rank: int):
        self.path = None
        if rank == 0 and not is_uri(run_dir):
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(run_dir) / "steps.jsonl"

    def write(
        self, step: int, attempt: str, position: DataPosition, ids, metrics: dict[str, Any]
    ) -> None:
        """``position``: where the step's batch came from; ``ids``: its global sequence ids."""
        if self.path is None:
            return
        record = {"step": step, "attempt": attempt, "time": time.time()}
        record.update(position=position.to_dict(), ids=ids.tolist(), **metrics)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
