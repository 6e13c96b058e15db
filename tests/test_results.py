"""A sweep's results table: ranking, CSV round trip, the table read from trial records."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from pipelines import results


def _row(variant: str, bpb: float | None, status: str = "finished", **kw) -> dict:
    return {
        "variant": variant,
        "trial": f"t_{variant}",
        "val_bits_per_byte": bpb,
        "status": status,
        "flops": 1e9,
        "flops_vs_budget": kw.pop("dev", None),
        "params": json.dumps({"s": variant}),
        "num_params": None,
        "steps": 10,
        "batch_size": 4,
        "attempts": 1,
        "wall_s": 1.5,
        "mlflow_run_id": None,
        **kw,
    }


def test_rank_orders_finished_trials_and_leaves_the_rest_unranked():
    rows = [_row("a", 1.3), _row("b", 1.1), _row("c", None, "error"), _row("d", 1.2)]
    ranked = results.rank(rows)
    assert [(r["variant"], r["rank"]) for r in ranked] == [
        ("b", 1),
        ("d", 2),
        ("a", 3),
        ("c", None),
    ]
    best_first = results.rank([_row("a", 1.3), _row("b", 1.1)], mode="max")
    assert [r["variant"] for r in best_first] == ["a", "b"]
    assert results.best_row(ranked)["variant"] == "b"


def test_summary_metrics_are_the_hand_counted_values():
    rows = results.rank(
        [_row("a", 1.3, dev=0.01), _row("b", 1.1, dev=-0.015), _row("c", None, "error", dev=0.5)]
    )
    assert results.summary_metrics(rows) == {
        "trials_finished": 2.0,
        "trials_error": 1.0,
        "best_val_bits_per_byte": 1.1,
        "flops_max_deviation": 0.015,  # the failed trial's gap does not count
    }


def test_csv_round_trip_keeps_the_columns_as_text(tmp_path):
    rows = results.rank([_row("a", 1.25, num_params=1234, dev=0.02), _row("b", None, "error")])
    results.write_csv(rows, tmp_path / "r.csv")
    back = results.read_csv(tmp_path / "r.csv")
    assert list(back[0]) == [*results.COLUMNS, "params"]
    assert back[0]["rank"] == "1" and back[0]["val_bits_per_byte"] == "1.25"
    assert back[0]["num_params"] == "1234" and back[0]["flops_vs_budget"] == "0.02"
    assert back[1]["rank"] is None and back[1]["val_bits_per_byte"] is None
    assert back[1]["params"] == json.dumps({"s": "b"})
    # the table reads the same from the rows and from their CSV
    assert results.format_table(back) == results.format_table(rows)
    lines = results.format_table(rows).splitlines()
    assert lines[0].split()[:3] == ["rank", "variant", "trial"]
    assert lines[2].split() == [
        "1",
        "a",
        "t_a",
        "1,234",
        "10",
        "4",
        "1e+09",
        "+2.00%",
        "1.2500",
        "finished",
        "1",
        "1.5",
        '{"s":',
        '"a"}',
    ]


def test_collect_reads_trial_records_and_attempts(tmp_path):
    d = str(tmp_path)
    (tmp_path / "trials").mkdir()
    records = {
        "t1": {
            "variant": "k=1",
            "trial": "trial_1",
            "status": "finished",
            "flops": 1.02e9,
            "flop_budget": 1e9,
            "val_bits_per_byte": 2.5,
            "final_step": 40,
            "config": {"k": 1},
        },
        "t2": {
            "variant": "k=2",
            "trial": "trial_2",
            "status": "running",
            "flops": 9.9e8,
            "flop_budget": 1e9,
            "steps": 30,
            "config": {"k": 2},
        },
    }
    for trial_id, rec in records.items():
        results.write_json(results.trial_file(d, trial_id, ".json"), rec)
    results.trial_file(d, "t2", ".attempts").write_text("t0\nt1\n")
    rows = results.collect(d, None, None)
    assert [(r["variant"], r["rank"], r["attempts"], r["steps"]) for r in rows] == [
        ("k=1", 1, 0, 40),
        ("k=2", None, 2, 30),
    ]
    assert rows[0]["flops_vs_budget"] == pytest.approx(0.02)
    assert rows[1]["status"] == "running" and rows[1]["params"] == '{"k": 2}'
    tune = [SimpleNamespace(trial_id="t2", status="ERROR", last_result={}, config={"k": 2})]
    sweep = SimpleNamespace(mode="min", label=lambda c: f"k={c['k']}!")
    (row,) = results.collect(d, tune, sweep)
    assert row["status"] == "error" and row["variant"] == "k=2!"
    assert results.summary_rows(d) == rows  # a directory without results.csv


def test_rows_from_child_runs():
    def run(name: str, status: str, params: dict, metrics: dict) -> SimpleNamespace:
        info = SimpleNamespace(run_name=name, status=status)
        return SimpleNamespace(info=info, data=SimpleNamespace(params=params, metrics=metrics))

    runs = [
        run("t1", "RUNNING", {"sweep.variant": "k=1", "sweep.k": "1"}, {}),
        run(
            "t2",
            "FINISHED",
            {"sweep.variant": "k=2", "sweep.k": "2", "plan.total_flops": "1e9", "plan.steps": "5"},
            {"val/bits_per_byte": 2.0, "train/loss": 2.1},
        ),
        run("t3", "KILLED", {"sweep.variant": "k=3", "sweep.k": "3"}, {"val/bits_per_byte": 1.0}),
        # logged before the metric groups (issue 20): a one-point final/ metric
        run("t4", "FINISHED", {"sweep.variant": "k=4"}, {"final/val_bits_per_byte": 2.5}),
    ]
    rows = results.rows_from_runs(runs)
    assert [(r["variant"], r["rank"], r["status"]) for r in rows] == [
        ("k=2", 1, "finished"),
        ("k=4", 2, "finished"),
        ("k=1", None, "running"),
        ("k=3", None, "killed"),
    ]
    assert rows[0]["flops"] == 1e9 and rows[0]["params"] == '{"k": "2"}'
