"""The BPE baseline through the pipelines: planning on the byte axis, a real training run on a
token-id dataset (local Ray), its checkpoint and MLflow run, and ``pipelines.evaluate`` on it.

Every figure is checked against a naive recomputation: FLOPs per byte from ``flops_per_token`` and
the manifest's bytes per token; the logged validation bits/byte from the final checkpoint on the
same batches in float64, with each target's bytes counted by decoding it; the evaluation's
bits/byte from a full forward per document (docs/design.md, BPE baseline).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
from pathlib import Path

import pytest
import torch

from aunet.flops import flops_per_byte, flops_per_token, num_params
from pipelines.plan import plan_training
from pipelines.spec import ExperimentSpec, SpecError

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "experiments" / "data" / "quickstart.jsonl.gz"
HELD_OUT = ROOT / "experiments" / "data" / "quickstart_val.jsonl.gz"
VOCAB = 320  # 256 bytes + 61 merges + BOS/EOS/PAD: trains in well under a second
STEPS, BATCH, T = 4, 4, 32


def _raw(root: Path, **train) -> dict:
    return {
        "name": "tbpe",
        "data": {
            "sources": [{"path": str(CORPUS), "lang_field": "lang"}],
            "seq_len": T,
            "val_fraction": 0.25,
            "max_documents": 24,
            "dataset_dir": str(root / "dataset"),
        },
        "tokenizer": {"vocab_size": VOCAB},
        "model": {"dimensions": [32], "layers": [1], "head_dims": [16], "strategy": {}},
        "train": {
            "steps": STEPS,
            "batch_size": BATCH,
            "lr": 3e-3,
            "warmup": 1,
            "eval_every": 2,
            "eval_batches": 2,
            "checkpoint_every": 2,
            "log_every": 1,
            "seed": 3,
            **train,
        },
        "tracking": {
            "tracking_uri": f"sqlite:///{root}/mlruns.db",
            "experiment": "tbpe",
            "artifact_location": str(root / "artifacts"),
            "system_metrics_s": None,
        },
        "resources": {"num_workers": 1, "storage_path": str(root / "runs"), "max_failures": 0},
    }


def _manifest(vocab: int = VOCAB, bpt: float = 2.5) -> dict:
    """The manifest keys planning reads (docs/data.md, Token-id datasets)."""
    tok = {"file": "tokenizer.json", "sha256": "0" * 64, "vocab_size": vocab}
    tok.update(bos_id=vocab - 3, eos_id=vocab - 2, pad_id=vocab - 1, pattern="gpt2")
    return {"tokenizer": tok, "bytes_per_token": {"all": bpt, "en": bpt + 1}}


# ------------------------------------------------------------------ no Ray
def test_plan_puts_a_token_model_on_the_byte_axis(tmp_path):
    spec = ExperimentSpec.from_dict(_raw(tmp_path), cwd=str(tmp_path))
    plan = plan_training(spec, _manifest())
    cfg = spec.model.replace(vocab_size=VOCAB, bos_id=VOCAB - 3, eos_id=VOCAB - 2)
    assert plan.num_params == num_params(cfg) > num_params(spec.model)  # the tokenizer's vocab
    assert plan.flops_per_byte == pytest.approx(flops_per_token(cfg, T) / 2.5, rel=1e-12)
    assert plan.flops_per_byte == flops_per_byte(cfg, T, bytes_per_token=2.5)
    assert plan.bytes_per_token == 2.5 and plan.bytes_per_step == BATCH * T * 2.5
    assert plan.total_flops == pytest.approx(plan.flops_per_byte * BATCH * T * 2.5 * STEPS)
    # a FLOP budget buys the steps whose bytes cost it: the nearest whole step
    budget = plan.flops_per_step * 10.4
    by_budget = plan_training(
        spec.with_overrides({"train.steps": None, "train.flop_budget": budget}), _manifest()
    )
    assert by_budget.steps == 10
    # the batch-size law counts bytes: sequences of T tokens hold T x bytes/token bytes
    law = spec.with_overrides(
        {"train.batch_size": None, "train.steps": None, "train.flop_budget": 1e12}
    )
    want = max(1, round(0.66 * 1e12**0.321 / (T * 2.5)))
    assert plan_training(law, _manifest()).batch_size == want


def test_a_vocabulary_other_than_the_datasets_is_one_clear_error(tmp_path):
    spec = ExperimentSpec.from_dict(_raw(tmp_path), cwd=str(tmp_path))
    same = spec.with_overrides({"model.vocab_size": VOCAB, "model.bos_id": 300})
    assert (
        plan_training(same, _manifest()).num_params == plan_training(spec, _manifest()).num_params
    )
    other = spec.with_overrides({"model.vocab_size": 500})
    with pytest.raises(
        SpecError, match=r"model.vocab_size: 500, but the dataset's tokenizer has 320"
    ):
        plan_training(other, _manifest())
    raw = _raw(tmp_path)
    raw.pop("tokenizer")
    raw["model"]["vocab_size"] = 500
    with pytest.raises(SpecError, match=r"model.vocab_size: 500, but the dataset is bytes"):
        plan_training(ExperimentSpec.from_dict(raw, cwd=str(tmp_path)), {"splits": {}})
    bad = _manifest()
    del bad["bytes_per_token"]
    with pytest.raises(SpecError, match="bytes_per_token"):
        plan_training(spec, bad)


# ------------------------------------------------------------------ real Ray Train
@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module (with the dashboard, as tests/test_train.py explains)."""
    import ray

    from pipelines.runtime import init_ray
    from pipelines.spec import ResourcesConfig

    init_ray(ResourcesConfig(), num_cpus=2, include_dashboard=True)
    yield
    ray.shutdown()


