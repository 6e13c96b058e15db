"""The evaluation pipeline: format loaders, generated tasks, and metrics logged to MLflow runs."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from reference import tiny_aunet

from aunet.checkpoint import save_pretrained
from aunet.evaluation import ChoiceItem, aggregate, score_choices, score_texts
from aunet.model import AUNet
from pipelines import evaluate as ev
from pipelines.eval_config import load_eval_config
from pipelines.eval_tasks import (
    PartialItem,
    TaskDataError,
    build_word_list,
    load_choice_items,
    make_cloze,
    parse_record,
    read_texts,
    read_words,
)
from pipelines.spec import SpecError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "experiments" / "eval" / "data"
VAL = ROOT / "experiments" / "data" / "quickstart_val.jsonl.gz"


# ---------------------------------------------------------------------------------- loaders
def test_sample_files_parse_to_lm_eval_prompts():
    hs = load_choice_items("hellaswag", str(DATA / "hellaswag_sample.jsonl"))
    assert hs[0] == ChoiceItem(
        "Making tea: A man fills a kettle with water and sets it on the stove. He",
        (
            " waits for the water to boil, then pours it over a tea bag in a mug.",
            " throws the kettle out of the window and starts to sing.",
            " paints the kettle blue with a small brush.",
            " puts the stove in the fridge and closes the door.",
        ),
        0,
    )
    # [title] becomes ". ", other [tags] vanish, the empty ctx_b leaves no trailing text
    assert (
        hs[2].context
        == "Home and Garden: How to water a houseplant. Check the soil with your finger."
    )
    # lm-eval's quirk, kept: a removed leading "[step]" leaves a space before the delimiter's
    assert hs[2].choices[2].startswith("  If the top inch") and hs[2].gold == 2
    assert [it.gold for it in hs] == [0, 1, 2, 3, 0]

    arc = load_choice_items("arc", str(DATA / "arc_easy_sample.jsonl"))
    assert arc[1] == ChoiceItem(
        "Question: What happens to liquid water when it is cooled below its freezing point?\n"
        "Answer:",
        (" It turns into a gas.", " It becomes ice.", " It glows.", " It disappears."),
        1,
    )
    assert arc[2].gold == 2 and len(arc[2].choices) == 3  # numeric labels "1".."3"

    piqa = load_choice_items("piqa", str(DATA / "piqa_sample.jsonl"), limit=2)
    assert len(piqa) == 2 and piqa[1] == ChoiceItem(
        "Question: To loosen a tight jar lid,\nAnswer:",
        (
            " put the jar in the freezer overnight with the lid facing up.",
            " run the lid under hot water for a minute, then twist.",
        ),
        1,
    )
    common = load_choice_items("common", str(DATA / "common_sample.jsonl"))
    assert common[0] == ChoiceItem(
        "The capital of France is", (" Paris.", " a river.", " blue."), 0
    )


def test_hub_style_records_parse():
    hub_arc = {
        "question": "Why?",
        "choices": {"text": ["a", "b"], "label": ["A", "B"]},
        "answerKey": "B",
    }
    assert parse_record(hub_arc, "arc", "x") == ChoiceItem(
        "Question: Why?\nAnswer:", (" a", " b"), 1
    )
    obqa = {
        "question_stem": "Sun is a",
        "choices": {"text": ["star", "moon"], "label": ["A", "B"]},
        "answerKey": "A",
    }
    assert parse_record(obqa, "openbookqa", "x") == ChoiceItem("Sun is a", (" star", " moon"), 0)
    boolq = {"passage": "P.", "question": "is it", "label": 1}
    assert parse_record(boolq, "boolq", "x") == ChoiceItem(
        "P.\nQuestion: is it?\nAnswer:", (" no", " yes"), 1
    )
    assert parse_record({"passage": "P.", "question": "q", "answer": False}, "boolq", "x").gold == 0
    siqa = {
        "context": "C.",
        "question": "Q?",
        "answerA": "a",
        "answerB": "b",
        "answerC": "c",
        "label": "3",
    }
    assert parse_record(siqa, "siqa", "x") == ChoiceItem("Q: C. Q?\nA:", (" a", " b", " c"), 2)
    copa = {
        "premise": "The glass fell.",
        "choice1": "It broke.",
        "choice2": "It sang.",
        "question": "effect",
        "label": 0,
    }
    assert parse_record(copa, "copa", "x") == ChoiceItem(
        "The glass fell therefore", (" it broke.", " it sang."), 0
    )
    csqa = {
        "question": " Where? ",
        "choices": {"label": ["A", "B"], "text": ["here", "there"]},
        "answerKey": "B",
    }
    assert parse_record(csqa, "commonsense_qa", "x") == ChoiceItem(
        "Question: Where?\nA. here\nB. there\nAnswer:", (" A", " B"), 1
    )
    race = {
        "article": "Art.",
        "problems": str(
            [
                {"question": "Q1?", "options": ["x", "y", "z", "w"], "answer": "B"},
                {
                    "question": "He went to the  _  .",
                    "options": ["a", "b", "c", "d"],
                    "answer": "A",
                },
                {"question": "Q3?", "options": ["1", "2", "3", "4"], "answer": "D"},
            ]
        ),
    }
    assert parse_record(race, "race", "x") == ChoiceItem(
        "Article: Art.\n\nQuestion: Q1?\nAnswer: y\n _  .a\nQ3?", (" 1", " 2", " 3", " 4"), 3
    )
    wino = {
        "sentence": "The cup fell off the table because _ was wobbly.",
        "option1": "the cup",
        "option2": "the table",
        "answer": "2",
    }
    assert parse_record(wino, "winogrande", "x") == PartialItem(
        (
            "The cup fell off the table because the cup",
            "The cup fell off the table because the table",
        ),
        " was wobbly.",
        1,
    )


def test_bad_records_name_the_file_line_and_key(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(
        '{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{"goal": "g", "sol1": "a"}\n'
    )
    with pytest.raises(TaskDataError, match=r"bad.jsonl: line 2: piqa record: missing key 'sol2'"):
        load_choice_items("piqa", str(p))
    p.write_text('{"context": "c", "choices": ["a", "b"], "gold": 2}\n')
    with pytest.raises(TaskDataError, match=r"line 1: common record: gold index 2 not in \[0, 2\)"):
        load_choice_items("common", str(p))
    with pytest.raises(TaskDataError, match=r"arc record: answerKey: answer 'C' is not among"):
        parse_record(
            {"question": {"stem": "s", "choices": [{"text": "t", "label": "A"}]}, "answerKey": "C"},
            "arc",
            "f: line 1",
        )


def test_hub_without_datasets_fails_clearly():
    try:
        import datasets  # noqa: F401

        pytest.skip("datasets is installed: the hub path is not testable offline")
    except ImportError:
        pass
    with pytest.raises(TaskDataError, match=r"hub:Rowan/hellaswag.*pip install datasets"):
        load_choice_items("hellaswag", hub=("Rowan/hellaswag", None, "validation"))


# ---------------------------------------------------------------------------------- generated
def test_cloze_is_reproducible_and_true_to_the_documents():
    docs = read_texts(str(VAL))
    a = make_cloze(docs, 5, num_choices=4, seed=3)
    assert a == make_cloze(docs, 5, num_choices=4, seed=3)
    assert a != make_cloze(docs, 5, num_choices=4, seed=4)
    langs = sorted({g for _, g in docs})
    assert sorted({g for g, _ in a}) == langs and len(a) == 5 * len(langs)
    for lang, it in a:
        same = [t for t, g in docs if g == lang]
        gold = it.choices[it.gold]
        home = [t for t in same if it.context + gold + "\n" in t + "\n"]
        assert len(home) == 1, "context + gold must continue one document to its line end"
        assert len(set(it.choices)) == 4
        for k, ch in enumerate(it.choices):
            if k != it.gold:
                assert any(ch in t for t in same if t is not home[0])
    assert {it.gold for _, it in a} == {0, 1, 2, 3}


def test_shipped_word_list_is_the_corpus_derivation():
    words = read_words(str(DATA / "words.txt"))
    assert words == build_word_list(str(ROOT / "experiments/data/quickstart.jsonl.gz"), "en", 1000)
    assert words[:3] == ["the", "and", "that"] and all(3 <= len(w) <= 10 for w in words)


def test_config_errors_name_the_key(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text(yaml.safe_dump({"name": "e", "tasks": {"t": {"kind": "choice", "pth": "x"}}}))
    with pytest.raises(SpecError, match=r"e.yaml: tasks.t.pth: unknown key"):
        load_eval_config(p)
    p.write_text(yaml.safe_dump({"name": "e", "tasks": {"t": {"kind": "choice"}}}))
    with pytest.raises(SpecError, match=r"e.yaml: tasks.t.path: a choice task needs exactly one"):
        load_eval_config(p)
    p.write_text(yaml.safe_dump({"name": "e", "tasks": {"t": {"kind": "char", "path": "w"}}}))
    with pytest.raises(SpecError, match=r"tasks.t.n: expected int >= 1, got 0"):
        load_eval_config(p, ["tasks.t.n=0"])
    for shipped in ("quickstart.yaml", "paper.yaml"):
        assert load_eval_config(ROOT / "experiments" / "eval" / shipped).tasks


# ---------------------------------------------------------------------------------- pipeline
DOCS = [
    ("The quick brown fox jumps over the lazy dog near the river bank today.\n" * 3, "en"),
    ("Der schnelle braune Fuchs springt über den faulen Hund am Fluss heute.\n" * 2, "de"),
    ("A second English document with a rather different line of prose in it.\n", "en"),
    ("Ein zweites deutsches Dokument mit einer ganz anderen Zeile Prosa darin.\n", "de"),
]


def tiny_model() -> AUNet:
    return tiny_aunet(24)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with gzip.open(tmp_path / "val.jsonl.gz", "wt") as f:
        for text, lang in DOCS:
            f.write(json.dumps({"text": text, "lang": lang}) + "\n")
    cfg = {
        "name": "t",
        "stride": 16,
        "batch_size": 4,
        "tracking": {"tracking_uri": "sqlite:///ml.db", "experiment": "evals"},
        "tasks": {
            "val": {"kind": "bpb", "path": "val.jsonl.gz"},
            "cloze": {"kind": "cloze", "path": "val.jsonl.gz", "n": 2, "num_choices": 2},
            "piqa": {"kind": "choice", "format": "piqa", "path": str(DATA / "piqa_sample.jsonl")},
            "char": {
                "kind": "char",
                "path": str(DATA / "words.txt"),
                "n": 2,
                "tasks": ["spell", "count"],
            },
        },
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    model = tiny_model()
    return tmp_path, model


def _metrics(uri: str, run_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    keys = client.get_run(run_id).data.metrics
    return {k: client.get_metric_history(run_id, k)[-1] for k in keys}


def test_pipeline_logs_metrics_equal_to_the_library(setup):
    from mlflow.tracking import MlflowClient

    tmp, model = setup
    save_pretrained(model, tmp / "ckpt", metadata={"plan": {"seq_len": 64}, "step": 7})
    assert ev.main([str(tmp / "ckpt"), "eval.yaml", "--output", "out.json"]) == 0
    uri = f"sqlite:///{tmp}/ml.db"
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("evals").experiment_id])
    got = _metrics(uri, run.info.run_id)
    assert json.loads((tmp / "out.json").read_text())["metrics"].keys() == set(got)
    texts = [t.encode() for t, _ in DOCS]
    assert any(len(t) + 1 > 64 for t in texts)  # sliding windows are exercised
    scores = score_texts(model, texts, context=64, stride=16, batch_size=3)
    assert math.isclose(
        got["eval/val/bits_per_byte"].value, aggregate(scores).bits_per_byte, rel_tol=1e-6
    )
    for lang in ("en", "de"):
        ref = aggregate(s for s, (_, g) in zip(scores, DOCS) if g == lang).bits_per_byte
        assert math.isclose(got[f"eval/val/{lang}/bits_per_byte"].value, ref, rel_tol=1e-6)
    assert got["eval/val/bits_per_byte"].step == 7
    piqa = load_choice_items("piqa", str(DATA / "piqa_sample.jsonl"))
    res = score_choices(model, piqa, max_len=64)
    assert got["eval/piqa/acc"].value == res.accuracy
    assert got["eval/piqa/acc_norm"].value == res.accuracy_norm
    expected = {
        "eval/cloze/acc",
        "eval/cloze/en/acc_norm",
        "eval/cloze/de/acc",
        "eval/char/spell/exact_match",
        "eval/char/count/exact_match",
        "eval/char/exact_match",
        "eval/val/time_s",
    }
    assert expected <= set(got)
    assert run.data.params["context"] == "64" and run.info.status == "FINISHED"


def test_pipeline_logs_into_the_training_run(setup):
    from mlflow.tracking import MlflowClient

    tmp, model = setup
    uri = f"sqlite:///{tmp}/ml.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("train", artifact_location=(tmp / "art").as_uri())
    run_dir = tmp / "outputs" / "qs"
    train_run = client.create_run(exp, tags={"aunet.run_key": str(run_dir)}).info.run_id
    client.set_terminated(train_run, "FINISHED")
    save_pretrained(model, run_dir / "final", metadata={"plan": {"seq_len": 64}, "step": 30})
    args = ["--tasks", "val", "--set", "tasks.val.limit=2"]
    assert ev.main([str(run_dir / "final"), "eval.yaml", *args]) == 0  # found by aunet.run_key
    got = _metrics(uri, train_run)
    assert set(got) == {
        "eval/val/bits_per_byte",
        "eval/val/en/bits_per_byte",
        "eval/val/de/bits_per_byte",
        "eval/val/time_s",
    }
    assert got["eval/val/bits_per_byte"].step == 30
    assert client.get_run(train_run).info.status == "FINISHED"
    assert client.get_run(train_run).data.tags["eval.t.context"] == "64"

    client.log_artifacts(train_run, str(run_dir / "final"), "final")
    for source in (f"runs:/{train_run}/final", train_run):  # MLflow sources log there too
        assert ev.main([source, "eval.yaml", "--tasks", "piqa", "--set", "context=48"]) == 0
    piqa = _metrics(uri, train_run)["eval/piqa/acc"]
    assert piqa.step == 30
    ref = score_choices(
        model, load_choice_items("piqa", str(DATA / "piqa_sample.jsonl")), max_len=48
    )
    assert piqa.value == ref.accuracy
    assert len(client.search_runs([exp])) == 1 and client.get_experiment_by_name("evals") is None


def test_evaluate_function_keeps_mode_and_needs_a_context(setup):
    tmp, model = setup
    cfg = load_eval_config(tmp / "eval.yaml")
    model.train()
    out = ev.evaluate(model, cfg, context=64, tasks=["val", "piqa"])
    assert model.training and "eval/piqa/acc_norm" in out and "eval/cloze/acc" not in out
    with pytest.raises(SpecError, match="context"):
        ev.evaluate(model, cfg, tasks=["val"])
    with pytest.raises(SpecError, match="no task 'nope'"):
        ev.evaluate(model, cfg, context=64, tasks=["nope"])
    assert ev.main([str(tmp / "missing"), "eval.yaml", "--no-mlflow"]) == 2


def test_end_of_training_suite_runs_on_the_final_weights(setup):
    """train.eval_suite: made absolute at spec load; the worker's hook scores the final weights."""
    from pipelines.spec import ExperimentSpec
    from pipelines.train import eval_suite_for
    from pipelines.train_worker import _suite_eval

    tmp_path, model = setup
    raw = {
        "name": "t",
        "data": {"sources": "val.jsonl.gz", "seq_len": 64},
        "model": model.config.to_dict(),
        "train": {"steps": 1, "eval_suite": "eval.yaml"},
        "tracking": {"tracking_uri": "sqlite:///ml.db"},
    }
    spec = ExperimentSpec.from_dict(raw, source="test")
    assert spec.train.eval_suite == str(tmp_path / "eval.yaml")
    suite = eval_suite_for(spec)
    got = _suite_eval(suite, spec, model.state_dict(), torch.device("cpu"), rank=0)
    assert _suite_eval(suite, spec, model.state_dict(), torch.device("cpu"), rank=1) == {}
    expected = ev.evaluate(model, str(tmp_path / "eval.yaml"), context=64)

    def scores(m: dict) -> dict:
        return {k: v for k, v in m.items() if not k.endswith("time_s")}

    assert scores(got) == scores(expected) and "eval/val/bits_per_byte" in got
    raw["train"] = {"steps": 1, "eval_suite_every": 5}
    with pytest.raises(SpecError, match=r"train\.eval_suite_every: set train\.eval_suite"):
        ExperimentSpec.from_dict(raw, source="test")
