"""``--help`` of every pipeline, generated from the dataclasses; "did you mean" on typos; the
tracking URI resolved once at load; errors that carry their source file."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import schema
from pipelines.eval_config import EvalConfig, load_eval_config
from pipelines.scaling import Study, load_study
from pipelines.spec import ExperimentSpec, SpecError, load_spec
from pipelines.sweep_spec import Sweep, load_sweep

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {
    "name": "tiny",
    "data": {"sources": "corpus.jsonl", "seq_len": 64},
    "model": {"dimensions": [32, 64], "layers": [1, 1], "head_dims": [16, 16]},
    "train": {"steps": 5},
    "variants": {"wide": {"model.dimensions": [32, 128]}},
}


def run_help(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "Started a local Ray instance" not in out.stderr + out.stdout
    return out.stdout


def key_line(text: str, key: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.split()[:1] == [key]]
    return line


SPEC_LINES = {  # key -> (type, default) as the help prints them
    "name": ("str of [A-Za-z0-9._-]", "required"),
    "data.sources.N.weight": ("float > 0", "1.0"),
    "data.seq_len": ("int >= 2", "8192"),
    "train.lr": ("float > 0, or null", "null"),
    "train.betas": ("list of 2 float in [0, 1)", "[0.9, 0.95]"),
    "tracking.tracking_uri": ("str (non-empty)", '"sqlite:///mlflow.db"'),
    "model.dimensions": ("list of int", "required"),
    "model.upsampling": ("str", '"multilinear"'),
}


def assert_spec_keys(text: str) -> None:
    for key, (tp, default) in SPEC_LINES.items():
        line = key_line(text, key)
        assert tp in line and f"  {default}" in line, line
    assert "model.extra" not in text  # not a YAML key
    for f in ("data.val_fraction", "resources.ray_address", "variants", "train.eval_suite_every"):
        key_line(text, f)


def test_help_rows_cover_every_key():
    from pipelines.spec import flatten

    rows = {r[0]: r for r in schema.help_rows(ExperimentSpec)}
    spec = ExperimentSpec.from_dict(MINIMAL, source="test", cwd=str(ROOT))
    for key in flatten(spec):  # every MLflow param (= every dotted key in use) is documented
        generic = ".".join("N" if p.isdigit() else p for p in key.split("."))
        assert generic in rows, key
        assert rows[generic][1] and rows[generic][2], rows[generic]
    assert rows["train.warmup"][3] == "fraction of steps (< 1) or steps (>= 1)"
    # A class that is not ours documents itself with its end-of-line comments.
    assert rows["model.residuals"][3] == "K entries (K+1 accepted, last ignored)"


def test_train_preprocess_help():
    for module in ("pipelines.train", "pipelines.preprocess"):
        text = run_help(module, "--help")
        assert f"python -m {module}" in text
        assert_spec_keys(text)
    train = run_help("pipelines.train", "-h")
    assert "--fresh" in train and "variant=NAME" in train
    assert "--force" in run_help("pipelines.preprocess", "-h")
    text = run_help("pipelines.tokenizer", "--help")
    assert "python -m pipelines.tokenizer" in text and "--force" in text
    assert_spec_keys(text)
    for key, tp in (("tokenizer.vocab_size", "int in [260, 2**20], or null"),
                    ("tokenizer.pattern", "str in (gpt2, llama3)"),
                    ("tokenizer.path", "str (non-empty), or null")):  # fmt: skip
        assert tp in key_line(text, key)
    assert "mapping, or null" in key_line(text, "tokenizer")


def test_sweep_help():
    text = run_help("pipelines.sweep", "--help")
    assert "python -m pipelines.sweep <sweep.yaml>" in text and "--summary" in text
    assert_spec_keys(text)
    assert "int >= 1" in key_line(text, "sweep.num_samples")
    line = key_line(text, "sweep.flop_tolerance")
    assert "float in (0, 1)" in line and "  0.02" in line
    assert {r[0] for r in schema.help_rows(Sweep, "sweep.")} == {
        f"sweep.{k}" for k in schema.keys(Sweep)
    }


@pytest.mark.parametrize("cmd", ["plan", "run", "report"])
def test_scaling_help(cmd):
    text = run_help("pipelines.scaling", cmd, "--help")
    assert "python -m pipelines.scaling plan <study.yaml>" in text
    line = key_line(text, "study.lr")
    assert "'law' or a positive float" in line and '"law"' in line
    assert "  0.05" in key_line(text, "study.sweep.flop_tolerance")
    assert "  1000" in key_line(text, "study.fit.bootstrap")
    if cmd == "report":
        assert "--r2-threshold" in text and "data.seq_len" not in text
    else:
        assert_spec_keys(text)
    rows = {r[0] for r in schema.help_rows(Study, "study.")}
    assert {f"study.{k}" for k in schema.keys(Study)} <= rows


def test_evaluate_and_generate_help():
    text = run_help("pipelines.evaluate", "--help")
    assert "python -m pipelines.evaluate <checkpoint dir" in text and "--no-mlflow" in text
    line = key_line(text, "tasks.<name>.n")
    assert "int >= 1" in line and "  20" in line
    assert '"validation"' in key_line(text, "tasks.<name>.hub.split")
    rows = {r[0] for r in schema.help_rows(EvalConfig)}
    assert {"name", "context", "tracking.tracking_uri", "tasks.<name>.kind"} <= rows
    text = run_help("pipelines.generate", "--help")
    assert "--prompt" in text and "--max-new-bytes" in text and "--temperature" in text


# ---------------------------------------------------------------------------------- typos
@pytest.fixture
def spec_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(MINIMAL))
    return Path("q.yaml")  # relative: messages name the file as the user typed it


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "q.yaml: train.lrr: unknown key (valid: steps,"),
        ("train.lrr=1", "; did you mean 'lr'?"),
        ("trian.steps=3", "q.yaml: trian: unknown key (valid: name, data, model, train,"),
        ("trian.steps=3", "; did you mean 'train'?"),
        ("model.dimension=[8]", "q.yaml: model.dimension: unknown key (valid: "),
        ("model.dimension=[8]", "; did you mean 'dimensions'?"),
        ("data.sources.0.wieght=2", "q.yaml: data.sources[0].wieght: unknown key"),
        ("data.sources.0.wieght=2", "; did you mean 'weight'?"),
    ],
)
def test_unknown_keys_suggest_the_near_miss(spec_file, override, message):
    with pytest.raises(SpecError) as info:
        load_spec(spec_file, [override])
    assert message in str(info.value), str(info.value)
    assert str(info.value).startswith("q.yaml: ")


def test_unknown_variant_suggests_the_near_miss(spec_file):
    spec = load_spec(spec_file)
    with pytest.raises(SpecError) as info:
        spec.with_variant("wdie")
    assert str(info.value) == (
        "spec 'tiny': variants: no 'wdie' (defined: wide); did you mean 'wide'?"
    )
    with pytest.raises(SpecError) as info:
        spec.with_variant("narrow")
    assert str(info.value) == "spec 'tiny': variants: no 'narrow' (defined: wide)"
    from pipelines.train import main

    assert main([str(spec_file), "variant=wdie"]) == 2


def test_typos_in_sections_and_cli(tmp_path, spec_file):
    raw = {**MINIMAL, "sweep": {"serach": "grid", "space": {"x": {"choice": [1]}}}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match=r"^.*s\.yaml: sweep\.serach: .*did you mean 'search'\?$"):
        load_sweep(path)
    raw = {**MINIMAL, "sweep": {"space": {"x": {"choice": [1]}}}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match=r"sweep\.space\.x: unknown kind 'choice' .*'choices'\?$"):
        load_sweep(path)
    raw = {**MINIMAL, "study": {"name": "s", "budgets": [1e9], "variants": {"a": {}}}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match=r"s\.yaml: study\.fit\.bootstrp: .*'bootstrap'\?$"):
        load_study(path, ["study.fit.bootstrp=5"])
    with pytest.raises(SpecError, match=r"^s\.yaml: study\.lr: expected 'law' or a positive float"):
        load_study(str(path.name), ["study.lr=-1"])
    study = load_study(path, ["study.fit.bootstrap=5", "study.lr=1e-3"])[1]
    assert study.fit == {"bootstrap": 5} and study.lr == 1e-3
    assert study.fit_settings() == {
        "r2_threshold": 0.9,
        "min_budgets": 3,
        "bootstrap": 5,
        "seed": 0,
    }


# ---------------------------------------------------------------------------------- load
def test_tracking_uri_env_override_applies_at_load(spec_file, tmp_path, monkeypatch):
    assert load_spec(spec_file).tracking.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env/runs.db")
    spec = load_spec(spec_file)
    assert spec.tracking.tracking_uri == f"sqlite:///{tmp_path}/env/runs.db"  # env, absolute
    # Final at load: re-made specs keep it, whatever the environment says later.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://other:5000")
    assert spec.with_overrides({"train.lr": 0.1}).tracking.tracking_uri == (
        f"sqlite:///{tmp_path}/env/runs.db"
    )
    assert ExperimentSpec.from_dict(spec.to_dict()) == spec
    # Every loader resolves it the same way.
    assert load_spec(spec_file).tracking.tracking_uri == "http://other:5000"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "sweep": {"space": {"x": {"choices": [1]}}}}))
    assert load_sweep(path)[0].tracking.tracking_uri == "http://other:5000"
    study = {"name": "s", "budgets": [1e9], "variants": {"a": {}}}
    path.write_text(yaml.safe_dump({**MINIMAL, "study": study}))
    assert load_study(path)[0].tracking.tracking_uri == "http://other:5000"
    ev = tmp_path / "e.yaml"
    ev.write_text(yaml.safe_dump({"name": "e", "tasks": {"v": {"kind": "bpb", "path": "v"}}}))
    assert load_eval_config(ev).tracking.tracking_uri == "http://other:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert load_eval_config(ev).tracking.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"


def test_spec_error_carries_its_source(spec_file):
    with pytest.raises(SpecError) as info:
        load_spec(spec_file, ["train.lr=-1"])
    e = info.value
    assert (e.source, e.message) == (str(spec_file), "train.lr: expected float > 0, got -1.0")
    assert str(e) == f"{spec_file}: train.lr: expected float > 0, got -1.0"
    again = pickle.loads(pickle.dumps(e))  # Ray ships errors between processes
    assert (again.source, again.message, str(again)) == (e.source, e.message, str(e))
    inner = SpecError("train.lr: bad", "spec 'x'")
    assert str(inner.with_source("f.yaml")) == "f.yaml: spec 'x': train.lr: bad"
    assert inner.with_source("spec 'x'") is inner
    with pytest.raises(SpecError) as info, schema.attributed_to("a.yaml"):
        raise SpecError("k: problem")
    assert (info.value.source, str(info.value)) == ("a.yaml", "a.yaml: k: problem")
    with pytest.raises(SpecError, match=r"^command line: unknown option '--lr'"):
        schema.parse_cli(["a.yaml", "--lr", "1"])
    assert schema.wants_help(["a.yaml", "-h"]) and not schema.wants_help(["--set", "-h"])
