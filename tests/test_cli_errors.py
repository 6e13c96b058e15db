"""Every CLI turns a user's mistake into one line, ``error: ...``, and exit code 2 (issue 18,
item 9): missing data paths (before Ray starts), empty corpora, invalid JSONL lines, missing and
corrupt checkpoints, unreachable tracking servers, duplicate YAML keys.

Each case runs the real CLI as a subprocess in a temporary directory. The cases that must read a
corpus start a local Ray and are marked slow; their stderr may also hold Ray's own timestamped
log lines (``RAY_LOG``: start-up, token auth, Ray Data's progress notes), which are filtered out.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from netutil import free_port

from pipelines.cli import expected_error, one_line, split_debug
from pipelines.schema import SpecError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "lingua"
RAY_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING) \S+\.py:\d+ -- ")
NO_RAY_SECONDS = 60  # a CLI that starts no Ray answers in a few seconds (torch import included)
DOCS = [{"text": f"document number {i}: the quick brown fox jumps."} for i in range(30)]


def run_cli(cwd: Path, *args: str, ray_dir: Path | None = None, timeout: int = 600, **env: str):
    """``python -m <args>`` in ``cwd``; with ``ray_dir``, Ray's temp dir (to see it unused)."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AUNET_DEBUG"):
        if var not in env:
            full.pop(var, None)
    if ray_dir is not None:
        full["RAY_TMPDIR"] = str(ray_dir)
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return out, time.perf_counter() - t0


def assert_one_error(out: subprocess.CompletedProcess, *needles: str, ray: bool = False) -> str:
    """rc 2, no traceback, stderr = the one ``error:`` line (plus Ray's log lines if ``ray``)."""
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text[-3000:]
    # progress lines (pipelines.progress: "preprocess: units 1/1 ...") are not errors
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and " | ETA " not in ln]
    if ray:
        lines = [ln for ln in lines if not RAY_LOG.match(ln)]
    else:
        assert "Started a local Ray instance" not in text
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    return lines[0]


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def spec_dict(tmp: Path, sources: str = "corpus.jsonl", uri: str | None = None) -> dict:
    return {
        "name": "tiny",
        "data": {"sources": sources, "seq_len": 64, "val_fraction": 0.2},
        "model": {"dimensions": [32, 64], "layers": [1, 1], "head_dims": [16, 16]},
        "train": {"steps": 2, "batch_size": 2},
        "tracking": {"tracking_uri": uri or f"sqlite:///{tmp}/ml.db", "experiment": "t"},
        "resources": {"num_workers": 1, "storage_path": str(tmp / "out"), "max_failures": 0},
    }


SWEEP = {"space": {"train.lr": {"choices": [0.001, 0.002]}}}
STUDY = {"name": "s", "budgets": [4e8, 1e9], "bytes_per_param": 20, "variants": {"a": {}}}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A directory with a corpus, specs (plain, sweep, study), an eval YAML and a checkpoint."""
    write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    write_jsonl(tmp_path / "bad.jsonl", [*DOCS[:2], '{"text": "no end quote}', DOCS[3]])
    write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"body": "x"}, {"text": None}])
    spec = spec_dict(tmp_path)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({**spec, "sweep": SWEEP}))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({**spec, "study": STUDY}))
    text = (tmp_path / "spec.yaml").read_text()
    (tmp_path / "dup.yaml").write_text(text + "name: other\n")  # `name` twice, last line
    for kind, section in (("sweep", SWEEP), ("study", STUDY)):
        body = yaml.safe_dump({kind: {"name": "first", **section}}, sort_keys=False)
        (tmp_path / f"dup_{kind}.yaml").write_text(text + body + "  name: again\n")
    write_jsonl(tmp_path / "val.jsonl", DOCS[:4])
    ev = {"name": "e", "tasks": {"val": {"kind": "bpb", "path": "val.jsonl"}}}
    ev["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path}/ml.db"}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(ev))
    from reference import tiny_aunet

    from aunet.checkpoint import save_pretrained

    save_pretrained(tiny_aunet(24), tmp_path / "ckpt", metadata={"plan": {"seq_len": 64}})
    return tmp_path


def no_ray(work: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run a CLI that must fail before Ray starts: fast, and Ray's temp dir never created."""
    ray_dir = Path("/tmp") / f"rt-{uuid.uuid4().hex[:8]}"
    out, seconds = run_cli(work, *args, ray_dir=ray_dir, timeout=2 * NO_RAY_SECONDS, **env)
    assert not ray_dir.exists(), f"{args}: Ray started ({out.stderr[-1500:]})"
    assert seconds < NO_RAY_SECONDS, seconds
    return out


