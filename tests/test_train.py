"""Training: plan and schedule against their formulas, then real Ray Train runs (2 CPU workers).

The Ray runs share one module-scoped session and one killed-and-resumed run (a real ``os._exit``
in rank 1 after a checkpoint), which the tests inspect from several sides.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from aunet.checkpoint import load_pretrained
from aunet.flops import flops_per_byte
from aunet.model import AUNet
from aunet.optim import (
    build_optimizer,
    build_scheduler,
    clip_gradients,
    resume_scheduler,
    warmup_steps,
)
from pipelines.plan import plan_training
from pipelines.spec import ExperimentSpec, SpecError
from pipelines.train_worker import FaultInjection

CORPUS = Path(__file__).resolve().parent.parent / "experiments" / "data" / "quickstart.jsonl.gz"
SEED = 7
EVAL = CORPUS.parent.parent / "eval" / "data"
EVAL_YAML = """
name: t-suite
tasks:  # relative paths: the driver's directory, not the Ray worker's
  val: {kind: bpb, path: evdata/val.jsonl.gz, limit: 4}
  piqa: {kind: choice, format: piqa, path: evdata/piqa.jsonl}
"""


@contextlib.contextmanager
def _chdir(path: Path):  # contextlib.chdir is Python >= 3.11; the project supports 3.10
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _spec(root: Path, **train) -> ExperimentSpec:
    raw = {
        "name": "t",
        "data": {
            "sources": str(CORPUS),
            "seq_len": 64,
            "val_fraction": 0.25,
            "max_documents": 24,
            "dataset_dir": str(root / "dataset"),
        },
        "model": {
            "dimensions": [32, 64],
            "layers": [1, 1],
            "head_dims": [16, 16],
            "max_seqlens": [64, 16],
            "strategy": {"word1": "1@1"},
        },
        "train": {
            "steps": 8,
            "batch_size": 4,
            "lr": 3e-3,
            "warmup": 1,
            "eval_every": 4,
            "eval_batches": 2,
            "checkpoint_every": 3,
            "seed": SEED,
            **train,
        },
        "tracking": {
            "tracking_uri": f"sqlite:///{root}/mlruns.db",
            "experiment": "t",
            "artifact_location": str(root / "artifacts"),
        },
        "resources": {"num_workers": 2, "storage_path": str(root / "runs"), "max_failures": 1},
    }
    return ExperimentSpec.from_dict(raw, cwd=str(root))


# ------------------------------------------------------------------ no Ray
def test_schedule_matches_formula():
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=1.0)
    N, W, m = 10, 3, 0.1
    sched = build_scheduler(opt, W, N, m)
    used = []
    for _ in range(N + 2):
        used.append(sched.get_last_lr()[0])  # the lr of the next update
        opt.step()
        sched.step()
    expected = [1 / 3, 2 / 3, 1.0]
    expected += [m + (1 - m) * (1 + math.cos(math.pi * (n - W) / (N - W))) / 2 for n in range(4, N)]
    expected += [m, m, m]
    assert used == pytest.approx(expected)
    assert warmup_steps(0.1, 1000) == 100 and warmup_steps(10, 1000) == 10
    assert warmup_steps(0.0, 50) == 0 and warmup_steps(0.001, 50) == 1


def test_resumed_schedule_follows_the_new_spec():
    """A run resumed after 4 updates with more steps and another lr: update 5 on uses the new
    schedule (formula as above), on every param group, whatever the restored optimizer held."""
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW([{"params": [lin.weight]}, {"params": [lin.bias]}], lr=1.0)
    old = build_scheduler(opt, 3, 10, 0.1)
    for _ in range(4):
        opt.step()
        old.step()
    new = build_scheduler(opt, 3, 20, 0.1)
    for g in opt.param_groups:  # what DCP restores: the old run's hyperparameters
        g["lr"], g["initial_lr"] = old.get_last_lr()[0], 1.0
    new.base_lrs = [2.0, 2.0]  # the spec's lr, as a fresh scheduler on a fresh optimizer has it
    resume_scheduler(new, 4)
    for n in range(5, 22):
        want = 2.0 * (0.1 + 0.9 * (1 + math.cos(math.pi * min(n - 3, 17) / 17)) / 2)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([want, want]), n
        assert new.get_last_lr() == pytest.approx([want, want])
        opt.step()
        new.step()


def test_weight_decay_groups_and_clipping():
    model = AUNet(_spec(Path("/x")).model)
    (g,) = build_optimizer(model, 1e-3).param_groups  # official: one group, all decayed
    assert len(g["params"]) == len(list(model.parameters())) and g["weight_decay"] == 0.1
    decay, keep = build_optimizer(model, 1e-3, decay_norms_and_embeddings=False).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    kept = sorted(names[id(p)] for p in keep["params"])
    assert keep["weight_decay"] == 0.0 and "tok_embeddings.weight" in kept
    assert all(n.endswith("norm.weight") or n == "tok_embeddings.weight" for n in kept)
    assert all(p.ndim >= 2 for p in decay["params"])
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    naive = math.sqrt(sum(0.01**2 * p.numel() for p in model.parameters()))
    assert clip_gradients(model.parameters(), 0.2) == pytest.approx(naive, rel=1e-5)
    clipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    assert clipped == pytest.approx(0.2, rel=1e-4)


def test_plan_from_budget_follows_the_scaling_laws():
    spec = _spec(Path("/x"), steps=None, flop_budget=3e11, batch_size=None, lr=None, warmup=0.1)
    plan = plan_training(spec, world_size=2)
    fpb = flops_per_byte(spec.model, 64)
    batch = max(2, round(0.66 * 3e11**0.321 / 64))
    batch += batch % 2  # up to a multiple of the 2 workers
    assert plan.batch_size == batch and plan.flops_per_byte == fpb
    step_flops = fpb * 64 * batch  # the one step rule: the nearest whole step to the budget
    assert plan.steps == round(3e11 / step_flops) and abs(plan.total_flops - 3e11) <= step_flops / 2
    assert plan.lr == pytest.approx(6.6 * (fpb * 64 * batch * plan.steps) ** -0.176)
    assert plan.warmup_steps == max(1, round(0.1 * plan.steps))  # warmup 0.1: a fraction
    fixed = plan_training(_spec(Path("/x"), steps=500, batch_size=None), world_size=1)
    C = fpb * 64 * fixed.batch_size * 500  # the batch is consistent with the run's own FLOPs
    assert abs(fixed.batch_size - 0.66 * C**0.321 / 64) <= 1
    with pytest.raises(SpecError, match="train.batch_size: 5 is not a multiple of 2"):
        plan_training(_spec(Path("/x"), batch_size=5), world_size=2)
    with pytest.raises(SpecError, match="train.flop_budget"):
        plan_training(_spec(Path("/x"), steps=None, flop_budget=1e3), world_size=2)


# ------------------------------------------------------------------ real Ray Train
def test_progress_cadence_and_figures_with_a_fake_clock(capsys):
    from pipelines.plan import TrainPlan
    from pipelines.train_metrics import Progress

    now = [100.0]
    plan = TrainPlan(
        seq_len=64,
        batch_size=4,
        steps=10,
        warmup_steps=1,
        lr=1e-3,
        flops_per_byte=1e6,
        num_params=1,
        batch_from_scaling_law=False,
        lr_from_scaling_law=False,
    )
    p = Progress(plan, every=3, seconds=30, start_step=0, peak_total=1e9, clock=lambda: now[0])
    m = {"train/loss": 2.0, "train/bits_per_byte": 2.8854}
    shown = []
    for step in range(1, 11):
        now[0] += 40.0 if step == 5 else 1.0  # step 5 takes 40 s: a line on time alone
        if p.update(step, {**m, "val/bits_per_byte": 3.0} if step == 6 else m):
            shown.append(step)
    assert shown == [3, 5, 8, 10]  # every 3 steps, after 30 s, then the last step
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("train: step 3/10 (30%) | loss 2.0000")
    bps = 3 * plan.bytes_per_step / 3.0  # 3 steps in 3 s since the start
    assert f"{bps / 1e3:.3g} kB/s" in lines[0] or f"{bps:.3g} B/s" in lines[0]
    assert "ETA 0m07s" in lines[0]  # 1 s per step, 7 steps left
    assert "val bits/byte" not in lines[2]  # validation ran at step 6, not in the line at 8
    flops = 2 * plan.flops_per_step / 41.0  # steps 4-5 took 41 s
    assert f"(MFU {flops / 1e9:.1%})" in lines[1]


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module. With the dashboard: Ray 2.60's PlacementGroupCleaner asks the
    State API (served by the dashboard) whether the Train controller lives, and on a loaded box
    without it has taken a failed query for a dead controller and killed the workers."""
    import ray

    from pipelines.runtime import init_ray
    from pipelines.spec import ResourcesConfig

    init_ray(ResourcesConfig(), num_cpus=2, include_dashboard=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def killed_run(ray_session, tmp_path_factory):
    """8 steps on 2 workers, checkpoints after steps 3 and 6; rank 1 dies after step 4."""
    from pipelines.train import train

    root = tmp_path_factory.mktemp("train")
    (root / "eval.yaml").write_text(EVAL_YAML)
    (root / "evdata").mkdir()
    shutil.copy(CORPUS.parent / "quickstart_val.jsonl.gz", root / "evdata/val.jsonl.gz")
    shutil.copy(EVAL / "piqa_sample.jsonl", root / "evdata/piqa.jsonl")
    spec = _spec(
        root, eval_suite="eval.yaml", eval_suite_every=3, progress_every=2, progress_seconds=1e6
    ).with_overrides({"tracking.system_metrics_s": 1})
    marker = root / "killed"
    fault = FaultInjection(step=4, rank=1, marker=str(marker))
    out = io.StringIO()  # what the user's terminal shows: Ray forwards the workers' output here
    with _chdir(root), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        result = train(spec, run_name="killed", fault=fault)  # the eval paths are the driver's
        deadline = time.monotonic() + 15  # Ray's log monitor forwards lines asynchronously
        while "step 8/8" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.2)
    assert marker.read_text() == "4"  # the fault did fire
    records = [json.loads(x) for x in (root / "runs/killed/steps.jsonl").read_text().splitlines()]
    PROGRESS.append(out.getvalue())
    return spec, root, result, records


