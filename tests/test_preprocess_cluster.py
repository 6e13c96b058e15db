"""Preprocessing and training on a real 3-node Ray cluster on this machine (``ray.cluster_utils``).

One node first, then two more joined: the 3-node run spreads its units over every node and
writes the same dataset byte for byte as the 1-node run (windows never cross units). Then a
2-worker training run (1 CPU each, so its ranks sit on two different nodes and talk through gloo)
reads that dataset: its losses equal a plain single-process loop over the same global batches,
which holds only if each rank read its own half of each batch.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from netutil import free_port
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from test_preprocess import digest, make_spec, write_jsonl

from aunet.model import AUNet
from aunet.optim import build_optimizer, build_scheduler, clip_gradients
from pipelines import preprocess as pp
from pipelines.spec import ExperimentSpec

pytestmark = pytest.mark.slow  # a 3-node cluster, 2 preprocessing runs and a Train fit

KW = {"unit_bytes": 8 << 10, "val_fraction": 0.2, "shard_sequences": 16, "seq_len": 32}


@ray.remote(num_cpus=1)
def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory):
    """Both preprocessing runs and the training run on one cluster, shut down at the end."""
    from pipelines.runtime import init_ray
    from pipelines.spec import ResourcesConfig

    tmp_path = tmp_path_factory.mktemp("cluster")
    rng = np.random.default_rng(6)
    words = ["alpha", "beta", "ε", "日本", "12,", "done.", "\n"]
    recs = [{"id": i, "text": " ".join(rng.choice(words, 150))} for i in range(240)]
    write_jsonl(tmp_path / "c.jsonl", recs)  # ~190 KB: ~24 units of 8 KB
    src = [{"path": str(tmp_path / "c.jsonl"), "id_field": "id"}]
    cluster = Cluster(
        initialize_head=True,
        # The dashboard serves the State API, which Train's PlacementGroupCleaner asks whether
        # the controller lives (tests/test_train.py, ray_session).
        # A free dashboard port: Cluster asks for 8265 with no retry, and other Ray instances on a
        # shared machine may hold it.
        head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": free_port()},
    )
    try:
        # As a user's run joins a cluster: its RAY_ADDRESS reaches the workers (runtime_env).
        init_ray(ResourcesConfig(ray_address=cluster.address))
        one = pp.preprocess(make_spec(tmp_path, src, dataset_dir=str(tmp_path / "one"), **KW))
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 3 and time.time() < deadline:
            time.sleep(0.1)
        # A worker process ready on every node first: on a loaded machine the head's warm worker
        # can drain all the tiny units before the new nodes have started one.
        ready = [
            _node_id.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], False))
            for n in ray.nodes()
            if n["Alive"]
        ]
        assert len(set(ray.get([f.remote() for f in ready]))) == 3
        three = pp.preprocess(make_spec(tmp_path, src, dataset_dir=str(tmp_path / "three"), **KW))
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        trained = _train_on_cluster(tmp_path, src, three.path)
    finally:
        ray.shutdown()
        cluster.shutdown()
    yield tmp_path, one, three, alive, trained


def _train_spec(tmp_path: Path, src: list[dict], dataset: Path) -> ExperimentSpec:
    raw = make_spec(tmp_path, src, dataset_dir=str(dataset), **KW).to_dict()
    raw["train"] = {
        "steps": 3,
        "batch_size": 4,
        "lr": 3e-3,
        "warmup": 1,
        "eval_every": 3,
        "eval_batches": 1,
        "checkpoint_every": 3,
        "seed": 5,
    }
    raw["tracking"] = {
        "tracking_uri": f"sqlite:///{tmp_path}/mlruns.db",
        "experiment": "c",
        "log_model": False,
    }
    raw["resources"] = {"num_workers": 2, "storage_path": str(tmp_path / "runs")}
    return ExperimentSpec.from_dict(raw, cwd=str(tmp_path))


def _train_on_cluster(tmp_path: Path, src: list[dict], dataset: Path):
    """The 2-worker run; returns (spec, result, steps.jsonl records, nodes of the workers)."""
    from pipelines.train import train

    spec = _train_spec(tmp_path, src, dataset)  # the dataset's settings: reused, not rebuilt
    result = train(spec, run_name="cluster")
    run = tmp_path / "runs" / "cluster"
    records = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]
    return spec, result, records


def test_three_nodes_spread_units_and_match_one_node(cluster_runs):
    tmp_path, one, three, alive, _ = cluster_runs
    nodes = {
        json.loads(p.read_text())["node"] for p in (tmp_path / "three" / "units").glob("*.json")
    }
    planned = three.manifest["units"]["planned"]
    assert planned >= 12 and len(alive) == 3 and nodes == alive  # every node ran units
    assert digest(one.path) == digest(three.path) and len(digest(one.path)) >= planned
    assert one.manifest["splits"] == three.manifest["splits"]
    assert one.manifest["documents"] == three.manifest["documents"]


def test_two_workers_on_two_nodes_read_the_dataset(cluster_runs):
    """Rank 0's steps.jsonl names each step's global batch; the loss it logs is the mean of the
    two ranks' losses on their halves, which equals a plain loop's loss on the whole batch only
    if rank 1 read its half right."""
    from pipelines.data import TrainBatches

    tmp_path, _, three, _, (spec, result, records) = cluster_runs
    assert result.steps == 3 and [r["step"] for r in records] == [1, 2, 3]
    saved = json.loads((tmp_path / "runs/cluster/step_0000003/trainer_state.json").read_text())
    assert saved["world_size"] == 2 and saved["position"] == {"epoch": 0, "batch": 3}
    tr = spec.train
    torch.manual_seed(spec.model.seed)
    model = AUNet(spec.model)
    opt = build_optimizer(model, tr.lr, weight_decay=tr.weight_decay, betas=tr.betas)
    sched = build_scheduler(opt, 1, tr.steps, tr.lr_min_ratio)
    for record, batch in zip(records, TrainBatches(three.path, 4, seed=tr.seed)):
        out = model(*batch.model_inputs())
        out.loss.backward()
        clip_gradients(model.parameters(), tr.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        assert batch.ids.tolist() == record["ids"]
        assert float(out.loss.detach()) == pytest.approx(record["train/loss"], abs=1e-4)
    assert result.val_bits_per_byte is not None and math.isfinite(result.val_bits_per_byte)
