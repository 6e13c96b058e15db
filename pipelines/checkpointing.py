"""Step checkpoints of a training run: what is saved, when, and how a restart picks it up.

A step checkpoint (``<run>/step_NNNNNNN/``, committed by ``ray.train.report``) holds the DCP-sharded
model and optimizer, per rank its RNG states (``rng_rank{r}.pt``: tensors, tuples and ints only,
read back with ``weights_only=True`` so nothing in it can run code), and from rank 0
``trainer_state.json``: the ``TrainState`` fields plus the scheduler, the plan, the model config
and the world size. Restored, a run continues at the first batch it has not trained on. The
final, consolidated checkpoint is ``aunet.checkpoint.save_pretrained``'s. Layout and resume rules:
docs/checkpoints.md.

Every rank enters ``save``/``restore`` (DCP is a collective); only rank 0 writes the JSON.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import dataclass, field
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
from pipelines.data import DataPosition
from pipelines.runtime import is_uri  # (moves to pipelines.paths)

STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """The loop's own progress (Stateful: ``state_dict``/``load_state_dict``, JSON-able).

    ``tokens``: tokens seen so far per stage (bytes, then each pooled stage), all ranks summed.
    ``mlflow_run_id`` travels with the checkpoint so that a resumed run reopens its MLflow run.
    """

    num_levels: int
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    tokens: list[int] = field(default_factory=list)
    val_bits_per_byte: float | None = None
    mlflow_run_id: str | None = None

    def __post_init__(self) -> None:
        self.tokens = list(self.tokens) or [0] * self.num_levels

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "position": self.position.to_dict(),
            "tokens": self.tokens,
            "val_bits_per_byte": self.val_bits_per_byte,
            "mlflow_run_id": self.mlflow_run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.position = DataPosition.from_dict(state["position"])
        self.tokens = list(state["tokens"] or [0] * self.num_levels)
        self.val_bits_per_byte = state.get("val_bits_per_byte")
        self.mlflow_run_id = state.get("mlflow_run_id")


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


class Checkpointer:
    """Decides when to save, saves through ``ray.train.report``, restores Ray's latest checkpoint.

    ``plan``/``model_config`` are the run's (``TrainPlan.to_dict()``, ``AUNetConfig.to_dict()``):
    a checkpoint taken with another batch size, sequence length or model is refused with a message
    naming the run, instead of silently training a different run.
    """

    def __init__(
        self,
        every: int,
        *,
        rank: int,
        world_size: int,
        run_name: str,
        plan: dict[str, Any],
        model_config: dict[str, Any],
    ) -> None:
        self.every, self.rank, self.world_size = every, rank, world_size
        self.run_name, self.plan, self.model_config = run_name, plan, model_config

    def due(self, step: int, last: bool) -> bool:
        return step % self.every == 0 or last

    def restore(self, model, opt, sched, state: TrainState) -> bool:
        """Load Ray's latest checkpoint of this run into everything given; False if none."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return False
        with ckpt.as_directory() as d:
            msd, osd = get_state_dict(model, opt)
            loaded = {"model": msd, "optim": osd}
            dcp.load(loaded, checkpoint_id=d)
            set_state_dict(
                model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
            )
            rng = Path(d) / f"rng_rank{self.rank}.pt"
            if rng.is_file():  # absent when the world size grew: keep the fresh seed
                _set_rng_state(torch.load(rng, weights_only=True))
            saved = json.loads((Path(d) / STATE_FILE).read_text())
        for key in ("batch_size", "seq_len"):
            if saved["plan"][key] != self.plan[key]:
                raise ValueError(
                    f"run {self.run_name}: its checkpoint has {key}={saved['plan'][key]}, the "
                    f"spec {self.plan[key]}; use another run name (--fresh)"
                )
        if saved["model"] != self.model_config:
            raise ValueError(
                f"run {self.run_name}: its checkpoint has another model config; "
                "use another run name (--fresh)"
            )
        sched.load_state_dict(saved["scheduler"])
        state.load_state_dict(saved)
        return True

    def save(self, model, opt, sched, state: TrainState, report: dict[str, Any]) -> None:
        """A step checkpoint, committed together with ``report`` (what Tune callbacks see)."""
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
            torch.save(_rng_state(), Path(tmp) / f"rng_rank{self.rank}.pt")
            if self.rank == 0:
                saved = {
                    **state.state_dict(),
                    "scheduler": sched.state_dict(),
                    "plan": self.plan,
                    "model": self.model_config,
                    "world_size": self.world_size,
                }
                (Path(tmp) / STATE_FILE).write_text(json.dumps(saved))
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"step_{state.step:07d}",
            )


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on the CPU: a collective every rank must enter (rank 0 gets them)."""
    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def save_final(full: dict[str, torch.Tensor], final_dir: str, config, meta: dict) -> None:
    """``save_pretrained`` locally, or into a temp dir copied to a ``pyarrow.fs`` URI."""
    if not is_uri(final_dir):
        save_pretrained(full, final_dir, config=config, metadata=meta)
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(full, tmp, config=config, metadata=meta)
        pyarrow.fs.copy_files(tmp, final_dir)