EVAL_YAML = """
name: tbpe-suite
context: 4096      # every document in one window: the naive reference is a full forward
tasks:
  val: {kind: bpb, path: held_out.jsonl.gz, group_field: lang}
"""


@pytest.fixture(scope="module")
def bpe_run(ray_session, tmp_path_factory):
    """A 4-step run on a token-id dataset, an eval suite on short held-out documents at the end."""
    from pipelines.train import train

    root = tmp_path_factory.mktemp("bpe")
    docs = _jsonl(HELD_OUT)
    short = [
        {"text": d["text"][:300], "lang": d["lang"]} for d in docs if d["lang"] in ("en", "ru")
    ]
    with gzip.open(root / "held_out.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(d) + "\n" for d in short[:4])
    (root / "eval.yaml").write_text(EVAL_YAML)
    raw = _raw(root, eval_suite=str(root / "eval.yaml"))
    spec = ExperimentSpec.from_dict(raw, cwd=str(root))
    out = io.StringIO()
    with _chdir(root), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        result = train(spec, run_name="bpe")  # the eval YAML's paths are the driver's
    return spec, root, result


def _jsonl(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(x) for x in f]


def _tokenizer(root: Path):
    from pipelines.data import manifest_tokenizer

    return manifest_tokenizer(root / "dataset")


@pytest.mark.slow  # the first user of bpe_run: a preprocessing run and a Train fit (~35 s)
def test_run_logs_the_byte_axis(bpe_run):
    from mlflow.tracking import MlflowClient

    from pipelines.data import read_manifest

    spec, root, result = bpe_run
    manifest = read_manifest(root / "dataset")
    bpt = manifest["bytes_per_token"]["all"]
    tok = _tokenizer(root)
    cfg = spec.model.replace(vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)
    client = MlflowClient(f"sqlite:///{root}/mlruns.db")
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert int(p["plan.num_params"]) == num_params(cfg)
    fpb = flops_per_token(cfg, T) / bpt
    assert float(p["plan.flops_per_byte"]) == pytest.approx(fpb, rel=1e-9)

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    seen, val_seen, val_flops = (
        history("train/bytes_seen"),
        history("val/bytes_seen"),
        history("val/flops"),
    )
    assert sorted(seen) == list(range(1, STEPS + 1)) and sorted(val_seen) == [2, 4]
    for step in range(1, STEPS + 1):  # tokens seen x the training split's bytes per token
        assert seen[step] == pytest.approx(step * BATCH * T * bpt, rel=1e-9)
    for step in (2, 4):
        assert val_seen[step] == pytest.approx(seen[step], rel=1e-12)
        assert val_flops[step] == pytest.approx(fpb * step * BATCH * T * bpt, rel=1e-9)
    ce = history("train/loss")  # lambda_level 0: the loss is the token cross-entropy
    train_bpb = history("train/bits_per_byte")
    assert train_bpb[STEPS] == pytest.approx(ce[STEPS] / math.log(2) / bpt, rel=1e-6)
    assert "eval/val/bits_per_byte" in run.data.metrics  # the suite ran through the tokenizer
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"tokenizer", "final", "dataset"} <= top
    logged = client.download_artifacts(run.info.run_id, "tokenizer/tokenizer.json", str(root))
    assert Path(logged).read_bytes() == (root / "dataset" / "tokenizer.json").read_bytes()