# ---------------------------------------------------------------------------------- no Ray
@pytest.mark.parametrize(
    "args",
    [
        ("pipelines.preprocess", "spec.yaml"),
        ("pipelines.train", "spec.yaml"),
        ("pipelines.sweep", "sweep.yaml"),
        ("pipelines.scaling", "run", "study.yaml"),
    ],
)
def test_missing_data_path_fails_before_ray(work, args):
    out = no_ray(work, *args, "data.sources=nope/*.jsonl")
    assert_one_error(out, "data.sources[0].path: glob matches no file", "nope/*.jsonl")
    out = no_ray(work, *args, "data.sources=missing.jsonl")
    assert_one_error(out, "no such file", str(work / "missing.jsonl"))


@pytest.mark.parametrize(
    ("args", "key", "lines"),
    [
        (("pipelines.preprocess", "dup.yaml"), "name", "line 2"),
        (("pipelines.train", "dup.yaml"), "name", "line 2"),
        (("pipelines.sweep", "dup_sweep.yaml"), "sweep.name", "first on line"),
        (("pipelines.scaling", "plan", "dup_study.yaml"), "study.name", "first on line"),
        (("pipelines.scaling", "run", "dup_study.yaml"), "study.name", "first on line"),
        (("pipelines.scaling", "report", "dup_study.yaml"), "study.name", "first on line"),
    ],
)
def test_duplicate_yaml_keys_are_rejected(work, args, key, lines):
    out = no_ray(work, *args)
    line = assert_one_error(out, f"{args[-1]}: {key}: duplicate key", lines)
    n = len((work / args[-1]).read_text().splitlines())
    assert f"(line {n}, first on line " in line


def test_duplicate_keys_in_the_eval_yaml(work):
    text = (work / "eval.yaml").read_text()
    (work / "dup_eval.yaml").write_text(text + "batch_size: 4\nbatch_size: 8\n")
    out = no_ray(work, "pipelines.evaluate", "ckpt", "dup_eval.yaml", "--no-mlflow")
    n = len(text.splitlines())
    assert_one_error(out, f"dup_eval.yaml: batch_size: duplicate key (line {n + 2}, first on")


@pytest.mark.parametrize(
    "args",
    [
        ("pipelines.train", "spec.yaml"),
        ("pipelines.sweep", "sweep.yaml"),
        ("pipelines.scaling", "run", "study.yaml"),
        ("pipelines.evaluate", "ckpt", "eval.yaml"),
    ],
)
def test_unreachable_tracking_server(work, args):
    uri = f"http://127.0.0.1:{free_port()}"
    out = no_ray(work, *args, f"tracking.tracking_uri={uri}")
    assert_one_error(out, f"MLflow tracking server {uri}: not reachable")


def test_unreachable_tracking_server_for_the_scaling_report(work):
    uri = f"http://127.0.0.1:{free_port()}"
    out = no_ray(work, "pipelines.scaling", "report", "some-experiment", "--tracking-uri", uri)
    assert_one_error(out, f"MLflow tracking server {uri}: not reachable")


def test_evaluate_missing_and_corrupt_checkpoints(work):
    out = no_ray(work, "pipelines.evaluate", "nope", "eval.yaml", "--no-mlflow")
    assert_one_error(out, f"{work / 'nope'}: no such checkpoint directory")
    weights = work / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated
    out = no_ray(work, "pipelines.evaluate", "ckpt", "eval.yaml", "--no-mlflow")
    assert_one_error(out, "model.safetensors")
    (work / "ckpt" / "config.json").write_text("{oops")
    out = no_ray(work, "pipelines.evaluate", "ckpt", "eval.yaml", "--no-mlflow")
    assert_one_error(out, "config.json: corrupt config")