PROGRESS: list[str] = []  # killed_run's captured stdout


def test_progress_lines_at_the_configured_cadence(killed_run):
    """Every 2 steps of each attempt (the first from step 0, the resumed one from the step-3
    checkpoint) and the last step, with the step's loss, throughput and ETA."""
    spec, root, result, records = killed_run
    lines = [ln for ln in PROGRESS[0].splitlines() if "train: step " in ln]
    steps = [int(ln.split("train: step ")[1].split("/")[0]) for ln in lines]
    assert steps == [2, 4, 5, 7, 8], lines
    last = _chain(records)
    for ln, step in zip(lines[2:], steps[2:]):  # the resumed attempt is the chain's record
        assert (
            f"step {step}/8 ({step / 8:.0%})" in ln and f"loss {last[step]['train/loss']:.4f}" in ln
        )
        assert "B/s | " in ln and "FLOP/s" in ln and "ETA " in ln
    assert "val bits/byte" in lines[1] and "val bits/byte" in lines[4]  # steps 4 and 8 validate
    assert "ETA 0m00s" in lines[-1]
    # Ray Train's own INFO chatter stays in Ray's log files (no --verbose).
    assert "Reporting training result" not in PROGRESS[0]


def _chain(records: list[dict]) -> dict[int, dict]:
    """The record each step ends with (a later attempt overrides an earlier one)."""
    return {r["step"]: r for r in records}