def test_logged_val_bpb_equals_a_float64_recomputation(bpe_run):
    """The final val bits/byte: summed target NLL over the bytes the targets spell, recomputed
    from the checkpoint on the same batches in float64, each target's bytes by decoding it."""
    from aunet.checkpoint import load_pretrained
    from pipelines.data import val_batches

    spec, root, result = bpe_run
    tok = _tokenizer(root)
    model = load_pretrained(result.final_checkpoint).double().eval()
    nats = nbytes = 0.0
    with torch.no_grad():
        for b in val_batches(root / "dataset", BATCH, max_batches=spec.train.eval_batches):
            logp = torch.log_softmax(model(b.tokens, b.levels).double(), dim=-1)
            for row, targets in enumerate(b.targets.tolist()):
                for pos, target in enumerate(targets):
                    nats -= float(logp[row, pos, target])
                    nbytes += len(tok.decode([target]))
    assert nbytes > 0 and nbytes != spec.train.eval_batches * BATCH * T  # bytes, not tokens
    assert result.val_bits_per_byte == pytest.approx(nats / nbytes / math.log(2), rel=1e-5)


def test_checkpoint_holds_the_verified_tokenizer(bpe_run):
    from aunet.api import AUModel
    from aunet.checkpoint import load_tokenizer
    from pipelines.data import read_manifest

    spec, root, result = bpe_run
    final = Path(result.final_checkpoint)
    sha = read_manifest(root / "dataset")["tokenizer"]["sha256"]
    assert load_tokenizer(final).sha256 == sha == _tokenizer(root).sha256
    model = AUModel.from_pretrained(final)
    assert model.tokenizer.sha256 == sha and model.config.vocab_size == model.tokenizer.vocab_size


def _naive_nats(model, tok, data: bytes) -> float:
    """NLL (nats, float64) of ``data``'s tokens after BOS: one full forward, no windows."""
    ids = [tok.bos_id, *tok.encode(data).tolist()]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.zeros(1, len(ids), dtype=torch.long))
    logp = torch.log_softmax(logits.double(), -1)
    return -sum(float(logp[0, i, ids[i + 1]]) for i in range(len(ids) - 1))


def test_evaluate_bpb_equals_a_naive_per_document_computation(bpe_run, tmp_path):
    """``python -m pipelines.evaluate`` on the checkpoint: per document, a full forward over
    [BOS] + its tokens, the NLL of its tokens in float64 over its bytes; per language too."""
    from aunet.checkpoint import load_pretrained
    from pipelines.evaluate import main

    spec, root, result = bpe_run
    tok = _tokenizer(root)
    out = tmp_path / "metrics.json"
    argv = [result.final_checkpoint, str(root / "eval.yaml"), "--no-mlflow", "--output", str(out)]
    with _chdir(root):  # the eval YAML's relative path is the caller's
        assert main(argv) == 0
    metrics = json.loads(out.read_text())["metrics"]
    model = load_pretrained(result.final_checkpoint).double().eval()
    per: dict[str, list[float]] = {}
    for doc in _jsonl(root / "held_out.jsonl.gz"):
        data = doc["text"].encode()
        nats = _naive_nats(model, tok, data)
        per.setdefault(doc["lang"], [0.0, 0.0])
        per[doc["lang"]][0] += nats
        per[doc["lang"]][1] += len(data)
    total = [sum(v[0] for v in per.values()), sum(v[1] for v in per.values())]
    assert metrics["eval/val/bits_per_byte"] == pytest.approx(
        total[0] / total[1] / math.log(2), rel=1e-5
    )
    for lang, (nats, nbytes) in per.items():
        got = metrics[f"eval/val/{lang}/bits_per_byte"]
        assert got == pytest.approx(nats / nbytes / math.log(2), rel=1e-5), lang


