"""Step checkpoints of a training run: what is saved, when, and how a restart picks it up.

A step checkpoint (``<run>/step_NNNNNNN/``, committed by ``ray.train.report``) holds the DCP-sharded
model and optimizer, per rank its RNG states (``rng_rank{r}.pt``: tensors, tuples and ints only,
read back with ``weights_only=True`` so nothing in it can run code) and ``digests_rank{r}.json``
(the SHA-256 of every file that rank wrote), and from rank 0 ``trainer_state.json``: the
``TrainState`` fields plus the scheduler, the plan, the model config and the world size. Restored,
a run continues at the first batch it has not trained on. The final, consolidated checkpoint is
``aunet.checkpoint.save_pretrained``'s. Layout and resume rules: docs/checkpoints.md.

Every file is checked against its digest before anything is read, DCP's ``.metadata`` (a pickle)
included: a checkpoint that fails is skipped with a warning naming the file, and the previous one
is restored instead (Ray keeps two). Digests catch corruption and half-written copies; they do
not make an untrusted ``storage_path`` safe, since whoever can write the files can write the
digests too (docs/checkpoints.md).

Every rank enters ``save``/``restore`` (DCP is a collective); only rank 0 writes the JSON.
"""

from __future__ import annotations

import json
import random
import re
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

from aunet.checkpoint import CheckpointError, file_sha256, save_pretrained
from aunet.optim import resume_scheduler
from aunet.parallel import all_reduce_sum
from pipelines.data import DataPosition
from pipelines.paths import is_uri
from pipelines.runtime import open_filesystem

STATE_FILE = "trainer_state.json"
DIGESTS = "digests_rank{rank}.json"
# step_NNNNNNN, with a suffix for checkpoints saved after a fallback (see Checkpointer.restore)
_STEP_DIR = re.compile(r"^step_(\d{7})(_[0-9a-f]{6})?$")
# Keys of the plan a checkpoint must share with the spec that resumes it (steps may grow).
RESUME_KEYS = ("batch_size", "seq_len")


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
        run_dir: str,
        plan: dict[str, Any],
        model_config: dict[str, Any],
    ) -> None:
        self.every, self.rank, self.world_size, self.run_dir = every, rank, world_size, run_dir
        self.run_name, self.plan, self.model_config = run_name, plan, model_config
        self.suffix = ""

    def due(self, step: int, last: bool) -> bool:
        return step % self.every == 0 or last

    def restore(self, model, opt, sched, state: TrainState) -> bool:
        """Load the newest intact checkpoint of this run into everything given; False if none.

        Ray's latest checkpoint first, then the older ``step_*`` directories of ``run_dir``: a
        checkpoint any rank finds damaged is skipped (all ranks agree through one all-reduce).
        After a fallback, new checkpoints get a suffix agreed by all ranks: a step saved again
        under its old name would share the path of a registered damaged checkpoint, and Ray
        deletes that path when it retires the damaged one.
        """
        import ray.train

        latest = ray.train.get_checkpoint()
        if latest is None:
            return False
        problems = []
        for ckpt in [latest, *_older_checkpoints(self.run_dir, Path(latest.path).name)]:
            with ckpt.as_directory() as d:
                problem = verify_checkpoint(Path(d))
                if all_reduce_sum([1.0 if problem else 0.0])[0]:
                    problems.append(problem or f"{ckpt.path}: damaged on another rank")
                    print(f"train: WARNING: skipping checkpoint: {problems[-1]}", flush=True)
                    continue
                self._load(Path(d), model, opt, sched, state)
                if problems:
                    token = random.SystemRandom().randrange(1 << 24) if self.rank == 0 else 0
                    self.suffix = f"_{int(all_reduce_sum([float(token)])[0]):06x}"
                return True
        raise CheckpointError(f"run {self.run_name}: no intact checkpoint: {'; '.join(problems)}")

    def _load(self, d: Path, model, opt, sched, state: TrainState) -> None:
        saved = json.loads((d / STATE_FILE).read_text())
        check_resumable(saved, self.plan, self.model_config, self.run_name)
        msd, osd = get_state_dict(model, opt)
        loaded = {"model": msd, "optim": osd}
        dcp.load(loaded, checkpoint_id=str(d))
        set_state_dict(
            model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
        )
        rng = d / f"rng_rank{self.rank}.pt"
        if rng.is_file():  # absent when the world size grew: keep the fresh seed
            try:
                rng_state = torch.load(rng, weights_only=True)
            except Exception as e:  # weights_only refuses any global: code is never run
                lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [repr(e)]
                why = next((x for x in lines if "Unsupported global" in x), lines[0])[:200]
                raise CheckpointError(f"{rng}: refused, not a plain RNG state ({why})") from None
            _set_rng_state(rng_state)
        resume_scheduler(sched, int(saved["scheduler"]["last_epoch"]))
        state.load_state_dict(saved)

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
            # The directory holds only this rank's files (Ray merges the ranks' directories).
            mine = {p.name: file_sha256(p) for p in sorted(Path(tmp).iterdir())}
            (Path(tmp) / DIGESTS.format(rank=self.rank)).write_text(json.dumps(mine, indent=0))
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"step_{state.step:07d}{self.suffix}",
            )