def test_killed_worker_resumes_without_repeat_or_skip(killed_run):
    spec, root, result, records = killed_run
    attempts = list(dict.fromkeys(r["attempt"] for r in records))
    assert len(attempts) == 2 and result.steps == 8
    first = [r for r in records if r["attempt"] == attempts[0]]
    second = [r for r in records if r["attempt"] == attempts[1]]
    assert [r["step"] for r in second] == [4, 5, 6, 7, 8]  # resumed from the step-3 checkpoint
    assert [r["step"] for r in first][:4] == [1, 2, 3, 4]
    chain = _chain(records)
    assert sorted(chain) == list(range(1, 9))
    # the data order is the naive seeded permutation, batch after batch, nothing repeated
    from pipelines.data import load_split

    n = len(load_split(root / "dataset", "train")[0])
    perm = np.random.default_rng([SEED, 0]).permutation(n)
    for step, r in chain.items():
        assert r["position"] == {"epoch": 0, "batch": step - 1}
        assert r["ids"] == perm[(step - 1) * 4 : step * 4].tolist()
    ids = [i for r in chain.values() for i in r["ids"]]
    assert len(ids) == len(set(ids)) == 32
    # the resumed step 4 is the same computation as before the crash
    before, after = first[3], second[0]
    assert before["ids"] == after["ids"]
    assert after["train/loss"] == pytest.approx(before["train/loss"], abs=1e-6)
    assert after["train/lr"] == before["train/lr"]
    assert after["train/flops"] == before["train/flops"]
    # and it trains: the loss falls
    losses = [chain[s]["train/loss"] for s in range(1, 9)]
    assert np.mean(losses[-3:]) < losses[0] - 0.5


