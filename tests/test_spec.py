"""Experiment spec: loading, defaults, overrides, every error naming file and key, export."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import yaml

from aunet.config import AUNetConfig
from pipelines.spec import (
    DataConfig,
    ExperimentSpec,
    ResourcesConfig,
    SourceConfig,
    SpecError,
    TrackingConfig,
    TrainConfig,
    flatten,
    load_spec,
    parse_cli,
    spec_hash,
)

MINIMAL = {
    "name": "tiny",
    "data": {"sources": "corpus/*.jsonl.gz", "seq_len": 64},
    "model": {"dimensions": [32, 64], "layers": [1, 1], "head_dims": [16, 16]},
    "train": {"steps": 5},
}


@pytest.fixture
def write(tmp_path, monkeypatch):
    """Write a spec (MINIMAL updated per section) as q.yaml in a fresh cwd; return its name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def _write(changes: dict | None = None, text: str | None = None) -> str:
        raw = json.loads(json.dumps(MINIMAL))
        for section, value in (changes or {}).items():
            if isinstance(value, dict) and isinstance(raw.get(section), dict):
                raw[section].update(value)
            else:
                raw[section] = value
        (tmp_path / "q.yaml").write_text(text if text is not None else yaml.safe_dump(raw))
        return "q.yaml"

    return _write


def test_defaults_and_resolved_paths(write, tmp_path):
    spec = load_spec(write())
    cwd = str(tmp_path)
    assert spec.data.sources == [SourceConfig(path=f"{cwd}/corpus/*.jsonl.gz")]
    assert spec.data.sources[0].resolved_format == "jsonl"
    d = spec.data
    assert (d.val_fraction, d.seed, d.dataset_dir, d.max_documents, d.shard_sequences) == (
        0.01,
        0,
        None,
        None,
        1024,
    )
    assert spec.train == TrainConfig(steps=5)
    t = spec.train
    assert (t.warmup, t.lr_min_ratio, t.weight_decay, t.grad_clip, t.betas, t.eps) == (
        0.1,
        0.01,
        0.1,
        0.2,
        (0.9, 0.95),
        1e-8,
    )
    assert (t.lr, t.batch_size, t.flop_budget, t.dtype, t.seed) == (None, None, None, "auto", 42)
    assert spec.tracking == TrackingConfig(
        tracking_uri=f"sqlite:///{cwd}/mlflow.db",  # 4 slashes: absolute
        artifact_location=None,  # unset: runtime.artifact_location_for picks it
    )
    assert spec.tracking.tracking_uri.startswith("sqlite:////")
    assert spec.resources == ResourcesConfig(storage_path=f"{cwd}/outputs")
    assert spec.model == AUNetConfig(dimensions=[32, 64], layers=[1, 1], head_dims=[16, 16])
    assert spec.variants is None


@pytest.mark.parametrize(
    "sources",
    [
        "a.jsonl",
        ["a.jsonl", "b.txt"],
        {"a.jsonl": 2, "b.txt": 0.5},
        [{"path": "a.jsonl", "weight": 2}, {"path": "b.txt", "format": "txt", "text_field": "t"}],
    ],
)
def test_sources_forms(write, tmp_path, sources):
    spec = load_spec(write({"data": {"sources": sources}}))
    paths = [s.path for s in spec.data.sources]
    assert paths == [str(tmp_path / p) for p in ["a.jsonl", "b.txt"][: len(paths)]]
    assert [s.resolved_format for s in spec.data.sources] == ["jsonl", "txt"][: len(paths)]
    if isinstance(sources, dict):
        assert [s.weight for s in spec.data.sources] == [2.0, 0.5]


def test_formats_from_extension():
    for name, fmt in [("x.TXT", "txt"), ("d/*.jsonl.zst", "jsonl"), ("p.parquet", "parquet")]:
        assert SourceConfig(path=name).resolved_format == fmt
    assert SourceConfig(path="x.csv", format="txt").resolved_format == "txt"


