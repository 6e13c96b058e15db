"""Scaling studies: study files, cell planning against aunet.flops, and a real tiny study
(Ray Tune sweep + Ray Train + MLflow on SQLite) through to the report files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from aunet.flops import batch_size_bytes, compute_optimal, flops_per_byte, learning_rate
from pipelines import scaling
from pipelines.spec import SpecError

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "experiments" / "data" / "quickstart.jsonl.gz"
AUNET3 = {
    "model.dimensions": [16, 16, 16],
    "model.layers": [1, 1, 1],
    "model.head_dims": [16, 16, 16],
    "model.max_seqlens": [64, 16, 8],
    "model.sliding_windows": [32, 32, 32],
    "model.strategy": {"word1": "1@1", "word2": "2@1"},
}


def study_file(tmp_path: Path, **study) -> Path:
    """A tiny 2-stage template on the shipped corpus; AU-Net 2 and AU-Net 3 variants."""
    raw = {
        "name": "scaling-tiny",
        "data": {
            "sources": [{"path": str(CORPUS)}],
            "seq_len": 64,
            "val_fraction": 0.25,
            "max_documents": 60,
        },
        "model": {
            "dimensions": [16, 16],
            "layers": [1, 1],
            "head_dims": [16, 16],
            "max_seqlens": [64, 16],
            "sliding_windows": [32, 32],
            "multiple_of": 16,
            "strategy": {"word1": "1@1"},
        },
        "train": {"eval_batches": 1, "log_every": 1},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlruns.db", "experiment": "tiny"},
        "resources": {"num_workers": 1, "storage_path": str(tmp_path / "out"), "max_failures": 0},
        "study": {
            "name": "tiny",
            "budgets": [4e8, 1e9, 2.5e9],
            "bytes_per_param": 20,
            "evals_per_run": 1,
            "fit": {"bootstrap": 50},
            "sweep": {"max_concurrent_trials": 2, "flop_tolerance": 0.1},
            "variants": {"aunet2": {}, "aunet3": AUNET3},
            **study,
        },
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("study.budget=[1e9]", "study.budget: unknown key"),
        ("study.budgets=[1e9, -1]", "study.budgets: expected distinct positive numbers"),
        ("study.lr=fast", "study.lr: expected 'law' or a positive float"),
        ("study.fit={r2: 0.5}", "study.fit.r2: unknown key"),
        ("study.variants={x: {model.dimension: [8]}}", "model.dimension"),
    ],
)
def test_bad_study_files_name_the_key(tmp_path, override, message):
    path = study_file(tmp_path)
    with pytest.raises(SpecError, match=message) as e:
        scaling.load_study(path, [override])
    assert str(e.value).startswith(str(path))


def test_cells_follow_the_size_rule_and_the_scaling_formulas(tmp_path):
    over = ["study.bytes_per_param=5", "study.budgets=[1e10, 1e11, 1e12]"]
    spec, study = scaling.load_study(study_file(tmp_path), over)
    assert spec.train.flop_budget == 1e10  # the base spec borrows the first budget
    cells = scaling.plan_cells(spec, study)
    assert [c.label for c in cells] == [
        f"{v}@{b}" for v in ("aunet2", "aunet3") for b in ("1e+10", "1e+11", "1e+12")
    ]
    T = spec.data.seq_len
    for c in cells:
        base = spec.with_overrides(study.variants[c.variant])
        want = compute_optimal(base.model, c.budget, T, bytes_per_param=5)["config"]
        assert c.overrides["model.dimensions"] == list(want.dimensions)
        assert c.batch_size == max(1, round(batch_size_bytes(c.budget) / T))
        fpb = flops_per_byte(want, T)
        assert c.steps == round(c.budget / (fpb * T * c.batch_size))  # nearest whole step
        assert c.lr == pytest.approx(learning_rate(fpb * T * c.batch_size * c.steps))
        assert "train.lr" not in c.overrides and "train.batch_size" not in c.overrides
    sizes = [c.params for c in cells if c.variant == "aunet3"]
    assert sizes == [34352, 120416, 246672]  # bigger budgets, bigger models (num_params)


def test_size_and_lr_factors_make_a_grid_with_explicit_lr(tmp_path):
    path = study_file(tmp_path, size_factors=[0.5, 1, 2], lr_factors=[0.5, 1])
    spec, study = scaling.load_study(path, ["study.budgets=[1e11]"])
    cells = scaling.plan_cells(spec, study)
    assert len(cells) == 2 * 3 * 2
    assert cells[0].label == "aunet2@1e+11,Nx0.5,lrx0.5"
    assert cells[0].overrides["train.lr"] == pytest.approx(0.5 * learning_rate(1e11))
    assert cells[1].overrides["train.lr"] == pytest.approx(learning_rate(1e11))
    # N x f is bytes_per_param / f^2 in the rule: 20 -> 80, 20, 5 bytes per parameter.
    p = [c.params for c in cells if c.variant == "aunet3" and c.lr_factor == 1]
    assert p == [34352, 34352, 120416]


def test_sweep_file_is_deterministic_and_loads_as_a_sweep(tmp_path):
    from pipelines.sweep_spec import load_sweep

    spec, study = scaling.load_study(study_file(tmp_path))
    cells = scaling.plan_cells(spec, study)
    path = tmp_path / "sweep.yaml"
    scaling.write_sweep_file(spec, study, cells, path)
    text = path.read_text()
    scaling.write_sweep_file(spec, study, scaling.plan_cells(spec, study), path)
    assert path.read_text() == text
    base, sweep = load_sweep(path)
    (dim,) = sweep.dims
    assert dim.key == "cell" and list(dim.choices) == [c.label for c in cells]
    assert sweep.name == "scaling-tiny" and sweep.max_concurrent_trials == 2
    assert dim.choices["aunet3@1e+09"]["train.flop_budget"] == 1e9


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.e2e
@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path, ray_local, monkeypatch):
    """2 variants x 3 budgets trained through the sweep, tagged, read back from MLflow, fitted,
    and reported (HTML, PNG, CSV, JSON, and a report run with the files as artifacts)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.report import build_report

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    path = study_file(tmp_path)
    rows, complete = scaling.run_study(str(path))
    assert complete and len(rows) == 6
    assert all(r["status"] == "finished" for r in rows)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(
        experiment_names=["tiny"], output_format="list", filter_string="tags.`aunet.study` = 'tiny'"
    )
    cells = [r for r in runs if r.data.tags.get("aunet.role") == "cell"]
    assert sorted(
        (r.data.tags["aunet.variant"], float(r.data.tags["aunet.budget"])) for r in cells
    ) == sorted((v, b) for v in ("aunet2", "aunet3") for b in (4e8, 1e9, 2.5e9))
    for r in cells:  # compute-matched to the budget (the sweep's tolerance)
        C = float(r.data.params["plan.total_flops"])
        assert abs(C / float(r.data.tags["aunet.budget"]) - 1) <= 0.1
    spec, study = scaling.load_study(str(path))  # `scaling plan` now: the datasets exist
    planned = {c.label: (c.steps, c.batch_size) for c in scaling.plan_cells(spec, study)}
    trained = {
        r.data.tags["aunet.cell"]: (
            int(r.data.params["plan.steps"]),
            int(r.data.params["plan.batch_size"]),
        )
        for r in cells
    }
    assert trained == planned  # the printed plan is what the sweep trained, cell by cell

    out = tmp_path / "report"
    result = build_report(
        uri,
        "tiny",
        "tiny",
        out,
        {"r2_threshold": 0.9, "min_budgets": 3, "bootstrap": 50, "seed": 0},
    )
    for name in ("report.html", "tables.tex", "fits.csv", "fits.json"):
        assert (out / name).stat().st_size > 0, name
    for stem in ("loss_vs_compute", "contraction", "training_curves"):
        for ext in ("png", "svg", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0, (stem, ext)
    fits = json.loads((out / "fits.json").read_text())
    assert [f["variant"] for f in fits["fits"]] == ["aunet2", "aunet3"]
    for f in fits["fits"]:
        assert f["runs"] == 3 and f["budgets"] == 3
        assert isinstance(f["loss_at_10x"], float) or f["loss_at_10x"].startswith("n/a (")
    losses = {p["cell"]: p["loss"] for p in fits["points"]}
    assert all(math.isfinite(v) and 0 < v < 9 for v in losses.values())
    assert set(fits["contraction"]) == {"aunet2", "aunet3"}
    assert len(fits["contraction"]["aunet3"]) == 3 and fits["contraction"]["aunet3"][0] == 1.0
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "UNVERIFIED" in page
    prov = fits["provenance"]  # the header: when, which code, which spec and dataset
    assert prov["date"].endswith("UTC") and prov["study"] == "tiny"
    hashes = prov["dataset hash"].split(", ")  # one dataset per split strategy (2 and 3 stages)
    assert len(hashes) == 2 and all(len(h) == 64 for h in hashes)
    assert prov["spec file"].endswith(".yaml") and f"<td>{prov['dataset hash']}</td>" in page
    vs = fits["versus_baseline"]  # no variant named baseline: aunet2 is the reference
    assert sorted(r["budget"] for r in vs) == [4e8, 1e9, 2.5e9]
    for r in vs:
        assert r["variant"] == "aunet3" and r["delta"] == pytest.approx(
            r["loss"] - r["baseline_loss"]
        )
    tex = (out / "tables.tex").read_text()
    assert "\\begin{tabular}" in tex and "% study: tiny" in tex
    client = MlflowClient(tracking_uri=uri)
    arts = {a.path for a in client.list_artifacts(result["report_run_id"], "report")}
    assert {"report/report.html", "report/fits.csv", "report/loss_vs_compute.png"} <= arts
    # The CLI on the experiment name finds the study by its tags; the first report run is ignored.
    argv = [
        "report",
        "tiny",
        "--tracking-uri",
        uri,
        "--out",
        str(tmp_path / "r2"),
        "--bootstrap",
        "20",
    ]
    assert scaling.main(argv) == 0
    again = json.loads((tmp_path / "r2" / "fits.json").read_text())
    assert len(again["points"]) == 6 and again["fits"][0]["runs"] == 3
