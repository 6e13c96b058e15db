"""Scaling-law fits against known laws, and the report's refusal to extrapolate bad fits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines import fitting as ft
from pipelines import report as rp
from pipelines import tables as tb

truth = {"E": 1.2, "A": 80.0, "alpha": 0.22}


def law(C, E=truth["E"], A=truth["A"], alpha=truth["alpha"]):
    return E + A * np.asarray(C, float) ** -alpha


@pytest.mark.parametrize("seed", [1, 7])
def test_fit_recovers_a_known_law_within_its_bootstrap_uncertainty(seed):
    rng = np.random.default_rng(seed)
    C = np.logspace(10, 14, 12)
    L = law(C) * np.exp(rng.normal(0.0, 0.01, C.size))  # 1% multiplicative noise
    fit = ft.fit_power_law(C, L, bootstrap=200, seed=0)
    assert fit.valid and fit.reason is None and fit.n_boot == 200
    assert (fit.C_min, fit.C_max, fit.n_points, fit.n_budgets) == (1e10, 1e14, 12, 12)
    assert fit.r2 > 0.98
    for k, v in truth.items():
        est, sd = getattr(fit, k), getattr(fit, f"{k}_sd")
        assert sd > 0
        assert abs(est - v) <= 3 * sd, (k, est, sd)
    # Absolute accuracy: the floor and the exponent are pinned down well by 4 decades.
    assert abs(fit.E - truth["E"]) < 0.05
    assert abs(fit.alpha - truth["alpha"]) < 0.04
    # Predictions agree with the true law within a few percent at 10x the largest C.
    pred = ft.prediction(fit, 10 * C.max())
    assert isinstance(pred, float)
    assert abs(pred / float(law(10 * C.max())) - 1) < 0.03


def test_noise_free_points_give_the_law_back_exactly():
    C = np.logspace(9, 13, 8)
    fit = ft.fit_power_law(C, law(C), bootstrap=20)
    got = {"E": fit.E, "A": fit.A, "alpha": fit.alpha}
    assert got == pytest.approx(truth, rel=1e-3)
    assert abs(fit.E - truth["E"]) < 1e-4 and abs(fit.alpha - truth["alpha"]) < 1e-5
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert float(fit.predict(1e15)) == pytest.approx(float(law(1e15)), rel=1e-5)


def test_two_budgets_refuse_to_fit_and_to_predict():
    C = np.array([1e10, 1e10, 1e11, 1e11])
    fit = ft.fit_power_law(C, law(C))
    assert not fit.valid and fit.reason == "2 budgets (< 3): no fit"
    assert math.isnan(fit.E)
    row = ft.fit_rows({"v": fit}, 1e11)[0]
    assert row["loss_at_10x"] == "n/a (2 budgets (< 3): no fit)"
    assert row["loss_at_100x"].startswith("n/a (")
    assert row["status"].startswith("no extrapolation")


def test_nominal_budgets_count_not_distinct_flops():
    """Runs of one budget land on slightly different FLOPs: they still count as one budget."""
    C = np.array([1.00e10, 1.01e10, 0.99e10, 2e11])
    fit = ft.fit_power_law(C, law(C), budgets=[1e10, 1e10, 1e10, 2e11])
    assert fit.n_budgets == 2 and not fit.valid


def test_min_budgets_setting_refuses_even_a_good_fit():
    C = np.logspace(10, 12, 3)
    fit = ft.fit_power_law(C, law(C), min_budgets=4, bootstrap=10)
    assert math.isfinite(fit.E) and not fit.valid
    assert fit.reason == "3 budgets (< 4)"
    assert any("3 points for 3 parameters" in n for n in fit.notes)


def test_low_r2_refuses_to_extrapolate():
    C = np.logspace(10, 13, 6)
    L = np.array([3.0, 2.2, 3.1, 2.1, 3.0, 2.2])  # no trend with compute
    fit = ft.fit_power_law(C, L, bootstrap=20, r2_threshold=0.9)
    assert fit.r2 < 0.9 and not fit.valid
    assert fit.reason == f"R^2 {fit.r2:.3f} < 0.9"
    assert ft.prediction(fit, 1e15) == f"n/a (R^2 {fit.r2:.3f} < 0.9)"


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="positive"):
        ft.fit_power_law([1e10, -1.0, 1e12], [2.0, 1.0, 1.0])


def _exact(E, A, alpha, C_max=1e12):
    return ft.PowerLawFit(5, 5, 1e9, C_max, E=E, A=A, alpha=alpha, r2=1.0, valid=True)


def test_crossover_of_two_laws_is_found_where_they_meet():
    # 1 + 10 C^-0.1 == 1 + 100 C^-0.2  <=>  C^0.1 = 10  <=>  C = 1e10.
    fits = {"a": _exact(1.0, 10.0, 0.1), "b": _exact(1.0, 100.0, 0.2)}
    (c,) = ft.crossovers(fits, 1e8, 1e14)
    assert c["C"] == pytest.approx(1e10, rel=1e-6)
    assert c["better_above"] == "b" and not c["extrapolated"]
    assert c["loss"] == pytest.approx(2.0, rel=1e-6)
    (late,) = ft.crossovers(
        {"a": _exact(1.0, 10.0, 0.1, 1e9), "b": _exact(1.0, 100.0, 0.2, 1e9)}, 1e8, 1e14
    )
    assert late["extrapolated"]  # beyond the largest compute either fit saw
    fits["b"].valid = False  # invalid fits take no part
    assert ft.crossovers(fits, 1e8, 1e14) == []


def test_compute_optimal_recovers_the_optimum_scaling():
    # Iso-FLOP profiles: loss = 2 + 0.1 (ln N - ln N*)^2 with N* = 0.05 C^0.5, D = C / (6 N).
    points = []
    for C in (1e12, 1e13, 1e14, 1e15):
        n_opt = 0.05 * C**0.5
        for f in (0.25, 0.5, 1.0, 2.0, 4.0):
            N = n_opt * f
            loss = 2 + 0.1 * math.log(f) ** 2
            points.append({"budget": C, "params": N, "bytes": C / (6 * N), "loss": loss})
    out = ft.compute_optimal(points)
    assert len(out["optima"]) == 4
    assert out["N_opt"]["b"] == pytest.approx(0.5, abs=1e-6)
    assert out["N_opt"]["k"] == pytest.approx(0.05, rel=1e-5)
    assert out["D_opt"]["b"] == pytest.approx(0.5, abs=1e-6)
    assert out["D_opt"]["k"] == pytest.approx(1 / (6 * 0.05), rel=1e-5)


def test_hyperparameter_refit_finds_the_best_lr_law_and_none_without_variation():
    points = []
    for C in (1e10, 1e11, 1e12):
        best = 5.0 * C**-0.2
        for f in (0.5, 1.0, 2.0):
            points.append(
                {"variant": "v", "budget": C, "lr": best * f, "loss": 2 + abs(math.log(f))}
            )
    out = ft.hyperparam_refit(points, "lr")
    assert out["fit"]["b"] == pytest.approx(-0.2, abs=1e-9)
    assert out["fit"]["k"] == pytest.approx(5.0, rel=1e-9)
    single = [p for p in points if p["lr"] == 5.0 * p["budget"] ** -0.2]
    assert ft.hyperparam_refit(single, "lr") is None


def test_html_report_is_self_contained_and_says_why_it_refuses(tmp_path):
    rng = np.random.default_rng(0)
    C = np.logspace(10, 12, 4)
    points = [
        {
            "variant": "good",
            "budget": c,
            "C": c,
            "loss": float(law(c)),
            "params": 1,
            "bytes": 1,
            "lr": 1e-3,
            "batch_bytes": 1,
            "run_id": "x",
        }
        for c in C
    ]
    points += [
        {
            "variant": "bad",
            "budget": c,
            "C": c,
            "loss": float(2 + rng.random()),
            "params": 1,
            "bytes": 1,
            "lr": 1e-3,
            "batch_bytes": 1,
            "run_id": "y",
        }
        for c in C[:2]
    ]
    fits = {
        v: ft.fit_power_law(
            [p["C"] for p in points if p["variant"] == v],
            [p["loss"] for p in points if p["variant"] == v],
            bootstrap=30,
        )
        for v in ("good", "bad")
    }
    rows = ft.fit_rows(fits, C.max())
    png = tmp_path / "loss.png"
    rp.plot_loss_vs_compute(points, fits, png, "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "loss.pdf").read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in (tmp_path / "loss.svg").read_bytes()[:2000]
    extra = {"compute_optimal": {}, "lr_refit": None, "batch_refit": None}
    tables = rp.report_tables(rows, points, extra, {"good": [1.0, 4.5], "bad": [1.0]})
    prov = tb.provenance(**{"spec file": "s.yaml", "dataset hash": {"abc", ""}})
    page = rp.render_html("t", prov, tables, [], {"Loss vs compute": png}, {"s": "x"})
    assert "data:image/png;base64," in page and 'src="http' not in page
    assert "UNVERIFIED" in page and "bytes per optimizer step" in page
    assert "n/a (2 budgets (&lt; 3): no fit)" in page
    assert "<th>spec file</th><td>s.yaml</td>" in page and "<td>abc</td>" in page
    assert "E (bits/byte)" in page and "stage 1 (bytes/token)" in page  # units in the headers
    text = ft.format_table(rows)
    assert "n/a (2 budgets (< 3): no fit)" in text
    ft.write_csv(rows, tmp_path / "fits.csv")
    assert (tmp_path / "fits.csv").read_text().splitlines()[0].startswith("variant,runs,budgets")
    tex = rp.render_latex("t", prov, tables)
    assert tex.count("\\begin{tabular}") == 4  # fits, vs baseline, runs, contraction (no optima)
    assert "% spec file: s.yaml" in tex and "\\toprule" in tex


def test_versus_baseline_is_the_hand_computed_difference_at_each_budget():
    pts = [
        {"variant": "baseline", "budget": 1e9, "loss": 2.0},
        {"variant": "baseline", "budget": 1e9, "loss": 1.9},  # the best run of a cell counts
        {"variant": "aunet2", "budget": 1e9, "loss": 1.71},
        {"variant": "aunet2", "budget": 1e10, "loss": 1.5},  # no baseline at 1e10: left out
        {"variant": "baseline", "budget": 1e8, "loss": 2.5},
        {"variant": "aunet2", "budget": 1e8, "loss": 2.75},
    ]
    assert ft.baseline_variant(["aunet2", "baseline"]) == "baseline"
    assert ft.baseline_variant(["a", "b"]) == "a"
    rows = ft.versus_baseline(ft.frontier_points(pts), "baseline")
    assert [(r["budget"], r["variant"]) for r in rows] == [(1e8, "aunet2"), (1e9, "aunet2")]
    assert rows[0]["delta"] == pytest.approx(0.25) and rows[0]["ratio"] == pytest.approx(0.1)
    assert rows[1]["delta"] == pytest.approx(-0.19) and rows[1]["ratio"] == pytest.approx(-0.1)


def test_tables_render_the_same_cells_as_text_html_and_latex():
    cols = [
        tb.Column("name", "name"),
        tb.Column("bpb", "val (bits/byte)", tb.fixed(3)),
        tb.Column("run", "run", link="url"),
    ]
    rows = [
        {"name": "a_b & 100%", "bpb": 1.23456, "run": "r1", "url": "http://h/#/r1"},
        {"name": "c", "bpb": float("nan"), "run": "r2"},
    ]
    text = tb.render_text(rows, cols).splitlines()
    assert text[0].split() == ["name", "val", "(bits/byte)", "run"]
    assert text[2].split() == ["a_b", "&", "100%", "1.235", "r1"]
    assert text[3].split() == ["c", "-", "r2"]
    page = tb.render_html(rows, cols)
    assert '<a href="http://h/#/r1">r1</a>' in page and "a_b &amp; 100%" in page
    tex = tb.render_latex(rows, cols, "cap_x", "tab:x")
    assert r"a\_b \& 100\% & 1.235 & r1 \\" in tex and r"\caption{cap\_x}" in tex
    assert r"\begin{tabular}{lrl}" in tex
    assert (
        tb.run_link("http://u:p@host:5000", "3", "abc")
        == "http://host:5000/#/experiments/3/runs/abc"
    )
    assert tb.run_link("sqlite:///x.db", "3", "abc") is None


def test_points_and_curves_read_back_new_and_old_metric_names(tmp_path):
    """``collect_points`` on a real SQLite store: a run with the train/, val/ groups (the final
    validation is val/bits_per_byte's last point) and one logged before them (issue 20: loss,
    tokens_total/stage*, final/val_bits_per_byte) give the same point; a killed run is left out."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from pipelines.report import collect_points

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "art"))
    params = {"plan.steps": "4", "plan.total_flops": "4e9", "plan.num_params": "1000"}
    params |= {"plan.bytes_per_step": "512", "plan.lr": "0.003", "derived.pooling_stages": "1"}
    names = {
        "new": ("train/loss", "train/tokens_total/stage", None),
        "old": ("loss", "tokens_total/stage", "final/val_bits_per_byte"),
        "killed": ("train/loss", "train/tokens_total/stage", None),
    }
    for variant, (loss, tokens, final) in names.items():
        tags = {"aunet.study": "s", "aunet.role": "cell", "aunet.variant": variant}
        tags |= {"aunet.cell": variant, "aunet.budget": "4e9"}
        run = client.create_run(exp, tags=tags, run_name=variant)
        rid = run.info.run_id
        ms = [Metric(loss, 3.0 - 0.5 * s, 0, s) for s in range(1, 5)]
        ms += [Metric("val/bits_per_byte", 2.5 - 0.25 * s, 0, s) for s in (2, 4)]
        ms += [Metric(f"{tokens}{k}", 2048.0 / (1 + 3 * k), 0, 4) for k in (0, 1)]
        ms += [Metric(final, 1.5, 0, 4)] if final else []
        client.log_batch(rid, metrics=ms, params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(rid, "KILLED" if variant == "killed" else "FINISHED")
    points, curves = collect_points(uri, "e", "s")
    assert [(p["variant"], p["loss"], p["contraction"]) for p in points] == [
        ("new", 1.5, [1.0, 4.0]),
        ("old", 1.5, [1.0, 4.0]),
    ]
    for c in curves:
        assert c["train"] == [(s * 1e9, 3.0 - 0.5 * s) for s in range(1, 5)], c["variant"]
        assert c["val"] == [(2e9, 2.0), (4e9, 1.5)]