def test_overrides_parse_yaml_values(write, tmp_path):
    spec = load_spec(
        write(),
        [
            "train.lr=3e-4",  # YAML 1.1 reads this as a string; the spec makes it a float
            "train.betas=[0.8, 0.9]",
            "model.dimensions=[32, 96]",
            "model.head_dims.1=32",  # numeric parts index lists
            "data.sources.0.weight=2",  # the single-string form is indexable too
            "data.max_documents=10",
            "tracking.run_name=",  # empty -> null
            "resources.storage_path=out/x",
        ],
    )
    assert spec.train.lr == 3e-4 and spec.train.betas == (0.8, 0.9)
    assert spec.model.dimensions == [32, 96] and spec.model.head_dims == [16, 32]
    assert spec.data.sources[0].weight == 2.0 and spec.data.max_documents == 10
    assert spec.tracking.run_name is None
    assert spec.resources.storage_path == str(tmp_path / "out/x")


def test_override_creates_missing_section(write):
    text = yaml.safe_dump({k: v for k, v in MINIMAL.items() if k != "train"})
    spec = load_spec(write(text=text), ["train.flop_budget=1e12"])
    assert spec.train.flop_budget == 1e12 and spec.train.steps is None


def test_parse_cli():
    argv = ["exp.yaml", "train.lr=0.1", "--set", "data.seed=3", "--set=name=x"]
    assert parse_cli(argv) == ("exp.yaml", ["train.lr=0.1", "data.seed=3", "name=x"])
    for bad, needle in [
        ([], "no spec file"),
        (["a.yaml", "b.yaml"], "second spec file 'b.yaml'"),
        (["a.yaml", "--set"], "--set needs"),
        (["a.yaml", "--lr", "1"], "unknown option '--lr'"),
        (["a.yaml", "--set", "=3"], "expected dotted.key=value"),
    ]:
        with pytest.raises(SpecError, match=needle):
            parse_cli(bad)


@pytest.mark.parametrize(
    "changes, key, problem",
    [
        ({"train": {"lr": "x"}}, "train.lr", "expected float > 0, got 'x'"),
        ({"train": {"lr": 0}}, "train.lr", "expected float > 0, got 0.0"),
        ({"train": {"lrr": 1}}, "train.lrr", "unknown key (valid: steps, flop_budget,"),
        ({"train": {"steps": 2.5}}, "train.steps", "expected int >= 1, got 2.5"),
        ({"train": {"steps": True}}, "train.steps", "expected int >= 1, got True"),
        ({"train": {"flop_budget": 1e15}}, "train.steps", "set exactly one of train.steps"),
        ({"train": {"steps": None}}, "train.steps", "set exactly one of train.steps"),
        ({"train": {"warmup": 2.5}}, "train.warmup", "counts steps and must be whole"),
        ({"train": {"betas": [0.9]}}, "train.betas", "list of 2 float in [0, 1), got [0.9]"),
        ({"train": {"betas": [0.9, 1.0]}}, "train.betas", "in [0, 1)"),
        ({"train": {"dtype": "fp16"}}, "train.dtype", "in (auto, float32, bfloat16)"),
        ({"train": {"compile": 1}}, "train.compile", "expected bool, got 1"),
        ({"train": {"eps": float("inf")}}, "train.eps", "expected float > 0, got inf"),
        ({"train": "fast"}, "train", "expected a mapping, got 'fast'"),
        ({"name": "has space"}, "name", "expected str of [A-Za-z0-9._-]"),
        ({"name": 7}, "name", "expected str"),
        ({"data": {"seq_len": 1}}, "data.seq_len", "expected int >= 2, got 1"),
        ({"data": {"val_fraction": 1.0}}, "data.val_fraction", "in [0, 1)"),
        ({"data": {"sources": []}}, "data.sources", "expected at least one source"),
        ({"data": {"sources": ["a.csv"]}}, "data.sources[0].format", "cannot infer from"),
        (
            {"data": {"sources": ["a.txt", {"path": "b.txt", "weight": -1}]}},
            "data.sources[1].weight",
            "expected float > 0, got -1.0",
        ),
        (
            {"data": {"sources": [{"path": "a.txt", "colour": 1}]}},
            "data.sources[0].colour",
            "unknown key (valid: path, weight,",
        ),
        ({"data": {"sources": [{"weight": 1}]}}, "data.sources[0].path", "required key missing"),
        ({"data": {"max_documents": 0}}, "data.max_documents", ">= 1"),
        ({"model": {"head_dims": [16, 24]}}, "model.head_dims[1]", "must divide"),
        ({"model": {"dimensions": "big"}}, "model.dimensions", "expected list of int"),
        ({"model": {"layers": [1, "x"]}}, "model.layers[1]", "expected int, got 'x'"),
        ({"model": {"colour": 1}}, "model.colour", "unknown key"),
        ({"tracking": {"experiment": ""}}, "tracking.experiment", "(non-empty)"),
        ({"resources": {"num_workers": 0}}, "resources.num_workers", ">= 1"),
        ({"resources": {"max_failures": -2}}, "resources.max_failures", ">= -1"),
        ({"resources": {"use_gpu": "yes please"}}, "resources.use_gpu", "expected bool"),
        ({"variants": {"v": {"model.head_dims": [16, 24]}}}, "variants.v", "model.head_dims[1]"),
        ({"variants": {"v": {"train.nope": 1}}}, "variants.v", "train.nope: unknown key"),
        ({"variants": ["a"]}, "variants", "expected mapping"),
        ({"extra_section": {}}, "extra_section", "unknown key (valid: name, data, model,"),
    ],
)
def test_errors_name_file_and_key(write, changes, key, problem):
    with pytest.raises(SpecError) as info:
        load_spec(write(changes))
    message = str(info.value)
    assert message.startswith(f"q.yaml: {key}: "), message
    assert problem in message, message