def test_mlflow_holds_one_run_with_params_metrics_artifacts(killed_run):
    from mlflow.tracking import MlflowClient

    spec, root, result, _ = killed_run
    client = MlflowClient(f"sqlite:///{root}/mlruns.db")
    exp = client.get_experiment_by_name("t")
    (run,) = client.search_runs([exp.experiment_id], "tags.`aunet.run_dir` LIKE '%/killed'")
    assert run.info.run_id == result.mlflow_run_id and run.info.status == "FINISHED"
    assert run.data.tags["aunet.model_uri"].startswith("models:/")  # servable pyfunc model
    p = run.data.params
    assert p["model.dimensions"] == "[32, 64]" and p["derived.split_strategy"] == '{"word1": "1@1"}'
    assert p["plan.batch_size"] == "4" and p["plan.lr"] == "0.003" and p["train.steps"] == "8"
    assert int(p["plan.num_params"]) == sum(x.numel() for x in AUNet(spec.model).parameters())
    assert float(p["plan.flops_per_byte"]) > 0
    # Groups in MLflow's charts: train/, val/, perf/ (eval/: the suite, system/: MLflow) and no
    # one-point chart: the final validation is val/bits_per_byte's last point.
    for key in (
        "train/loss",
        "train/bits_per_byte",
        "train/lr",
        "train/grad_norm",
        "train/flops",
        "train/bytes_seen",
        "train/tokens/stage0",
        "train/tokens/stage1",
        "val/bits_per_byte",
        "perf/bytes_per_s",
        "perf/flops_per_s",
        "perf/peak_memory_bytes",
        "perf/checkpoint_s",
    ):
        assert key in run.data.metrics, key
    groups = {k.split("/")[0] for k in run.data.metrics}
    assert groups == {"train", "val", "perf", "eval", "system"}, groups
    assert run.data.metrics["perf/peak_memory_bytes"] > 0  # peak RSS on CPU
    model = client.get_logged_model(run.data.tags["aunet.model_uri"].removeprefix("models:/"))
    assert model.name == result.run_name and model.source_run_id == run.info.run_id
    linked = {m.key: (m.step, m.value) for m in model.metrics}
    assert linked["val/bits_per_byte"] == (8, run.data.metrics["val/bits_per_byte"])
    assert linked["val/flops"][1] == run.data.metrics["train/flops"]
    assert run.data.tags["aunet.attention"] == "sdpa"  # train.attention: auto, on CPU
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")})
    assert steps == list(range(1, 9))
    flops = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/flops")}
    assert flops[8] == pytest.approx(8 * flops[1])
    assert run.data.metrics["train/tokens/stage0"] == 4 * 64  # summed over both ranks
    # Every validation point carries its compute and data axes (bits/byte vs FLOPs in MLflow).
    history = {
        k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
        for k in ("val/bits_per_byte", "val/flops", "val/bytes_seen", "train/bytes_seen")
    }
    assert sorted(history["val/bits_per_byte"]) == sorted(history["val/flops"]) == [4, 8]
    for step in (4, 8):
        assert history["val/flops"][step] == pytest.approx(flops[step])
        assert history["val/bytes_seen"][step] == step * 4 * 64 == history["train/bytes_seen"][step]
    assert "git_commit" in run.data.tags
    assert len(run.data.tags["aunet.dataset_hash"]) == 64  # the report's provenance
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert cpu and all(0 <= m.value <= 100 * os.cpu_count() for m in cpu)  # MLflow's monitor
    (ds,) = run.inputs.dataset_inputs  # the dataset as a run input: where, and which content
    assert ds.dataset.digest == run.data.tags["aunet.dataset_hash"][:36]
    assert ds.dataset.name == "t" and str(root / "dataset") in ds.dataset.source
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "dataset", "final"} <= top
    final = {a.path for a in client.list_artifacts(run.info.run_id, "final")}
    assert final == {"final/config.json", "final/model.safetensors"}