def verify_checkpoint(d: Path) -> str | None:
    """None if ``d`` is a complete checkpoint whose files match their digests, else what is wrong
    (naming the file). Every rank's digest file must be there, and rank 0's must cover DCP's
    ``.metadata`` and ``trainer_state.json``: a checkpoint without digests is not trusted."""
    try:
        saved = json.loads((d / STATE_FILE).read_text())
        world = int(saved["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{d / STATE_FILE}: missing or unreadable ({type(e).__name__})"
    for rank in range(world):
        listing = d / DIGESTS.format(rank=rank)
        try:
            digests = json.loads(listing.read_text())
        except (OSError, ValueError) as e:
            return f"{listing}: missing or unreadable ({type(e).__name__}; no digests, not trusted)"
        if rank == 0 and not {".metadata", STATE_FILE} <= set(digests):
            return f"{listing}: does not cover .metadata and {STATE_FILE}"
        for name, expected in digests.items():
            f = d / name
            if not f.is_file():
                return f"{f}: missing"
            if file_sha256(f) != expected:
                return f"{f}: SHA-256 does not match {listing.name} (corrupt or changed)"
    return None


def check_resumable(
    saved: dict[str, Any], plan: dict[str, Any], model_config: dict[str, Any], run_name: str
) -> None:
    """Refuse a checkpoint of another batch size, sequence length or model, naming the run."""
    for key in RESUME_KEYS:
        if key in plan and saved["plan"][key] != plan[key]:
            raise ValueError(
                f"run {run_name}: its checkpoint has {key}={saved['plan'][key]}, the spec "
                f"{plan[key]}; use another run name (--fresh)"
            )
    if saved["model"] != model_config:
        raise ValueError(
            f"run {run_name}: its checkpoint has another model config; "
            "use another run name (--fresh)"
        )


def step_dirs(run_dir: str) -> list[str]:
    """The ``step_NNNNNNN`` directory names under ``run_dir`` (local or a pyarrow URI), newest
    first; [] when there is none."""
    import pyarrow.fs

    fs, root = open_filesystem(run_dir)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    dirs = [i for i in infos if i.type == pyarrow.fs.FileType.Directory]
    steps = [
        (int(m.group(1)), i.mtime_ns or 0, i.base_name)
        for i in dirs
        if (m := _STEP_DIR.match(i.base_name))
    ]
    return [name for *_, name in sorted(steps, reverse=True)]


def _older_checkpoints(run_dir: str, latest: str) -> list[Any]:
    """Checkpoints of ``run_dir`` older than the directory named ``latest``, newest first."""
    import ray.train

    fs, root = open_filesystem(run_dir)
    names = step_dirs(run_dir)
    older = names[names.index(latest) + 1 :] if latest in names else names
    return [ray.train.Checkpoint(path=f"{root}/{name}", filesystem=fs) for name in older]


def require_intact_checkpoint(run_dir: str) -> None:
    """For a local run directory with step checkpoints: raise CheckpointError, naming every
    problem, unless at least one of them verifies (``verify_checkpoint``). Remote directories are
    verified by the workers, which download them."""
    if is_uri(run_dir):
        return
    names = step_dirs(run_dir)
    problems = [verify_checkpoint(Path(run_dir) / name) for name in names]
    if names and all(problems):
        raise CheckpointError(f"{run_dir}: no intact checkpoint to resume: {'; '.join(problems)}")


def latest_saved_state(run_dir: str) -> dict[str, Any] | None:
    """``trainer_state.json`` of the newest step checkpoint with a readable one, else None (the
    driver checks it against the spec before Ray starts)."""

    fs, root = open_filesystem(run_dir)
    for name in step_dirs(run_dir):
        try:
            with fs.open_input_stream(f"{root}/{name}/{STATE_FILE}") as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            continue
    return None


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on the CPU: a collective every rank must enter (rank 0 gets them)."""
    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def save_final(
    full: dict[str, torch.Tensor], final_dir: str, config, meta: dict, tokenizer=None
) -> None:
    """``save_pretrained`` locally, or into a temp dir copied to a ``pyarrow.fs`` URI; a token
    model's ``tokenizer`` (``aunet.tokenizer.BPETokenizer``) is saved with its weights."""
    if not is_uri(final_dir):
        save_pretrained(full, final_dir, config=config, metadata=meta, tokenizer=tokenizer)
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(full, tmp, config=config, metadata=meta, tokenizer=tokenizer)
        pyarrow.fs.copy_files(tmp, final_dir)