def test_missing_required_sections(write):
    for section in ("name", "data", "model", "train"):
        text = yaml.safe_dump({k: v for k, v in MINIMAL.items() if k != section})
        with pytest.raises(SpecError, match=rf"^q\.yaml: {section}: required key missing"):
            load_spec(write(text=text))


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "q.yaml: expected a mapping at the top level, got an empty file"),
        ("- 1\n- 2\n", "q.yaml: expected a mapping at the top level, got list"),
        ("name: [unclosed\n", "q.yaml: invalid YAML"),
        ("a: !!python/object:os.system ls\n", "q.yaml: invalid YAML"),  # safe_load only
    ],
)
def test_file_level_errors(write, text, needle):
    with pytest.raises(SpecError) as info:
        load_spec(write(text=text))
    assert str(info.value).startswith(needle), str(info.value)


def test_missing_file_and_bad_overrides(write, tmp_path):
    with pytest.raises(SpecError, match=r"^nope\.yaml: cannot read"):
        load_spec("nope.yaml")
    path = write()
    for override, needle in [
        ("name.x=1", "q.yaml: name.x: cannot set override: name is str"),
        (
            "data.sources.3.weight=1",
            "q.yaml: data.sources.3.weight: cannot set override: data.sources is a list of 1",
        ),
        ("train.lr", "q.yaml: override 'train.lr': expected dotted.key=value"),
        ("train.lr=[1", "q.yaml: train.lr: override value '[1' is not YAML"),
        ("train.lr=-1", "q.yaml: train.lr: expected float > 0, got -1.0"),
    ]:
        with pytest.raises(SpecError) as info:
            load_spec(path, [override])
        assert str(info.value).startswith(needle), str(info.value)


def test_round_trip(write, tmp_path, monkeypatch):
    variants = {"wide": {"model.dimensions": [32, 128], "train.lr": 0.01}}
    spec = load_spec(write({"variants": variants, "train": {"lr": 1e-3}}))
    text = yaml.safe_dump(spec.to_dict())
    # From another cwd: paths are already absolute, so nothing moves.
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    (other / "again.yaml").write_text(text)
    again = load_spec("again.yaml")
    assert again == spec and again.to_dict() == spec.to_dict()
    assert ExperimentSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_with_overrides_and_variants(write):
    spec = load_spec(write({"variants": {"wide": {"model.dimensions": [32, 128]}}}))
    wide = spec.with_variant("wide")
    assert wide.model.dimensions == [32, 128] and wide.variants is None
    assert dataclasses.replace(wide, model=spec.model, variants=spec.variants) == spec
    assert spec.with_overrides({"train.lr": 0.5}).train.lr == 0.5
    assert spec.with_overrides(["train.lr=0.25"]).train.lr == 0.25
    with pytest.raises(SpecError, match="no 'narrow' \\(defined: wide\\)"):
        spec.with_variant("narrow")
    with pytest.raises(SpecError, match="train.lr: expected float > 0"):
        spec.with_overrides({"train.lr": -1})


