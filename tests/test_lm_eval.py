"""The lm-evaluation-harness adapter: lm-eval's own evaluator, run on the shipped local tasks with
a tiny random AU-Net checkpoint, gives the project's own log-likelihoods, greedy bytes and
bits/byte, and acc / acc_norm equal to a naive recomputation (lm-eval's normalisation: characters
of the choice without the target delimiter)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import lm_eval
import pytest
import torch
import torch.nn.functional as F
import yaml
from lm_eval.tasks import TaskManager
from reference import tiny_aunet

import pipelines.lm_eval_model  # noqa: F401  (registers the "aunet" model)
from aunet.api import AUModel
from aunet.config import BOS_ID
from aunet.evaluation import (
    ChoiceItem,
    choice_length,
    encode_with_levels,
    score_choices,
    score_continuations,
    score_texts,
    splitter_for,
)
from aunet.model import AUNet
from pipelines.lm_eval_model import _cut_at_stops, flatten_results, run_tasks

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "experiments" / "eval" / "lm_eval"
MAX_LENGTH = 192  # no multiple-choice item is cut; the held-out documents need sliding windows
LIMIT = 4


def tiny_model() -> AUNet:
    return tiny_aunet(64)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """One lm-eval run of the three shipped tasks (a few documents each) through the registry
    name and a saved checkpoint, as the harness's command line does it."""
    ckpt = AUModel(tiny_model()).save_pretrained(tmp_path_factory.mktemp("lm_eval") / "ckpt")
    here = os.getcwd()
    os.chdir(ROOT)  # the task YAMLs' data_files are relative to the repository root
    try:
        results = lm_eval.simple_evaluate(
            model="aunet",
            model_args={"pretrained": str(ckpt), "max_length": MAX_LENGTH},
            tasks=["aunet_mc_sample", "aunet_gen_sample", "aunet_val_bpb"],
            task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
            batch_size=3,
            # the first items of the small tasks; the two shortest English/French documents
            samples={
                "aunet_mc_sample": list(range(LIMIT)),
                "aunet_gen_sample": list(range(LIMIT)),
                "aunet_val_bpb": [0, 13],
            },
            log_samples=True,
            bootstrap_iters=0,
        )
    finally:
        os.chdir(here)
    return AUModel.from_pretrained(ckpt), results


def naive_continuation(model: AUNet, ctx: str, cont: str) -> tuple[float, bool]:
    """float64 log-probability of each continuation byte, one position at a time; greedy: every
    byte is the argmax of its prediction with BOS left out (generation never emits BOS)."""
    toks, lvls = encode_with_levels((ctx + cont).encode(), splitter_for(model.config), 1)
    c0 = len(ctx.encode()) + 1  # index of the first continuation token
    total, greedy = 0.0, True
    with torch.no_grad():
        logits = model(torch.tensor([toks]), torch.tensor([lvls]))[0].double()
    for j in range(c0, len(toks)):
        logp = F.log_softmax(logits[j - 1], -1)
        total += float(logp[toks[j]])
        logp[BOS_ID] = -math.inf
        greedy &= int(logp.argmax()) == toks[j]
    return total, greedy


def test_loglikelihoods_equal_the_projects_own(harness):
    model, results = harness
    samples = results["samples"]["aunet_mc_sample"]
    assert len(samples) == LIMIT
    for s in samples:
        ctx = s["arguments"][0][0]
        conts = [cont for _, cont in s["arguments"]]
        assert [c.removeprefix(" ") for c in conts] == s["doc"]["choices"]  # lm-eval's delimiter
        got = [r[0] for r in s["resps"]]  # (loglik, is_greedy) per choice
        own = score_choices(model.model, [ChoiceItem(ctx, tuple(conts), s["doc"]["label"])])
        for (ll, greedy), ref, cont in zip(got, own.loglik[0], conts):
            assert abs(ll - ref) < 1e-5
            naive_ll, naive_greedy = naive_continuation(model.model, ctx, cont)
            assert abs(ll - naive_ll) < 1e-4 and greedy == naive_greedy


def test_acc_and_acc_norm_equal_a_naive_recomputation(harness):
    model, results = harness
    samples = results["samples"]["aunet_mc_sample"]
    accs, norms = [], []
    for s in samples:
        lls = [r[0][0] for r in s["resps"]]
        gold, choices = s["doc"]["label"], s["doc"]["choices"]
        pred = max(range(len(lls)), key=lambda i: lls[i])
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(choices[i]))  # no delimiter
        accs.append(float(pred == gold))
        norms.append(float(pred_norm == gold))
        assert s["acc"] == accs[-1] and s["acc_norm"] == norms[-1]
        # the project's acc_norm follows the same convention on the same items
        conts = tuple(c for _, c in s["arguments"])
        own = score_choices(model.model, [ChoiceItem(s["arguments"][0][0], conts, gold)])
        assert own.pred_norm == [pred_norm]
    row = results["results"]["aunet_mc_sample"]
    assert row["acc,none"] == pytest.approx(sum(accs) / len(accs))
    assert row["acc_norm,none"] == pytest.approx(sum(norms) / len(norms))


