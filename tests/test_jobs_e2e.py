"""Acceptance: the quickstart submitted with ``ray job submit`` to the local platform.

``platform/local/up`` starts a Ray head and an MLflow server (random ports, state in tmp); the
quickstart is submitted as a job with ``--working-dir`` the repository, as a user would, then a
generation job on its checkpoint. Checked: the job joins the running cluster, logs to the
server named by the head's ``MLFLOW_TRACKING_URI`` (not the spec's sqlite file in the job's
ephemeral working dir), writes its runs under the absolute ``resources.storage_path`` override,
tags the MLflow run with the submission id, keeps its artifacts in the server's artifact store,
and that ``platform/local/down`` leaves no process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_platform import _free_ports, _tree

from pipelines.runtime import artifact_location_for

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "platform" / "local"
STEPS = 4
PROMPT = "In the beginning"
# Tiny quickstart: one variant, 4 steps of 4 x 128 bytes on 2 workers, 40 documents.
TRAIN_OVERRIDES = [
    "variant=aunet2",
    f"train.steps={STEPS}",
    "train.batch_size=4",
    f"train.eval_every={STEPS}",
    "train.eval_batches=1",
    f"train.checkpoint_every={STEPS}",
    "data.seq_len=128",
    "model.max_seqlens=[128,32]",
    "data.max_documents=40",
]


def test_artifact_location_for():
    # An explicit choice always wins; a server picks its own root; sqlite: next to the database.
    assert artifact_location_for("http://h:5000", "s3://b/a") == "s3://b/a"
    assert artifact_location_for("http://h:5000", None) is None
    sqlite = "sqlite:////data/m/mlruns.db"
    assert artifact_location_for(sqlite, None) == "file:///data/m/mlartifacts"
    assert artifact_location_for("sqlite:///:memory:", None) is None


def _ray_cli() -> str:
    """The ``ray`` script of the interpreter running the tests (not whatever PATH finds)."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if found is None:
        pytest.fail("the `ray` CLI is not installed next to the test interpreter or on PATH")
    return found