def test_final_checkpoint_loads_without_ray(killed_run):
    from pipelines.data import val_batches

    spec, root, result, _ = killed_run
    model = load_pretrained(result.final_checkpoint)  # no Ray, no process group
    nats, count = 0.0, 0
    with torch.no_grad():
        for b in val_batches(root / "dataset", 4, max_batches=2):
            nats += float(model(b.tokens, b.levels, b.targets).ce) * b.tokens.numel()
            count += b.tokens.numel()
    assert nats / count / math.log(2) == pytest.approx(result.val_bits_per_byte, abs=1e-4)


def test_two_ray_workers_match_one_plain_process(killed_run):
    """The whole Ray/FSDP loop against a naive single-process loop on the same batches."""
    from pipelines.data import TrainBatches

    spec, root, _, records = killed_run
    tr = spec.train
    torch.manual_seed(spec.model.seed)
    model = AUNet(spec.model)
    opt = build_optimizer(model, tr.lr, weight_decay=tr.weight_decay, betas=tr.betas)
    sched = build_scheduler(opt, 1, tr.steps, tr.lr_min_ratio)
    chain = _chain(records)
    for step, batch in zip(range(1, 9), TrainBatches(root / "dataset", 4, seed=SEED)):
        out = model(*batch)
        out.loss.backward()
        clip_gradients(model.parameters(), tr.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        assert batch.ids.tolist() == chain[step]["ids"]
        assert float(out.loss.detach()) == pytest.approx(chain[step]["train/loss"], abs=1e-4), step


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP read in one process
def test_eval_suite_runs_periodically_and_on_the_final_weights(killed_run):
    """train.eval_suite_every=3: the suite at steps 3 and 6 (across the crash) and 8 (the end),
    each equal to the suite run offline on that step's weights (the DCP checkpoint, the final)."""
    import torch.distributed.checkpoint as dcp
    from mlflow.tracking import MlflowClient

    from pipelines.eval_config import load_eval_config
    from pipelines.evaluate import evaluate

    spec, root, result, _ = killed_run
    client = MlflowClient(f"sqlite:///{root}/mlruns.db")
    logged: dict[int, dict[str, float]] = {}
    for key in (
        "eval/val/bits_per_byte",
        "eval/val/en/bits_per_byte",
        "eval/piqa/acc",
        "eval/piqa/acc_norm",
    ):
        for m in client.get_metric_history(result.mlflow_run_id, key):
            logged.setdefault(m.step, {})[key] = m.value
    assert sorted(logged) == [3, 6, 8] and all(len(v) == 4 for v in logged.values())
    model = AUNet(spec.model)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(root / "runs/killed/step_0000006"))  # model part only
    model.load_state_dict(state["model"])
    suite = load_eval_config(root / "eval.yaml", cwd=str(root))
    for step, net in ((6, model), (8, load_pretrained(result.final_checkpoint))):
        expected = evaluate(net, suite, context=64)
        for key, value in logged[step].items():
            assert value == pytest.approx(expected[key], abs=1e-5), (step, key)
    assert logged[3]["eval/val/bits_per_byte"] > logged[8]["eval/val/bits_per_byte"]