def test_evaluate_bad_task_data(work):
    write_jsonl(work / "val.jsonl", [DOCS[0], "{not json", DOCS[1]])
    out = no_ray(work, "pipelines.evaluate", "ckpt", "eval.yaml", "--no-mlflow")
    assert_one_error(out, "val.jsonl: line 2: invalid JSON")
    (work / "val.jsonl").unlink()
    out = no_ray(work, "pipelines.evaluate", "ckpt", "eval.yaml", "--no-mlflow")
    assert_one_error(out, "val.jsonl")


def test_generate_bad_checkpoint_and_settings(work):
    out = no_ray(work, "pipelines.generate", "nope", "--prompt", "hi")
    assert_one_error(out, "nope: no such checkpoint directory")
    out = no_ray(work, "pipelines.generate", "ckpt", "--prompt", "hi", "--top-p", "1.5")
    assert_one_error(out, "top_p")
    weights = work / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated: its digest no longer matches
    out = no_ray(work, "pipelines.generate", "ckpt", "--prompt", "hi")
    assert_one_error(out, "model.safetensors: SHA-256")


def test_generate_echo_prompt_and_sweep_summary_of_a_missing_directory(work):
    args = ("pipelines.generate", "ckpt", "--prompt", "h\u00e9", "--max-new-bytes", "4")
    plain = run_cli(work, *args, "--temperature", "0", timeout=300)[0]
    echoed = run_cli(work, *args, "--temperature", "0", "--echo-prompt", timeout=300)[0]
    assert plain.returncode == echoed.returncode == 0, plain.stderr + echoed.stderr
    assert echoed.stdout.startswith("h\u00e9")
    # Same bytes after the prompt (decoded together, so compare as bytes where it is valid).
    assert echoed.stdout.encode()[len("h\u00e9".encode()) :] == plain.stdout.encode()
    # Progress lines on stderr only when asked (stderr is a pipe here): every 2 bytes of 20.
    assert "generate:" not in plain.stderr
    shown = run_cli(work, *args[:-1], "20", "--temperature", "0", "--progress", timeout=300)[0]
    lines = [x for x in shown.stderr.splitlines() if x.startswith("generate: ")]
    assert shown.returncode == 0 and lines, shown.stderr
    counts = [int(x.split()[1].split("/")[0]) for x in lines]
    assert all(x.split()[1].endswith("/20") and " B/s | " in x for x in lines), lines
    if lines[-1].endswith("stopped early (EOS or --stop)"):
        counts = counts[:-1]
    else:
        assert lines[-1].startswith("generate: 20/20 bytes (100%) |"), lines
    assert counts == list(range(2, 2 * len(counts) + 1, 2)), lines
    out = no_ray(work, "pipelines.sweep", "--summary", "no/such/dir")
    assert_one_error(out, "no/such/dir: no such sweep directory")


def test_interop_missing_and_corrupt_checkpoints(work):
    out = no_ray(work, "aunet.interop", "nope", "out")
    assert_one_error(out, "nope: no consolidated.pth + params.json")
    out = no_ray(work, "aunet.interop", "nope", "out", "--to-lingua")
    assert_one_error(out, "nope/config.json: missing")
    lingua = work / "lingua"
    lingua.mkdir()
    (lingua / "params.json").write_text((FIXTURES / "k2_multilinear.yaml").read_text())
    (lingua / "consolidated.pth").write_bytes(os.urandom(1000))
    out = no_ray(work, "aunet.interop", "lingua", "out")
    assert_one_error(out, "lingua/consolidated.pth: cannot read")
    (lingua / "params.json").write_text("model: [\n")  # YAML that does not parse
    out = no_ray(work, "aunet.interop", "lingua", "out")
    assert_one_error(out, "lingua/params.json: cannot read official config")
    weights = work / "ckpt" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4096:] = bytes(b ^ 0xFF for b in data[-4096:])  # flipped weight bytes
    weights.write_bytes(bytes(data))
    out = no_ray(work, "aunet.interop", "ckpt", "out2", "--to-lingua")
    assert_one_error(out, "ckpt/model.safetensors: SHA-256")
    assert not (work / "out").exists() and not (work / "out2").exists()


