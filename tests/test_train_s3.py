"""Training with the dataset and ``resources.storage_path`` only in S3 (issue 19, item 5).

moto's standalone S3 server on loopback, reached by pyarrow's S3 client exactly as a real bucket
is. Two 2-worker runs of the same name: the first trains 2 steps, the second grows
``train.steps`` to 4 and resumes from the first's checkpoint in the bucket. The losses of all 4
steps equal a naive single-process loop that does what a resume means (weights and optimizer
moments carried over, the next batches, the lr of the second run's own schedule), so the second
run read the stored position and weights, not a fresh start.
"""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest
import torch
from test_preprocess import s3_server
from test_train import _chdir, _spec

from aunet.model import AUNet
from aunet.optim import build_optimizer, clip_gradients, lr_factor

pytestmark = pytest.mark.slow  # two Ray Train fits of 2 workers (~60 s on the 2-core CI box)


@pytest.fixture(scope="module")
def s3_runs(tmp_path_factory):
    """Both runs, from a working directory that must stay empty but for the MLflow database;
    the server stays up for the tests (the reference loop reads the dataset from the bucket)."""
    import ray

    from pipelines.runtime import init_ray
    from pipelines.spec import ExperimentSpec, ResourcesConfig
    from pipelines.storage import forwarded_env
    from pipelines.train import train

    root = tmp_path_factory.mktemp("s3train")
    with pytest.MonkeyPatch.context() as mp, s3_server(mp, "bkt") as fs:
        # Ray's workers get the endpoint and credentials from the job's runtime_env, as
        # pipelines.train.train's own init_ray passes them.
        init_ray(ResourcesConfig(), num_cpus=2, include_dashboard=True, env_vars=forwarded_env())
        try:
            raw = _spec(root, steps=2, checkpoint_every=2, eval_every=2, eval_batches=1).to_dict()
            raw["data"].pop("dataset_dir")  # default: <storage_path>/datasets/<name>-<hash>
            raw["resources"]["storage_path"] = "s3://bkt/aunet"
            raw["tracking"]["artifact_location"] = "s3://bkt/mlartifacts"
            spec = ExperimentSpec.from_dict(raw, cwd=str(root))
            with _chdir(root):
                first = train(spec, run_name="s3run")
                after_first = _listing(fs, "bkt/aunet/s3run")
                second = train(spec.with_overrides({"train.steps": 4}), run_name="s3run")
        finally:
            ray.shutdown()
        yield spec, root, fs, first, second, after_first


def test_checkpoints_and_dataset_only_in_the_bucket(s3_runs):
    spec, root, fs, first, second, after_first = s3_runs
    assert first.run_dir == second.run_dir == "s3://bkt/aunet/s3run"
    assert second.final_checkpoint == "s3://bkt/aunet/s3run/final" and second.steps == 4
    listing = _listing(fs, "bkt/aunet/s3run")
    # every step checkpoint holds both ranks' shards, RNG states and digests, and rank 0's state
    for step in ("step_0000002", "step_0000004"):
        files = {p.split("/", 1)[1] for p in listing if p.startswith(f"{step}/")}
        per_rank = {
            f"{n}_rank{r}.{e}" for n, e in (("rng", "pt"), ("digests", "json")) for r in (0, 1)
        }
        assert {
            ".metadata",
            "trainer_state.json",
            "__0_0.distcp",
            "__1_0.distcp",
        } | per_rank <= files
    assert {"final/config.json", "launch_id"} <= set(listing)
    assert "step_0000002/trainer_state.json" in after_first
    assert not any(p.startswith("step_0000004") for p in after_first)
    states = [_json(fs, f"bkt/aunet/s3run/step_000000{n}/trainer_state.json") for n in (2, 4)]
    assert [(s["step"], s["position"], s["world_size"]) for s in states] == [
        (2, {"epoch": 0, "batch": 2}, 2),
        (4, {"epoch": 0, "batch": 4}, 2),
    ]
    dataset = spec.dataset_dir()
    assert dataset.startswith("s3://bkt/aunet/datasets/t-")
    assert _json(fs, dataset[len("s3://") :] + "/manifest.json")["complete"]
    # MLflow's artifacts in the bucket too; on local disk only the MLflow database
    assert any(p.endswith("config.yaml") for p in _listing(fs, "bkt/mlartifacts"))
    assert sorted(p.name for p in root.iterdir()) == ["mlruns.db"]


def test_resumed_run_continues_from_the_stored_position(s3_runs):
    """One MLflow run whose loss at steps 1-4 equals a naive loop: updates 1-2 on the 2-step
    schedule, 3-4 on the 4-step one (the second run's spec), weights and moments carried over."""
    from mlflow.tracking import MlflowClient

    from pipelines.data import TrainBatches

    spec, root, fs, first, second, _ = s3_runs
    assert first.mlflow_run_id == second.mlflow_run_id
    history = MlflowClient(spec.tracking.tracking_uri).get_metric_history(
        second.mlflow_run_id, "train/loss"
    )
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # each step once: none repeated
    logged = {m.step: m.value for m in history}
    tr = spec.train
    torch.manual_seed(spec.model.seed)
    model = AUNet(spec.model)
    opt = build_optimizer(model, tr.lr, weight_decay=tr.weight_decay, betas=tr.betas)
    batches = iter(TrainBatches(spec.dataset_dir(), 4, seed=tr.seed))  # read from the bucket
    for step in range(1, 5):
        out = model(*next(batches).model_inputs())
        out.loss.backward()
        clip_gradients(model.parameters(), tr.grad_clip)
        for g in opt.param_groups:  # update n of the run it belongs to: 2 steps, then 4
            g["lr"] = tr.lr * lr_factor(step, 1, 2 if step <= 2 else 4, tr.lr_min_ratio)
        opt.step()
        opt.zero_grad()
        assert float(out.loss.detach()) == pytest.approx(logged[step], abs=1e-4), step


def _listing(fs: pafs.FileSystem, base: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(i.path[len(base) + 1 :] for i in infos if i.type == pafs.FileType.File)


def _json(fs: pafs.FileSystem, path: str) -> dict:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())