def test_flatten_keys_are_override_keys(write, monkeypatch):
    spec = load_spec(write({"model": {"strategy": {"word1": "1@1"}}}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:hunter2@mlflow.example:5000")
    flat = flatten(spec)
    assert all(isinstance(v, str) for v in flat.values())
    assert flat["train.steps"] == "5" and flat["train.lr"] == "null"
    assert flat["model.dimensions"] == "[32, 64]" and flat["model.strategy.word1"] == "1@1"
    assert flat["data.sources.0.format"] == "auto" and flat["train.betas"] == "[0.9, 0.95]"
    assert not any(k.startswith("variants") for k in flat)
    assert "hunter2" not in json.dumps(flat)  # env values never become params
    # The vocabulary is shared: every param, fed back as an override, reproduces the spec.
    for key, value in flat.items():
        assert spec.with_overrides({key: yaml.safe_load(value)}) == spec, key
    # Nothing is left out: one param per field of the flat sections.
    for section, cls in [
        ("train", TrainConfig),
        ("tracking", TrackingConfig),
        ("resources", ResourcesConfig),
    ]:
        names = {f"{section}.{f.name}" for f in dataclasses.fields(cls)}
        assert {k for k in flat if k.startswith(f"{section}.")} == names


def test_flatten_redacts_credentials(write):
    spec = load_spec(write({"tracking": {"tracking_uri": "https://bob:s3cret@mlflow.example"}}))
    assert flatten(spec)["tracking.tracking_uri"] == "https://***@mlflow.example"


def test_spec_hash():
    obj = {"b": [1, 2.5, None], "a": "é"}
    canonical = '{"a":"é","b":[1,2.5,null]}'
    assert spec_hash(obj) == hashlib.sha256(canonical.encode()).hexdigest()[:12]
    assert spec_hash({"a": "é", "b": (1, 2.5, None)}) == spec_hash(obj)  # order, tuple: same
    assert spec_hash({"a": "e", "b": [1, 2.5, None]}) != spec_hash(obj)
    assert spec_hash(TrainConfig(steps=3)) == spec_hash(dataclasses.asdict(TrainConfig(steps=3)))


def test_dataset_dir(write, tmp_path):
    spec = load_spec(write())
    root = tmp_path / "outputs" / "datasets"
    assert spec.dataset_dir() == str(root / f"tiny-{spec.dataset_hash()}")
    assert len(spec.dataset_hash()) == 12
    same = [spec.with_overrides({"train.lr": 0.1}), spec.with_overrides({"data.dataset_dir": "d"})]
    assert all(s.dataset_hash() == spec.dataset_hash() for s in same)
    three = {
        "model.dimensions": [32, 64, 64],
        "model.layers": [1, 1, 1],
        "model.head_dims": [16] * 3,
    }
    two = spec.with_overrides({**three, "model.strategy": {"word1": "1@1", "word2": "2@1"}})
    swapped = spec.with_overrides({**three, "model.strategy": {"word2": "2@1", "word1": "1@1"}})
    changed = [spec.with_overrides({"data.seq_len": 128}), two, swapped]
    hashes = {s.dataset_hash() for s in [spec, *changed]}
    assert len(hashes) == 4  # strategy order is the level order, so it changes the data
    assert same[1].dataset_dir() == str(tmp_path / "d")
    remote = spec.with_overrides({"resources.storage_path": "s3://bucket/runs/"})
    assert remote.dataset_dir() == f"s3://bucket/runs/datasets/tiny-{spec.dataset_hash()}"


def test_direct_construction_checks_cross_fields():
    with pytest.raises(SpecError, match="^steps: set exactly one"):
        TrainConfig()
    with pytest.raises(SpecError, match="^sources: expected at least one"):
        DataConfig(sources=[])
    with pytest.raises(SpecError, match="^format: cannot infer"):
        SourceConfig(path="x.bin")