def test_debug_shows_the_traceback(work):
    for extra, env in (((), {"AUNET_DEBUG": "1"}), (("--debug",), {})):
        out = no_ray(
            work, "pipelines.train", "spec.yaml", "data.sources=missing.jsonl", *extra, **env
        )
        assert out.returncode == 2
        assert "Traceback" in out.stderr and "FileNotFoundError" in out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("error: data.sources[0].path")


def test_a_bug_keeps_its_traceback(work):
    """Only expected errors are shortened: anything else is a bug and shows where it happened."""
    code = "from pipelines.cli import run_main; import sys; sys.exit(run_main(lambda a: 1 / 0, []))"
    full = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env=full, capture_output=True)
    assert out.returncode == 1 and b"ZeroDivisionError" in out.stderr
    assert b"Traceback" in out.stderr


# ---------------------------------------------------------------------------------- mechanism
def test_ray_wrapped_errors_are_opened():
    """A SpecError raised in a Ray task (or a Train worker) reaches the driver wrapped; the
    reported line is the cause's, not Ray's remote traceback."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    cause = SpecError("train.lr: expected float > 0, got -1", "s.yaml")
    wrapped = RayTaskError("fn", "Traceback (most recent call last):\n ...", cause)
    dual = wrapped.as_instanceof_cause()
    assert isinstance(dual, SpecError)  # Ray's dual class: a SpecError whose str() is the log
    assert str(dual) != str(cause) and "pid=" in str(dual)
    assert expected_error(dual) is cause
    group = WorkerGroupError("rank 0 failed", {0: dual})
    try:
        try:
            raise group
        except WorkerGroupError as e:
            raise RuntimeError("fit failed") from e
    except RuntimeError as e:
        assert expected_error(e) is cause
    assert expected_error(RuntimeError("a bug")) is None
    assert expected_error(KeyError("k"), extra=(LookupError,)) is not None


def test_one_line_and_debug_flag():
    assert one_line("a\n  b\tc\n") == "a b c"
    assert len(one_line("x " * 1000)) == 600
    assert split_debug(["s.yaml", "--debug", "a=1"]) == (["s.yaml", "a=1"], True)
    assert split_debug(["s.yaml", "--set", "--debug"]) == (["s.yaml", "--set", "--debug"], False)


# ---------------------------------------------------------------------------------- Ray
@pytest.mark.slow
def test_preprocess_invalid_jsonl_line_names_file_and_line(work):
    out, _ = run_cli(work, "pipelines.preprocess", "spec.yaml", "data.sources=bad.jsonl")
    assert_one_error(out, f"{work / 'bad.jsonl'}: line 3: invalid JSON", ray=True)
    assert "Failed to apply UDF" not in out.stderr and "RayTaskError" not in out.stderr
    assert not (work / "outputs").exists() or not any((work / "outputs").rglob("manifest.json"))


@pytest.mark.slow
def test_preprocess_refuses_an_empty_corpus(work):
    out, _ = run_cli(work, "pipelines.preprocess", "spec.yaml", "data.sources=empty.jsonl")
    line = assert_one_error(out, "empty corpus: 0 documents", "empty.jsonl", ray=True)
    assert "3 read" in line and "nothing published" in line
    assert not list((work / "outputs" / "datasets").glob("tiny-*"))  # no dataset, no temp dir


@pytest.mark.slow
def test_train_reports_a_bad_corpus_line_in_one_line(work):
    out, _ = run_cli(work, "pipelines.train", "spec.yaml", "data.sources=bad.jsonl")
    assert_one_error(out, "bad.jsonl: line 3: invalid JSON", ray=True)
