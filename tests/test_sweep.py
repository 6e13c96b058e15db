"""Ablation sweeps on real local Ray + MLflow (SQLite): tiny models, tens of steps.

The resume test runs the driver as a subprocess (its own Ray) and comes first, before this
module's shared Ray session starts; the other Ray tests share one 3-trial sweep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from aunet.config import AUNetConfig
from aunet.flops import flops_per_byte
from pipelines.spec import SpecError
from pipelines.sweep import format_table, main, summary_rows
from pipelines.sweep_spec import categorical_grid, load_sweep

ROOT = Path(__file__).resolve().parents[1]
CORPUS = str(ROOT / "experiments" / "data" / "quickstart.jsonl.gz")
K2 = {
    "model.dimensions": [32, 64, 96],
    "model.layers": [1, 1, 1],
    "model.head_dims": [16, 16, 16],
    "model.max_seqlens": [128, 48, 24],
}
K3 = {
    "model.dimensions": [32, 64, 96, 128],
    "model.layers": [1, 1, 1, 1],
    "model.head_dims": [16, 16, 16, 16],
    "model.max_seqlens": [128, 48, 24, 12],
}


def write_sweep(tmp: Path, sweep: dict, budget: float = 1.5e10, **train) -> Path:
    doc = {
        "name": "t",
        "data": {
            "sources": [{"path": CORPUS}],
            "seq_len": 128,
            "val_fraction": 0.2,
            "max_documents": 80,
        },
        "model": {
            "dimensions": [32, 64],
            "layers": [1, 1],
            "head_dims": [16, 16],
            "max_seqlens": [128, 48],
            "multiple_of": 32,
        },
        "train": {
            "flop_budget": budget,
            "batch_size": 4,
            "lr": 3e-3,
            "eval_every": 1000,
            "eval_batches": 2,
            "checkpoint_every": 1000,
            "log_every": 50,
            **train,
        },
        "tracking": {"tracking_uri": f"sqlite:///{tmp}/mlruns.db", "experiment": "sweeps"},
        "resources": {
            "num_workers": 1,
            "cpus_per_worker": 0.5,
            "storage_path": str(tmp / "out"),
            "max_failures": 0,
        },
        "sweep": sweep,
    }
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def records(sweep_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (sweep_dir / "trials").glob("*.json")}


# ---------------------------------------------------------------------------------- no Ray
def test_space_parsing_and_errors(tmp_path):
    sweep = {
        "search": "optuna",
        "num_samples": 4,
        "space": {
            "stages": {"choices": {"k1": {}, "k3": K3}},
            "model.upsampling": {"choices": ["multilinear", "repeat"]},
            "train.lr": {"loguniform": [1e-4, 1e-2]},
            "model.dimensions.1": {"int": [48, 96]},
        },
    }
    spec, sw = load_sweep(write_sweep(tmp_path, sweep))
    assert [d.key for d in sw.dims] == [
        "stages",
        "model.upsampling",
        "train.lr",
        "model.dimensions.1",
    ]
    config = {
        "stages": "k3",
        "model.upsampling": "repeat",
        "train.lr": 0.002,
        "model.dimensions.1": 64.0,
    }
    v = spec.with_overrides(sw.overrides(config))
    assert v.model.dimensions == [32, 64, 96, 128] and v.model.upsampling == "repeat"
    assert v.train.lr == 0.002 and sw.label(config) == "stages=k3,model.upsampling=repeat"
    assert len(categorical_grid(sw)) == 4
    domain = sw.dims[2].tune_domain("optuna")
    assert domain.lower == 1e-4 and domain.upper == 1e-2
    assert sw.dims[3].tune_domain("optuna").upper == 97  # inclusive YAML bound
    bad = [
        ({"space": {"x": {"between": [1, 2]}}}, "sweep.space.x: unknown kind"),
        ({"space": {"train.lr": {"loguniform": [0, 1]}}}, "sweep.space.train.lr.loguniform"),
        ({"space": {"data.seq_len": {"int": [64, 128]}}}, "cannot change the dataset"),
        (
            {
                "space": {"s": {"choices": []}},
            },
            "sweep.space.s.choices",
        ),
        ({"serach": "grid", "space": {"s": {"choices": [1]}}}, "sweep.serach: unknown key"),
        (
            {"search": "random", "space": {"s": {"choices": [1]}}},
            r"sweep\.search: expected str in \(grid, optuna\), got 'random'",
        ),
    ]
    for sweep, msg in bad:
        with pytest.raises(SpecError, match=msg):
            load_sweep(write_sweep(tmp_path, sweep))
    # a choice that makes an invalid spec is named before anything runs
    spec, sw = load_sweep(
        write_sweep(tmp_path, {"space": {"s": {"choices": {"bad": {"model.layers": [1]}}}}})
    )
    with pytest.raises(SpecError, match="model.layers"):
        spec.with_overrides(sw.overrides({"s": "bad"}))


def test_strategy_dimension(tmp_path):
    """Whole split strategies per choice, entropy targets included, checked at load."""
    choices = {
        "word": {"word1": "1@1"},
        "script": {"script1": "1@1 han=2"},
        "entropy": {"entropy1": "contraction=5 order=2"},
    }
    spec, sw = load_sweep(write_sweep(tmp_path, {"space": {"strategy": {"choices": choices}}}))
    grid = categorical_grid(sw)
    assert [sw.label(c) for c in grid] == [f"strategy={k}" for k in choices]
    dirs = set()
    for c in grid:
        v = spec.with_overrides(sw.overrides(c))
        assert v.model.split_strategy == choices[c["strategy"]]
        dirs.add(v.dataset_dir())
    assert len(dirs) == 3  # one dataset per strategy, each preprocessed once (pipelines.sweep)
    for bad, msg in [
        ({"x": {"punc1": "1"}}, r"sweep\.space\.strategy\.choices\.x: .*'punc1'.*'punct'"),
        ({"x": {"entropy1": "rate=0.2 order"}}, r"choices\.x: strategy 'entropy1'.*'order'"),
        ({"x": "word1"}, r"choices\.x: expected a strategy mapping"),
    ]:
        with pytest.raises(SpecError, match=msg):
            load_sweep(write_sweep(tmp_path, {"space": {"strategy": {"choices": bad}}}))


# ---------------------------------------------------------------------------------- resume
def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path):
    path = write_sweep(
        tmp_path,
        {
            "name": "resume",
            "max_concurrent_trials": 1,
            "space": {"train.lr": {"choices": [0.003, 0.001]}},
        },
        budget=6e9,
    )
    sweep_dir = tmp_path / "out" / "sweeps" / "resume"
    cmd = [sys.executable, "-m", "pipelines.sweep", str(path)]
    env = {**os.environ, "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            done = [r for r in records(sweep_dir).values() if r["status"] == "finished"]
            saved = list((sweep_dir / "tune").glob("experiment_state-*.json"))
            if done and saved:
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert done, "no trial finished in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started: a hard kill
        proc.wait()
    first_id = done[0]["trial_id"]
    parent = json.loads((sweep_dir / "parent_run.json").read_text())["run_id"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    recs = records(sweep_dir)
    assert len(recs) == 2 and all(r["status"] == "finished" for r in recs.values())
    attempts = (sweep_dir / "trials" / f"{first_id}.attempts").read_text().splitlines()
    assert len(attempts) == 1  # the finished trial was not trained again
    assert json.loads((sweep_dir / "parent_run.json").read_text())["run_id"] == parent
    rows = summary_rows(str(sweep_dir))
    assert sorted(r["status"] for r in rows) == ["finished", "finished"]
    assert "sweep done: 2 trials" in out.stdout
    # The driver's progress lines (stderr): one as each trial ends, the last with both done.
    lines = [x for x in out.stderr.splitlines() if x.startswith("sweep: trials ")]
    assert lines and lines[-1].startswith("sweep: trials 2/2 done (100%) | 0 running | "), lines
    assert " | best val_bits_per_byte " in lines[-1] and " | elapsed " in lines[-1], lines


# ---------------------------------------------------------------------------------- one sweep
@pytest.fixture(scope="module")
def depth_sweep(tmp_path_factory):
    """A 3-trial categorical sweep (1, 2, 3 stages); k3's first attempt dies at step 5."""
    import ray

    from pipelines.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("depth")
    space = {"stages": {"choices": {"k1": {}, "k2": K2, "k3": K3}}}
    fault = {"step": 5, "match": {"stages": "k3"}}
    path = write_sweep(
        tmp,
        {
            "name": "depth",
            "max_concurrent_trials": 3,
            "max_failures": 1,
            "fault": fault,
            "space": space,
        },
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        rows, complete = run_sweep(str(path))
        print(f"3-trial sweep: {time.perf_counter() - t0:.0f} s")
        sweep_dir = tmp / "out" / "sweeps" / "depth"
        yield {
            "rows": rows,
            "complete": complete,
            "tmp": tmp,
            "path": path,
            "uri": f"sqlite:///{tmp}/mlruns.db",
            "dir": sweep_dir,
        }
    finally:
        ray.shutdown()


def test_sweep_parent_and_child_runs(depth_sweep, capsys):
    from mlflow.tracking import MlflowClient

    assert depth_sweep["complete"]
    rows = depth_sweep["rows"]
    assert sorted(r["variant"] for r in rows) == ["stages=k1", "stages=k2", "stages=k3"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    bpb = [r["val_bits_per_byte"] for r in rows]
    assert bpb == sorted(bpb) and all(0 < b < 9 for b in bpb)
    client = MlflowClient(tracking_uri=depth_sweep["uri"])
    parent = json.loads((depth_sweep["dir"] / "parent_run.json").read_text())["run_id"]
    exp = client.get_experiment_by_name("sweeps")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 3  # the retried trial re-opened its run instead of adding one
    by_variant = {c.data.params["sweep.variant"]: c for c in children}
    for r in rows:
        child = by_variant[r["variant"]]
        assert child.data.params["sweep.stages"] == r["variant"].split("=")[1]
        assert child.data.metrics["val/bits_per_byte"] == pytest.approx(r["val_bits_per_byte"])
        assert child.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"results.csv", "results.png", "best.yaml"} <= artifacts
    assert {"results.svg", "results.pdf", "results.tex", "summary.html"} <= artifacts
    page = (depth_sweep["dir"] / "summary.html").read_text()  # same kind of page as the report
    hashes = page.split("<th>dataset hash</th><td>")[1].split("<")[0].split(", ")
    assert len(hashes) == 3 and all(len(h) == 64 for h in hashes)  # one dataset per depth
    assert page.count("<tr><td>") == 3 and "val (bits/byte)" in page
    best = yaml.safe_load((depth_sweep["dir"] / "best.yaml").read_text())
    assert best["model"]["dimensions"] == [32, 64]  # k1 ranked first above
    assert client.get_run(parent).data.metrics["trials_finished"] == 3
    assert main(["--summary", parent, "--tracking-uri", depth_sweep["uri"]]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["rank", "variant", "trial"]
    assert table == format_table(summary_rows(str(depth_sweep["dir"]))) + "\n"


def test_compute_matched_within_2_percent(depth_sweep):
    rows = {r["variant"]: r for r in depth_sweep["rows"]}
    budget = 1.5e10
    for r in rows.values():
        assert abs(r["flops"] / budget - 1) <= 0.02
    assert rows["stages=k1"]["steps"] > rows["stages=k3"]["steps"]  # the deeper model is dearer
    recs = {r["variant"]: r for r in records(depth_sweep["dir"]).values()}
    for label, dims in (("stages=k1", {}), ("stages=k3", K3)):
        # recompute the recorded FLOPs naively: aunet.flops at the dataset's measured contraction
        rec = recs[label]
        model = {
            "dimensions": [32, 64],
            "layers": [1, 1],
            "head_dims": [16, 16],
            "max_seqlens": [128, 48],
            "multiple_of": 32,
        }
        model.update({k.split(".", 1)[1]: v for k, v in dims.items()})
        cfg = AUNetConfig.from_dict(model)
        ds = [
            p
            for p in (depth_sweep["tmp"] / "out" / "datasets").iterdir()
            if json.loads((p / "manifest.json").read_text())["num_stages"] == cfg.num_stages
        ]
        ratios = json.loads((ds[0] / "manifest.json").read_text())["contraction"]
        per_step = flops_per_byte(cfg, 128, bytes_per_token=ratios) * 128 * 4
        assert rec["flops"] == pytest.approx(per_step * rec["steps"], rel=1e-9)
        assert rec["steps"] == round(budget / per_step)
        assert rec["final_step"] == rec["steps"]


def test_failed_trial_is_retried_and_reported(depth_sweep):
    rows = {r["variant"]: r for r in depth_sweep["rows"]}
    assert rows["stages=k3"]["attempts"] == 2 and rows["stages=k3"]["status"] == "finished"
    assert rows["stages=k1"]["attempts"] == 1 and rows["stages=k2"]["attempts"] == 1
    rec = next(r for r in records(depth_sweep["dir"]).values() if r["variant"] == "stages=k3")
    assert (depth_sweep["dir"] / "trials" / f"{rec['trial_id']}.fault").read_text() == "5"
    # the first attempt's steps and the retry's are both in the Train run's step log
    steps = (depth_sweep["dir"] / "runs" / rec["trial"] / "steps.jsonl").read_text().splitlines()
    assert len({json.loads(s)["attempt"] for s in steps}) == 2