@contextlib.contextmanager
def _chdir(path: Path):  # contextlib.chdir is Python >= 3.11; the project supports 3.10
    import os

    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def test_mismatched_vocab_fails_in_one_line_with_exit_2(bpe_run, capsys):
    """The same spec with another model vocabulary than its (built) dataset's tokenizer."""
    import yaml

    from pipelines.train import main

    spec, root, _ = bpe_run
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    assert main([str(path), "model.vocab_size=500", "train.eval_suite=null"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "model.vocab_size: 500" in err[0] and "320" in err[0], err


def test_lm_eval_adapter_scores_a_bpe_checkpoint_in_bytes(bpe_run):
    """The ``aunet`` lm-eval model on the BPE checkpoint: rolling log-likelihoods are the naive
    per-document token NLL, continuations the project's junction-rule scores (tokenizer given)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from aunet.checkpoint import load_pretrained
    from aunet.evaluation import score_continuations
    from pipelines.lm_eval_model import AUNetLM

    spec, root, result = bpe_run
    tok = _tokenizer(root)
    lm = AUNetLM(result.final_checkpoint, max_length=4096, batch_size=2)
    assert lm.tokenizer.sha256 == tok.sha256
    texts = [d["text"] for d in _jsonl(root / "held_out.jsonl.gz")]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    model = load_pretrained(result.final_checkpoint).double().eval()
    for got, text in zip(lm.loglikelihood_rolling(rolling), texts):
        assert got == pytest.approx(-_naive_nats(model, tok, text.encode()), rel=1e-5)
    pairs = [("The quick brown", " fox"), ("Im Anfang", " war das Wort")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    want = score_continuations(
        lm.aumodel.model, [(c.encode(), x.encode()) for c, x in pairs], 2, 4096, tokenizer=tok
    )
    assert lm.loglikelihood(reqs) == [(w.loglik, w.greedy) for w in want]


def test_a_scaling_study_sizes_the_bpe_curve_on_the_byte_axis(bpe_run, tmp_path):
    """``scaling plan`` with a BPE variant: widths from the data-to-model rule at FLOPs per byte
    (per token / bytes per token), batch law in bytes, steps from the budget; without the
    variant's dataset the plan says to build it."""
    import yaml

    from aunet.flops import batch_size_bytes, compute_optimal
    from pipelines import scaling
    from pipelines.data import read_manifest

    spec, root, _ = bpe_run
    raw = _raw(root)
    raw["train"] = {"eval_batches": 1, "log_every": 1}
    raw["model"]["multiple_of"] = 16
    raw["study"] = {"name": "tiny", "budgets": [1e10, 1e11], "bytes_per_param": 20}
    raw["study"]["variants"] = {"bpe": {}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    study_spec, study = scaling.load_study(path)
    bpt = read_manifest(root / "dataset")["bytes_per_token"]["all"]
    tok = _tokenizer(root)
    template = study_spec.model.replace(
        vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id
    )
    cells = scaling.plan_cells(study_spec, study)
    assert [c.label for c in cells] == ["bpe@1e+10", "bpe@1e+11"]
    for c in cells:
        want = compute_optimal(template, c.budget, T, bytes_per_param=20, bytes_per_token=bpt)
        assert c.overrides["model.dimensions"] == list(want["config"].dimensions)
        assert c.batch_size == max(1, round(batch_size_bytes(c.budget) / (T * bpt)))
        fpb = flops_per_token(want["config"], T) / bpt
        assert c.steps == round(c.budget / (fpb * T * bpt * c.batch_size))
        assert c.batch_bytes == pytest.approx(c.batch_size * T * bpt)
    elsewhere = str(tmp_path / "nothing")
    missing = scaling.load_study(path, [f"data.dataset_dir={elsewhere}"])
    with pytest.raises(SpecError, match="study.variants.bpe: a tokenizer variant is sized"):
        scaling.plan_cells(*missing)
