"""Preprocessing on a real 3-node Ray cluster on this machine (``ray.cluster_utils.Cluster``).

One node first, then two more joined: the 3-node run spreads its units over every node and
writes the same dataset byte for byte as the 1-node run (windows never cross units).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from test_preprocess import digest, make_spec, write_jsonl

from pipelines import preprocess as pp


@ray.remote(num_cpus=1)
def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


@pytest.mark.slow
def test_three_nodes_spread_units_and_match_one_node(tmp_path):
    rng = np.random.default_rng(6)
    words = ["alpha", "beta", "ε", "日本", "12,", "done.", "\n"]
    recs = [{"id": i, "text": " ".join(rng.choice(words, 150))} for i in range(240)]
    write_jsonl(tmp_path / "c.jsonl", recs)  # ~190 KB: ~24 units of 8 KB
    src = [{"path": str(tmp_path / "c.jsonl"), "id_field": "id"}]
    kw = {"unit_bytes": 8 << 10, "val_fraction": 0.2, "shard_sequences": 16, "seq_len": 32}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        one = pp.preprocess(make_spec(tmp_path, src, dataset_dir=str(tmp_path / "one"), **kw))
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
        three = pp.preprocess(make_spec(tmp_path, src, dataset_dir=str(tmp_path / "three"), **kw))
        nodes = {
            json.loads(p.read_text())["node"] for p in (tmp_path / "three" / "units").glob("*.json")
        }
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()
    planned = three.manifest["units"]["planned"]
    assert planned >= 12 and len(alive) == 3 and nodes == alive  # every node ran units
    assert digest(one.path) == digest(three.path) and len(digest(one.path)) >= planned
    assert one.manifest["splits"] == three.manifest["splits"]
    assert one.manifest["documents"] == three.manifest["documents"]