def test_user_restart_resumes_the_same_run(killed_run):
    from mlflow.tracking import MlflowClient

    from pipelines.train import train

    spec, root, first, _ = killed_run
    longer = spec.with_overrides({"train.steps": 10})
    with _chdir(root):
        result = train(longer, run_name="killed")
    assert result.steps == 10 and result.mlflow_run_id == first.mlflow_run_id
    records = [json.loads(x) for x in (root / "runs/killed/steps.jsonl").read_text().splitlines()]
    last = [r for r in records if r["attempt"] == records[-1]["attempt"]]
    assert [r["step"] for r in last] == [9, 10]
    assert last[0]["position"] == {"epoch": 0, "batch": 8}
    client = MlflowClient(f"sqlite:///{root}/mlruns.db")
    exp = client.get_experiment_by_name("t")
    assert len(client.search_runs([exp.experiment_id], "tags.`aunet.run_dir` LIKE '%/killed'")) == 1


# ------------------------------------------------------------------ damaged runs (issue 18)
def _attempts(run: Path) -> list[list[int]]:
    """Steps of each attempt in ``steps.jsonl``, in order."""
    records = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]
    out: dict[str, list[int]] = {}
    for r in records:
        out.setdefault(r["attempt"], []).append(r["step"])
    return list(out.values())


def test_damaged_checkpoint_falls_back_or_fails_in_one_line(ray_session, tmp_path):
    from aunet.checkpoint import CheckpointError
    from pipelines.train import train

    spec = _spec(tmp_path, steps=4, checkpoint_every=2)
    spec = spec.with_overrides({"resources.num_workers": 1})
    first = train(spec, run_name="damaged")
    run = tmp_path / "runs" / "damaged"
    meta = run / "step_0000004" / ".metadata"  # DCP's pickle: never read unverified
    meta.write_bytes(meta.read_bytes()[:-16] + bytes(16))
    result = train(spec.with_overrides({"train.steps": 6}), run_name="damaged")
    assert _attempts(run) == [[1, 2, 3, 4], [3, 4, 5, 6]]  # resumed from step 2, not step 4
    assert result.steps == 6 and result.mlflow_run_id == first.mlflow_run_id
    kept = sorted(p.name for p in run.glob("step_*"))  # the two Ray keeps, saved after a fallback
    assert [n[:12] for n in kept] == ["step_0000004", "step_0000006"]
    assert all(n[12] == "_" for n in kept)  # not step_0000004 again: Ray retires that path
    for name in kept:  # both damaged now
        (run / name / "rng_rank0.pt").write_bytes(b"\x80\x04planted")
    with pytest.raises(CheckpointError) as err:
        train(spec.with_overrides({"train.steps": 8}), run_name="damaged")
    msg = str(err.value)
    assert "\n" not in msg and "no intact checkpoint" in msg
    assert all(f"{run}/{name}/rng_rank0.pt: SHA-256" in msg for name in kept)
    assert len(_attempts(run)) == 2  # no worker started


def test_checkpoint_of_another_spec_is_refused_before_ray(ray_session, tmp_path):
    from pipelines.train import train

    spec = _spec(tmp_path, steps=2, checkpoint_every=2)
    train(spec.with_overrides({"resources.num_workers": 1}), run_name="other")
    with pytest.raises(SpecError, match="its checkpoint has batch_size=4, the spec 8"):
        train(spec.with_overrides({"train.batch_size": 8}), run_name="other")
    bigger = {"model.dimensions": [32, 96], "resources.num_workers": 1}
    with pytest.raises(SpecError, match="another model config"):
        train(spec.with_overrides(bigger), run_name="other")
    assert len(_attempts(tmp_path / "runs" / "other")) == 1


