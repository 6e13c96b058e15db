"""pipelines.data: reader order, resume without repeat or skip, rank sharding, validation order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray
import torch

from pipelines import preprocess as pp
from pipelines.data import (
    DataPosition,
    TrainBatches,
    load_split,
    ray_dataset,
    read_manifest,
    val_batches,
)
from pipelines.spec import ExperimentSpec

T = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    words = ["one", "two", "three", "four,", "five.", "\n", "sixty-six", "7"]
    with open(tmp / "c.jsonl", "w") as f:
        for i in range(150):
            f.write(json.dumps({"id": i, "text": " ".join(rng.choice(words, 30))}) + "\n")
    raw = {
        "name": "d",
        "data": {
            "sources": [{"path": str(tmp / "c.jsonl"), "id_field": "id"}],
            "seq_len": T,
            "val_fraction": 0.2,
            "dataset_dir": str(tmp / "ds"),
            "shard_sequences": 50,
        },
        "model": {"dimensions": [8, 16, 32], "layers": [1, 1, 1], "head_dims": [8, 8, 8]},
        "train": {"steps": 1},
        "tracking": {},
        "resources": {"storage_path": str(tmp)},
    }
    info = pp.preprocess(ExperimentSpec.from_dict(raw, source="test"))
    yield info.path
    ray.shutdown()


def test_load_split_and_ray_dataset(dataset):
    m = read_manifest(dataset)
    tok, lev = load_split(dataset)
    assert tok.shape == (m["splits"]["train"]["sequences"], T + 1) and tok.dtype == np.uint16
    assert len(m["splits"]["train"]["shards"]) >= 3  # several shards, read back in order
    ds = ray_dataset(dataset, "train")
    assert ds.count() == len(tok)
    rows = sorted(ds.take_all(), key=lambda r: r["index"])
    np.testing.assert_array_equal(np.stack([r["tokens"] for r in rows]), tok)
    np.testing.assert_array_equal(np.stack([r["levels"] for r in rows]), lev)
    with pytest.raises(FileNotFoundError, match="not a complete dataset"):
        load_split(dataset.parent / "nowhere")


def test_batches_shift_and_match_the_shards(dataset):
    tok, lev = load_split(dataset)
    batch = next(iter(TrainBatches(dataset, 8, seed=3)))
    x, levels, y = batch
    assert x.shape == levels.shape == y.shape == (8, T) and x.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(tok[batch.ids, :-1].astype(np.int64)))
    assert torch.equal(y, torch.from_numpy(tok[batch.ids, 1:].astype(np.int64)))
    assert torch.equal(levels, torch.from_numpy(lev[batch.ids, :-1].astype(np.int64)))
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_epochs_cover_each_sequence_once_and_resume_exactly(dataset):
    B = 8
    ref = TrainBatches(dataset, B, seed=5)
    n_epoch = ref.batches_per_epoch
    stream = iter(ref)
    full = [next(stream) for _ in range(2 * n_epoch + 3)]
    for e in range(2):
        ids = np.concatenate([b.ids for b in full[e * n_epoch : (e + 1) * n_epoch]])
        assert len(set(ids.tolist())) == len(ids) == n_epoch * B  # no repeat within an epoch
    assert not np.array_equal(full[0].ids, full[n_epoch].ids)  # a new permutation each epoch
    for k in (1, n_epoch - 1, n_epoch, n_epoch + 2):  # resume mid-epoch and at epoch boundaries
        saved = DataPosition.from_dict(json.loads(json.dumps(full[k - 1].position.to_dict())))
        resumed = iter(TrainBatches(dataset, B, seed=5, position=saved))
        for want in full[k : k + 3]:
            got = next(resumed)
            np.testing.assert_array_equal(got.ids, want.ids)
            assert torch.equal(got.tokens, want.tokens)
    assert full[n_epoch - 1].position == DataPosition(1, 0)
    again = [b.ids for b, _ in zip(TrainBatches(dataset, B, seed=5), range(3))]
    assert all(np.array_equal(a, b.ids) for a, b in zip(again, full))  # same (seed, epoch) order
    other = next(iter(TrainBatches(dataset, B, seed=6)))
    assert not np.array_equal(other.ids, full[0].ids)


def test_ranks_split_the_global_batch(dataset):
    B = 8
    single = iter(TrainBatches(dataset, B, seed=1))
    ranks = [iter(TrainBatches(dataset, B, seed=1, rank=r, world_size=2)) for r in range(2)]
    for _ in range(5):
        g = next(single)
        parts = [next(r) for r in ranks]
        np.testing.assert_array_equal(np.concatenate([p.ids for p in parts]), g.ids)
        assert torch.equal(torch.cat([p.tokens for p in parts]), g.tokens)
        assert torch.equal(torch.cat([p.targets for p in parts]), g.targets)
        assert parts[0].position == parts[1].position == g.position
    with pytest.raises(ValueError, match="not a multiple of 3 ranks"):
        TrainBatches(dataset, B, world_size=3)
    with pytest.raises(ValueError, match="< batch size"):
        TrainBatches(dataset, 10**6)


def test_val_batches_fixed_order_and_even_across_ranks(dataset):
    tok, _ = load_split(dataset, "val")
    n = len(tok)
    assert n >= 5
    got = list(val_batches(dataset, 4))
    np.testing.assert_array_equal(np.concatenate([b.ids for b in got]), np.arange(n))
    assert [len(b.ids) for b in got] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    r0, r1 = (list(val_batches(dataset, 4, rank=r, world_size=2)) for r in range(2))
    assert len(r0) == len(r1)
    union = np.concatenate([np.concatenate([a.ids, b.ids]) for a, b in zip(r0, r1)])
    np.testing.assert_array_equal(union, np.arange(len(union)))
    assert len(union) >= n - 1
    assert len(list(val_batches(dataset, 4, max_batches=1))) == 1