def test_generate_until_is_greedy_bytes_cut_at_until(harness):
    model, results = harness
    samples = results["samples"]["aunet_gen_sample"]
    hits = []
    for s in samples:
        ctx, kwargs = s["arguments"][0]
        assert kwargs["until"] == ["\n"] and kwargs["max_gen_toks"] == 16
        want = model.generate(ctx, max_new_bytes=16, temperature=0.0, stop=b"\n")
        assert s["resps"][0][0] == want.decode("utf-8", errors="replace")
        hits.append(float(s["filtered_resps"][0] == s["doc"]["answer"]))
        assert s["exact_match"] == hits[-1]
    assert results["results"]["aunet_gen_sample"]["exact_match,strip"] == sum(hits) / len(hits)


def test_rolling_loglikelihood_is_the_sliding_window_score(harness):
    model, results = harness
    samples = results["samples"]["aunet_val_bpb"]
    texts = [s["arguments"][0][0] for s in samples]
    assert all(len(t.encode()) + 1 > MAX_LENGTH for t in texts)  # windows are exercised
    scores = score_texts(model.model, [t.encode() for t in texts], MAX_LENGTH, batch_size=4)
    for s, ref in zip(samples, scores):
        assert abs(s["resps"][0][0] + ref.nats) < 1e-6 * ref.nats
    nats = sum(r.nats for r in scores)
    num_bytes = sum(len(t.encode()) for t in texts)
    bpb = results["results"]["aunet_val_bpb"]["bits_per_byte,none"]
    assert bpb == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-9)


def test_flattened_metric_names(harness):
    _, results = harness
    flat = flatten_results(results["results"])
    assert {
        "aunet_mc_sample/acc",
        "aunet_mc_sample/acc_norm",
        "aunet_gen_sample/exact_match/strip",
        "aunet_val_bpb/bits_per_byte",
    } <= set(flat)
    assert all(isinstance(v, float) for v in flat.values())


def test_a_greedy_continuation_is_greedy():
    """is_greedy is true exactly for the bytes greedy generation produces (a control: one byte
    changed is not greedy), with the context cut to fit as the adapter cuts it."""
    model = AUModel(tiny_model())
    ctx = b"Making tea: A man fills a kettle with water and"
    cont = model.generate(ctx, max_new_bytes=6, temperature=0.0)
    assert len(cont) == 6
    other = cont[:-1] + bytes([(cont[-1] + 1) % 256])
    full, changed = score_continuations(model.model, [(ctx, cont), (ctx, other)])
    assert full.greedy and not changed.greedy and full.num_bytes == 6
    # a longer context cut from the left to the same bytes scores the same
    (cut,) = score_continuations(model.model, [(b"x" * 100 + ctx, cont)], max_len=len(ctx) + 7)
    assert cut.greedy and abs(cut.loglik - full.loglik) < 1e-5
    with pytest.raises(ValueError, match="does not fit"):
        score_continuations(model.model, [(ctx, cont)], max_len=6)


def test_choice_length_excludes_only_the_delimiter():
    assert choice_length(" blue.") == 5 and choice_length("blue.") == 5
    assert choice_length("  two") == 4  # one delimiter, the second space is the choice's
    assert choice_length(" é") == 1  # characters, not bytes
    assert choice_length(" x", delimiter="") == 2


def test_cut_at_the_earliest_stop():
    assert _cut_at_stops(b"ab\ncd.ef", [b".", b"\n"]) == b"ab"
    assert _cut_at_stops(b"abc", [b"x"]) == b"abc"


def test_unknown_task_names_the_folder():
    with pytest.raises(ValueError, match="no lm-eval task 'nope'"):
        run_tasks(AUModel(tiny_model()), ["nope"], str(TASKS), max_length=64)


def test_evaluate_pipeline_logs_lm_eval_metrics_to_mlflow(tmp_path, monkeypatch):
    """``python -m pipelines.evaluate`` with a ``kind: lm_eval`` suite: the harness's metrics land
    in MLflow as eval/<suite>/<task>/<metric>, equal to a naive recomputation."""
    from mlflow.tracking import MlflowClient

    from pipelines import evaluate as ev

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(ROOT)
    model = AUModel(tiny_model())
    model.context = MAX_LENGTH
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    cfg = {
        "name": "h",
        "batch_size": 4,
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/ml.db", "experiment": "evals"},
        "tasks": {
            "harness": {
                "kind": "lm_eval",
                "path": str(TASKS),
                "lm_eval_tasks": ["aunet_mc_sample"],
                "limit": 3,
            }
        },
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    assert ev.main([str(ckpt), str(tmp_path / "eval.yaml")]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/ml.db")
    (run,) = client.search_runs([client.get_experiment_by_name("evals").experiment_id])
    got = run.data.metrics
    items = [json.loads(line) for line in (ROOT / "experiments/eval/data/lm_eval_mc.jsonl").open()]
    own = score_choices(
        model.model,
        [
            ChoiceItem(
                f"{r['topic']}: {r['question']}", tuple(" " + c for c in r["choices"]), r["label"]
            )
            for r in items[:3]
        ],
    )
    assert got["eval/harness/aunet_mc_sample/acc"] == pytest.approx(own.accuracy)
    assert got["eval/harness/aunet_mc_sample/acc_norm"] == pytest.approx(own.accuracy_norm)
    assert run.data.params["context"] == str(MAX_LENGTH)


def test_an_lm_eval_suite_needs_task_names(tmp_path):
    from pipelines.eval_config import load_eval_config
    from pipelines.spec import SpecError

    cfg = {"name": "h", "tasks": {"harness": {"kind": "lm_eval", "path": str(TASKS)}}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SpecError, match="lm_eval_tasks: an lm_eval suite needs"):
        load_eval_config(tmp_path / "eval.yaml")