def _descendants(root: int) -> set[int]:
    """Pids of every live descendant of ``root`` (from /proc: ppid is field 4 of stat)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parent.items() if pp == pid and p not in found]
        found.update(kids)
        todo.extend(kids)
    return found


@pytest.mark.slow
def test_driver_killed_before_the_first_checkpoint_keeps_one_mlflow_run(ray_session, tmp_path):
    """The same command after a SIGKILLed driver reopens its MLflow run (a launch id kept in the
    run directory), instead of leaving a RUNNING run beside a new one."""
    import signal
    import subprocess
    import sys
    import time

    import yaml
    from mlflow.tracking import MlflowClient

    from pipelines.train import train

    spec = _spec(tmp_path, steps=80, checkpoint_every=80, eval_every=80)
    spec = spec.with_overrides({"resources.num_workers": 1})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict()))
    run = tmp_path / "runs" / "t"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.train", "spec.yaml"],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            tree |= _descendants(proc.pid)
            log = run / "steps.jsonl"
            if log.is_file() and len(log.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the driver ended before it could be killed"
        assert not list(run.glob("step_*")), "a checkpoint exists already: kill came too late"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver's session: only what it started
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(30)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    exp = client.get_experiment_by_name("t")
    query = "tags.`aunet.run_dir` LIKE '%/runs/t'"
    (killed,) = client.search_runs([exp.experiment_id], query)
    assert killed.info.status == "RUNNING"
    with _chdir(tmp_path):
        result = train(spec, run_name="t")
    runs = client.search_runs([exp.experiment_id], query)
    assert [r.info.run_id for r in runs] == [killed.info.run_id] == [result.mlflow_run_id]
    assert runs[0].info.status == "FINISHED" and result.steps == 80


class _Planted:
    """A pickle that, when unpickled, creates the file it names (what an attacker would plant)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_planted_pickle_in_a_checkpoint_does_not_run(ray_session, tmp_path):
    """rng_rank*.pt is read with weights_only=True (a pickle of code is refused even with a
    forged digest); DCP's .metadata, a pickle torch reads with full unpickling, is never read
    unless it matches its digest (docs/checkpoints.md: storage must be trusted beyond that)."""
    import hashlib

    import ray

    from aunet.checkpoint import CheckpointError
    from pipelines.train import train

    spec = _spec(tmp_path, steps=2, checkpoint_every=2, eval_every=2)
    spec = spec.with_overrides({"resources.num_workers": 1, "resources.max_failures": 0})
    train(spec, run_name="planted")
    ckpt = tmp_path / "runs" / "planted" / "step_0000002"
    pwned = tmp_path / "pwned"
    longer = spec.with_overrides({"train.steps": 4})

    rng = ckpt / "rng_rank0.pt"
    original = rng.read_bytes()
    torch.save({"torch": _Planted(pwned)}, rng)  # and the attacker forges its digest too
    digests = json.loads((ckpt / "digests_rank0.json").read_text())
    digests["rng_rank0.pt"] = hashlib.sha256(rng.read_bytes()).hexdigest()
    (ckpt / "digests_rank0.json").write_text(json.dumps(digests))
    with pytest.raises(ray.train.TrainingFailedError, match="rng_rank0.pt: refused, not a plain"):
        train(longer, run_name="planted")
    assert not pwned.exists()

    rng.write_bytes(original)
    digests["rng_rank0.pt"] = hashlib.sha256(original).hexdigest()
    (ckpt / "digests_rank0.json").write_text(json.dumps(digests))
    meta = ckpt / ".metadata"
    meta.write_bytes(pickle_bytes(_Planted(pwned)))  # digest not forged: refused before reading
    with pytest.raises(CheckpointError, match=r"\.metadata: SHA-256 does not match"):
        train(longer, run_name="planted")
    assert not pwned.exists()


def pickle_bytes(obj) -> bytes:
    import pickle

    return pickle.dumps(obj)


def test_multi_variant_summary_table_has_cost_beside_result(tmp_path):
    from pipelines.train import TrainResult, summary_table

    runs = []
    for name, rates in (("aunet2", [30.0, 10.0, 20.0, 50.0]), ("baseline", [])):
        d = tmp_path / name
        d.mkdir()
        lines = [json.dumps({"step": i + 1, "perf/bytes_per_s": r}) for i, r in enumerate(rates)]
        (d / "steps.jsonl").write_text("".join(x + "\n" for x in lines))
        runs.append(TrainResult(name, str(d), "", 4, 2.5, None, "", 12.4, None, 1234567, 3.21e12))
    assert runs[0].median_bytes_per_s() == 30.0  # upper median of 10, 20, 30, 50
    assert runs[1].median_bytes_per_s() is None
    text = summary_table(runs).splitlines()
    assert text[1].split()[:4] == ["run", "params", "FLOPs", "val"]
    assert text[3].split() == ["aunet2", "1,234,567", "3.21e+12", "2.5000", "30", "12"]
    assert text[4].split() == ["baseline", "1,234,567", "3.21e+12", "2.5000", "-", "12"]
