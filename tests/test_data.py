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


# Streaming reader (issue 19 item 3) against the naive reference: load_split and the permutation.

W8 = 9  # window T+1 of the synthetic dataset
UNITS = {"train": [[600, 300], [37], [513]], "val": [[260], [5]]}  # shard sizes per unit


@pytest.fixture(scope="module")
def multi_group(tmp_path_factory):
    """A dataset written with ``write_shard`` (no Ray): shards of several 256-row groups, a unit of
    two shards, a short one, so that batches cross shard, row-group and unit boundaries."""
    import pyarrow.fs as pafs

    from pipelines.data import FORMAT_VERSION, MANIFEST, write_shard

    root = tmp_path_factory.mktemp("multi") / "ds"
    fs, rng, splits = pafs.LocalFileSystem(), np.random.default_rng(7), {}
    for split, units in UNITS.items():
        (root / split).mkdir(parents=True)
        shards, start = [], 0
        for u, sizes in enumerate(units):
            k = 0
            for j, n in enumerate(sizes):
                tok = rng.integers(0, 258, (n, W8), dtype=np.uint16)
                lev = rng.integers(0, 4, (n, W8), dtype=np.uint8)
                path = str(root / split / f"u{u:06d}-{j:04d}.parquet")
                entry = write_shard(fs, path, tok, lev, k)
                shards.append({**entry, "unit": u, "start": start})
                k, start = k + n, start + n
        splits[split] = {"sequences": start, "shards": shards}
    manifest = {"complete": True, "format_version": FORMAT_VERSION, "seq_len": W8 - 1}
    (root / MANIFEST).write_text(json.dumps({**manifest, "splits": splits}))
    return root


def test_streaming_reader_equals_the_in_memory_reference(multi_group):
    from pipelines.data import ShardReader

    tok, lev = load_split(multi_group)
    n = len(tok)
    assert n == 1450
    for seed, B, W, max_groups in [(0, 64, 1, 2), (3, 64, 2, 3), (9, 50, 5, 1), (4, 1450, 2, 4)]:
        per_epoch = n // B
        steps = per_epoch + 3  # into the second epoch
        for r in range(W):
            data = TrainBatches(multi_group, B, seed=seed, rank=r, world_size=W)
            data.reader.max_row_groups = max_groups
            got = [b for b, _ in zip(data, range(steps))]
            for k, b in enumerate(got):
                epoch, i = divmod(k, per_epoch)
                perm = np.random.default_rng([seed, epoch]).permutation(n)
                ids = perm[i * B : (i + 1) * B][r * (B // W) : (r + 1) * (B // W)]
                np.testing.assert_array_equal(b.ids, ids)
                glob = data.global_ids(DataPosition(epoch, i))  # what steps.jsonl records
                np.testing.assert_array_equal(glob, perm[i * B : (i + 1) * B])
                want = torch.from_numpy(tok[ids].astype(np.int64))
                want_lev = torch.from_numpy(lev[ids].astype(np.int64))
                assert torch.equal(b.tokens, want[:, :-1]) and torch.equal(b.targets, want[:, 1:])
                assert torch.equal(b.levels, want_lev[:, :-1])
                assert torch.equal(b.target_levels, want_lev[:, 1:])
                nxt = (epoch, i + 1) if i + 1 < per_epoch else (epoch + 1, 0)
                assert b.position == DataPosition(*nxt)
            # memory bound: at most max_groups decoded row groups held, of the 9 the split has
            assert data.reader.peak_held <= max_groups < data.reader.row_groups_read
            k = max(per_epoch - 2, 0)  # resume just before the epoch boundary
            resumed = TrainBatches(
                multi_group,
                B,
                seed=seed,
                rank=r,
                world_size=W,
                position=got[k].position,
                prefetch=0,
            )
            for want_b, b in zip(got[k + 1 :], resumed):  # across the epoch boundary
                np.testing.assert_array_equal(b.ids, want_b.ids)
                assert torch.equal(b.tokens, want_b.tokens)
    reader = ShardReader(multi_group, "train", max_row_groups=2)
    ids = np.array([1449, 0, 255, 256, 599, 600, 899, 900, 936, 937, 5, 1449])  # the boundaries
    np.testing.assert_array_equal(reader.rows(ids)[0], tok[ids])
    np.testing.assert_array_equal(reader.rows(ids)[1], lev[ids])
    with pytest.raises(IndexError):
        reader.rows(np.array([n]))
    vtok, vlev = load_split(multi_group, "val")
    for W in (1, 3):
        for r in range(W):
            vb = list(val_batches(multi_group, 24, rank=r, world_size=W, max_row_groups=1))
            ids = np.concatenate([b.ids for b in vb])
            assert torch.equal(
                torch.cat([b.tokens for b in vb]), torch.from_numpy(vtok[ids, :-1].astype(np.int64))
            )
            assert torch.equal(
                torch.cat([b.target_levels for b in vb]),
                torch.from_numpy(vlev[ids, 1:].astype(np.int64)),
            )
    assert len(list(val_batches(multi_group, 24))) == -(-265 // 24)


def test_reader_names_a_shard_whose_ids_do_not_match(multi_group, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(multi_group, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["splits"]["train"]["shards"][1]["unit"] = 5  # ids then restart at 0 in that shard
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"u000000-0001\.parquet: row group 0 sequence ids"):
        next(iter(TrainBatches(bad, 1450, seed=0)))


def test_lambda_level_trains_from_the_pipeline_batch(dataset):
    """The reader's target_levels reach the loss: loss = ce + lambda * level CE (float64 ref)."""
    from aunet.config import AUNetConfig
    from aunet.model import AUNet
    from aunet.optim import build_optimizer, build_scheduler
    from pipelines.train_worker import train_step

    config = AUNetConfig(dimensions=[8, 16, 32], layers=[1, 1, 1], head_dims=[8, 8, 8])
    _, lev = load_split(dataset)
    batch = next(iter(TrainBatches(dataset, 4, seed=2)))
    assert torch.equal(batch.target_levels, torch.from_numpy(lev[batch.ids, 1:].astype(np.int64)))
    assert int(batch.target_levels.max()) > 0  # real split points in the targets
    torch.manual_seed(0)
    model = AUNet(config.replace(lambda_level=0.5))
    x, lv, y, ty = batch.model_inputs()
    with torch.no_grad():
        hidden = model.features(x, lv).hidden
        logp = torch.log_softmax(model.level_logits(hidden, y).double(), -1)
        level_ce = -logp.gather(-1, ty.clamp(max=model.config.num_stages)[..., None]).mean()
    before = model.level_mask.weight.detach().clone()
    opt = build_optimizer(model, 1e-2, weight_decay=0.0)
    sched = build_scheduler(opt, 1, 10, 0.1)
    loss, ce, _, _ = train_step(model, opt, sched, batch.model_inputs(), 1.0)
    assert loss - ce == pytest.approx(0.5 * float(level_ce), rel=1e-4)
    assert not torch.equal(model.level_mask.weight, before)  # the level head trains