@pytest.mark.e2e
def test_quickstart_via_ray_job_submit(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    gcs, dash, client_port, agent, mlf = _free_ports(5)
    state, shared = tmp_path / "state", tmp_path / "shared"
    env = {
        **os.environ,
        "AUNET_PLATFORM_DIR": str(state),
        "AUNET_RAY_PORT": str(gcs),
        "AUNET_RAY_DASHBOARD_PORT": str(dash),
        "AUNET_RAY_CLIENT_PORT": str(client_port),
        "AUNET_RAY_AGENT_PORT": str(agent),
        "AUNET_MLFLOW_PORT": str(mlf),
        "AUNET_RAY_NUM_CPUS": "2",
    }
    for var in ("AUNET_BIND_HOST", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN"):
        env.pop(var, None)
    dashboard, tracking = f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{mlf}"

    def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout
        )

    def script(name: str) -> str:
        p = run([str(LOCAL / name)], 150)
        assert p.returncode == 0, f"{name} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
        return p.stdout

    ray = _ray_cli()

    def submit(job_id: str, *entrypoint: str, timeout: float = 300) -> str:
        cmd = [
            ray,
            "job",
            "submit",
            "--address",
            dashboard,
            "--submission-id",
            job_id,
            "--working-dir",
            str(ROOT),
            "--",
            sys.executable,
            "-m",
            *entrypoint,
        ]
        p = run(cmd, timeout)
        out = p.stdout + p.stderr
        assert p.returncode == 0 and f"Job '{job_id}' succeeded" in out, out[-6000:]
        return out

    t0 = time.monotonic()
    script("up")
    leaders = [int((state / f"{n}/{n}.pid").read_text().split()[0]) for n in ("ray", "mlflow")]
    tree: set[int] = set()
    try:
        # The job CLI authenticates the way a user's shell does: with the exports `env` prints.
        for line in script("env").splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        assert env["MLFLOW_TRACKING_URI"] == tracking and ":" in env["RAY_ADDRESS"]
        t_up = time.monotonic()

        train_id = f"aunet-e2e-train-{uuid.uuid4().hex[:8]}"
        log = submit(
            train_id,
            "pipelines.train",
            "experiments/quickstart.yaml",
            *TRAIN_OVERRIDES,
            f"resources.storage_path={shared}",
        )
        t_train = time.monotonic()
        tree = _tree(leaders)  # the head's processes, job drivers and Train workers included
        # Joined the running head (no second cluster) and logged to the server, not to sqlite.
        assert f"Connecting to existing Ray cluster at address: {env['RAY_ADDRESS']}" in log
        assert f"store {tracking}" in log

        # Outputs under the shared storage path, not the job's ephemeral working_dir.
        run_dir = shared / "quickstart-aunet2"
        assert (run_dir / "final" / "model.safetensors").is_file()
        assert (run_dir / f"step_{STEPS:07d}").is_dir()
        steps = [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
        assert list((shared / "datasets").glob("quickstart-*/manifest.json"))

        mlflow = MlflowClient(tracking_uri=tracking)
        exp = mlflow.get_experiment_by_name("quickstart")
        assert exp is not None, f"no experiment 'quickstart' on {tracking}"
        runs = mlflow.search_runs([exp.experiment_id], f"tags.ray_job_id = '{train_id}'")
        assert len(runs) == 1, [r.data.tags for r in mlflow.search_runs([exp.experiment_id])]
        r = runs[0]
        assert r.info.status == "FINISHED" and r.info.run_name == "quickstart-aunet2"
        assert r.data.params["resources.storage_path"] == str(shared)
        assert r.data.params["train.steps"] == str(STEPS)
        losses = mlflow.get_metric_history(r.info.run_id, "train/loss")
        assert sorted(m.step for m in losses) == list(range(1, STEPS + 1))
        bpb = r.data.metrics["val/bits_per_byte"]  # the final validation: its last point
        assert bpb == pytest.approx(steps[-1]["val/bits_per_byte"]) and 0 < bpb < 9
        # The checkpoint artifact is in the server's artifact store (--default-artifact-root
        # under the state dir), not in the job's working_dir, which Ray may delete.
        assert "working_dir_files" not in r.info.artifact_uri, r.info.artifact_uri
        final = {a.path for a in mlflow.list_artifacts(r.info.run_id, "final")}
        assert {"final/model.safetensors", "final/config.json"} <= final
        stored = list((state / "mlflow" / "artifacts").rglob("final/model.safetensors"))
        run_copy = [p for p in stored if f"/{r.info.run_id}/artifacts/final/" in p.as_posix()]
        assert len(run_copy) == 1, (r.info.artifact_uri, stored)
        assert run_copy[0].read_bytes() == (run_dir / "final" / "model.safetensors").read_bytes()
        # ... and the servable pyfunc model logged with it carries the same weights.
        assert r.data.tags["aunet.model_uri"].startswith("models:/")
        assert all(p.read_bytes() == run_copy[0].read_bytes() for p in stored)

        # Generation as a second job; greedy, so the continuation is known in advance.
        from aunet.api import AUModel

        model = AUModel.from_pretrained(str(run_dir / "final"))
        want = model.generate(PROMPT.encode(), max_new_bytes=24, temperature=0.0)
        want_text = want.decode("utf-8", errors="replace").strip()
        gen_id = f"aunet-e2e-generate-{uuid.uuid4().hex[:8]}"
        submit(
            gen_id,
            "pipelines.generate",
            str(run_dir / "final"),
            "--prompt",
            PROMPT,
            "--max-new-bytes",
            "24",
            "--temperature",
            "0",
            timeout=180,
        )
        logs = run([ray, "job", "logs", "--address", dashboard, gen_id], 60)
        assert logs.returncode == 0, logs.stderr
        assert want_text and want_text in logs.stdout, (want_text, logs.stdout[-2000:])
        t_gen = time.monotonic()
    finally:
        tree |= _tree(leaders)
        down = script("down")
    assert "ray: stopped" in down and "mlflow: stopped" in down
    left = _tree(leaders) | (tree & _tree(sorted(tree)))
    assert not left, f"processes left after down: {left}"
    print(
        f"\nup {t_up - t0:.0f} s, train job {t_train - t_up:.0f} s, generate job "
        f"{t_gen - t_train:.0f} s, down {time.monotonic() - t_gen:.0f} s, {len(tree)} processes"
    )
