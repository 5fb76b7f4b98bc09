"""Scaling-law fitting: recovery of known laws from noisy synthetic tables, the choice of form,
bands, solve, the CLI report, and clear errors for bad tables."""
from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from mae_fast.scaling import ResultsTable, TableError, UnreachableTarget, compute_cost, fit, load_results
from mae_fast.scaling.cli import main as scale_main
from mae_fast.scaling.laws import ExtrapolationWarning

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "humanlike_vits_finetune_upto500h.csv"
MODELS = {"s": 2.2e7, "b": 8.65e7, "l": 3.04e8, "h": 6.32e8, "g": 1.8e9}


def synthetic(law, noise: float, seed: int = 0, hours=(0.5, 5, 50, 500, 5000), sizes=(224, 448), seeds=3):
    rng = np.random.default_rng(seed)
    rows = []
    for arch, n in MODELS.items():
        for r in sizes:
            for d in hours:
                for s in range(seeds):
                    rows.append({"run": f"{arch}_{r}_{d}_{s}", "arch": arch, "params": n, "hours": d,
                                 "img_size": r, "seed": s, "top1": law(n, d, r) + rng.normal(0, noise)})
    return ResultsTable.from_rows(rows, source="<synthetic>")


def saturating_truth(n, d, r):
    return 100 - (35 + 8 * (n / 1e8) ** -0.35 + 10 * (d / 100) ** -0.25 + 4 * (r / 224) ** -1.0)


def log_truth(n, d, r):
    return 20 + 2.0 * math.log(n / 1e8) + 3.0 * math.log(d / 100) + 5.0 * math.log(r / 224)


def test_recovers_saturating_law_and_chooses_a_saturating_form():
    # three resolutions: with two, E and the resolution term (C, gamma) cannot be told apart
    table = synthetic(saturating_truth, noise=0.3, sizes=(112, 224, 448))
    law = fit(table, n_boot=30)
    assert law.form.family == "saturating", [(s.name, s.holdout_rmse) for s in law.scores]
    for name in ("saturating", "huber_log"):  # both fitting methods recover the law
        p = law.alternative(name).params_dict()
        assert p["E"] == pytest.approx(35, abs=1.0), name
        assert p["A"] == pytest.approx(8, rel=0.1), name
        assert p["alpha"] == pytest.approx(0.35, rel=0.1), name
        assert p["B"] == pytest.approx(10, rel=0.05), name
        assert p["beta"] == pytest.approx(0.25, rel=0.05), name
        assert p["C"] == pytest.approx(4, rel=0.15), name
        assert p["gamma"] == pytest.approx(1.0, rel=0.15), name
    assert law.ceiling == pytest.approx(65, abs=1.0)
    lo, hi = law.param_bands()["beta"]
    assert lo < 0.25 < hi
    # log forms cannot follow the saturation: they must extrapolate clearly worse
    log_best = min(s.holdout_rmse for s in law.scores if s.name.startswith("log"))
    assert log_best > 5 * law.score.holdout_rmse


def test_recovers_log_additive_law_and_chooses_a_log_form():
    table = synthetic(log_truth, noise=0.3, seed=1)
    law = fit(table, n_boot=30)
    assert law.form.family == "log", [(s.name, s.holdout_rmse) for s in law.scores]
    p = law.alternative("log_additive").params_dict()
    assert p["a"] == pytest.approx(20, abs=0.3)
    assert p["b_n"] == pytest.approx(2.0, abs=0.15)
    assert p["c_d"] == pytest.approx(3.0, abs=0.1)
    assert p["e_r"] == pytest.approx(5.0, abs=0.4)


def test_bands_cover_the_truth_and_widen_with_noise():
    quiet = fit(synthetic(log_truth, noise=0.2, seed=2), forms=["log_additive"], n_boot=100)
    noisy = fit(synthetic(log_truth, noise=2.0, seed=2), forms=["log_additive"], n_boot=100)
    n, d, r = 1e9, 20000.0, 952.0  # far outside the data
    for law in (quiet, noisy):
        pred = law.predict(params=n, hours=d, img_size=r)
        assert pred.lower < pred.estimate < pred.upper
        assert pred.lower - 0.5 < log_truth(n, d, r) < pred.upper + 0.5
    def width(law):
        pred = law.predict(n, d, r)
        return pred.upper - pred.lower

    assert width(noisy) > 4 * width(quiet)
    arr = quiet.predict(params=[1e8, 1e9], hours=[10, 100], img_size=224)  # broadcasts
    assert arr.estimate.shape == (2,)
    np.testing.assert_allclose(arr.estimate, [log_truth(1e8, 10, 224), log_truth(1e9, 100, 224)], atol=0.3)


def test_bootstrap_resamples_whole_configurations_when_there_is_one_seed():
    law = fit(synthetic(log_truth, noise=0.5, seeds=1), forms=["log_additive"], n_boot=20)
    assert law.bootstrap_by == "configs" and len(law.boot_thetas) == 20
    assert law.param_bands()["c_d"][1] > law.param_bands()["c_d"][0]
    assert fit(synthetic(log_truth, noise=0.5), forms=["log_additive"], n_boot=5).bootstrap_by == "seeds"


def test_solve_finds_the_cheapest_setting_and_refuses_above_the_ceiling():
    law = fit(synthetic(saturating_truth, noise=0.3), forms=["saturating"], n_boot=20)
    target = 40.0
    sol = law.solve(target)
    assert sol["prediction"].estimate >= target - 1e-6
    assert sol["compute"] == pytest.approx(compute_cost(sol["params"], sol["hours"], sol["img_size"], 14))
    # no random setting inside the bounds that reaches the target is cheaper
    rng = np.random.default_rng(0)
    dr = law.data_range
    n = np.exp(rng.uniform(np.log(dr["params"][0]), np.log(10 * dr["params"][1]), 20000))
    d = np.exp(rng.uniform(np.log(dr["hours"][0]), np.log(100 * dr["hours"][1]), 20000))
    r = np.exp(rng.uniform(np.log(dr["img_size"][0]), np.log(2 * dr["img_size"][1]), 20000))
    ok = law.predict(n, d, r).estimate >= target
    assert ok.any()
    assert compute_cost(n, d, r)[ok].min() >= sol["compute"] * 0.97
    confident = law.solve(target, confident=True)
    assert confident["compute"] >= sol["compute"] and confident["prediction"].lower >= target - 1e-6
    with pytest.raises(UnreachableTarget, match="ceiling"):
        law.solve(law.ceiling + 1)
    with pytest.raises(UnreachableTarget, match="bounds"):
        law.solve(law.ceiling - 0.01, bounds={"params": (1e7, 2e7), "hours": (1, 2), "img_size": (224, 225)})


def test_compute_cost_is_params_times_hours_times_tokens():
    assert compute_cost(1e8, 10, 224, 14) == pytest.approx(1e8 * 10 * 256)
    assert compute_cost(2e8, 10, 448, 14) == pytest.approx(8 * compute_cost(1e8, 10, 224, 14))


# --- tables ----------------------------------------------------------------------------------------
def write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_bad_tables_get_clear_errors(tmp_path):
    header = ["run", "params", "hours", "img_size", "top1"]
    with pytest.raises(TableError, match=r"missing required column\(s\) 'hours', 'img_size'"):
        load_results(write_csv(tmp_path / "a.csv", ["run", "params", "top1"], [["x", 1e8, 20]]))
    with pytest.raises(TableError, match=r"line 3: hours must be > 0 \(got 0\)"):
        load_results(write_csv(tmp_path / "b.csv", header, [["x", 1e8, 5, 224, 20], ["y", 1e8, 0, 224, 21]]))
    with pytest.raises(TableError, match=r"line 2: hours must be > 0 \(got -5\)"):
        load_results(write_csv(tmp_path / "c.csv", header, [["x", 1e8, -5, 224, 20]]))
    with pytest.raises(TableError, match=r"line 2, column 'top1': 'abc' is not a number"):
        load_results(write_csv(tmp_path / "d.csv", header, [["x", 1e8, 5, 224, "abc"]]))
    with pytest.raises(TableError, match=r"column 'params': empty"):
        load_results(write_csv(tmp_path / "e.csv", header, [["x", "", 5, 224, 20]]))
    with pytest.raises(TableError, match=r"top1 must be a percentage"):
        load_results(write_csv(tmp_path / "f.csv", header, [["x", 1e8, 5, 224, 120]]))
    with pytest.raises(TableError, match="no data rows"):
        load_results(write_csv(tmp_path / "g.csv", header, []))
    with pytest.raises(TableError, match="no such results table"):
        load_results(tmp_path / "missing.csv")
    with pytest.raises(TableError, match="missing required column.*'acc'"):
        load_results(write_csv(tmp_path / "h.csv", header, [["x", 1e8, 5, 224, 20]]), target="acc")
    # the CLI reports it as an error, not a traceback
    assert scale_main(["fit", str(tmp_path / "c.csv"), "--out", str(tmp_path / "o")]) == 2


def test_user_table_with_other_columns_loads_and_dedupes_by_run(tmp_path):
    header = ["run", "params", "hours", "img_size", "top1", "note"]
    rows = [["a", 1e8, 5, 224, 20, "first"], ["b", 2e8, 5, 224, 22, ""], ["a", 1e8, 5, 224, 21, "again"]]
    t = load_results(write_csv(tmp_path / "u.csv", header, rows))
    assert len(t) == 2
    assert list(t["run"]) == ["b", "a"] and t["top1"][1] == 21 and t["note"][1] == "again"
    assert t["params"].dtype == np.float64


def test_cli_fit_writes_report_plots_and_json(tmp_path, capsys):
    table = synthetic(saturating_truth, noise=0.5, hours=(0.5, 5, 50, 500), sizes=(224, 448), seeds=2)
    path = tmp_path / "t.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=table.column_names)
        w.writeheader()
        w.writerows(table.rows())
    out = tmp_path / "fit"
    assert scale_main(["fit", str(path), "--out", str(out), "--n-boot", "10", "--target-accuracy", "50",
                       "--project", "1e9,1000,336"]) == 0
    text = capsys.readouterr().out
    assert "chosen" in text and "ViT-H/14 (632M), 476 px, 5,000 h" in text and "1000M params, 336 px" in text
    for name in ("report.md", "fit.json", "accuracy_vs_hours.png", "projections.png", "holdout.png"):
        assert (out / name).stat().st_size > 1000, name
    assert (out / "accuracy_vs_hours.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / "fit.json").read_text())
    assert data["form"] in {s["form"] for s in data["scores"]} and len(data["projections"]) == 3
    assert "largest_hours" in (out / "report.md").read_text()


@pytest.mark.skipif(not SHARED.exists(), reason="shared results table not present")
def test_shared_table_fits_and_projects():
    table = load_results(SHARED)
    assert len(table) == 72 and set(np.unique(table["img_size"])) == {224, 448, 476}
    law = fit(table, n_boot=20)
    assert {s.name for s in law.scores} == {"log_additive", "log_interaction", "saturating", "huber_log"}
    assert 0 < law.score.holdout_rmse < 6
    # holding out ViT-H leaves one resolution in training: only its 224 px runs can be scored
    ho = law.score.holdout["largest_model"]
    assert ho["n_test"] == 12 and ho["n_left_out"] == 24
    near = law.predict(633.2e6, 500, 476)
    assert abs(near.estimate - table["top1"][(table["img_size"] == 476) & (table["hours"] == 500)].mean()) < 3
    far = law.predict(632e6, 5000, 476)
    assert near.estimate < far.estimate < 70


# --- degenerate input, extrapolation, random truths --------------------------------------------------
def _random_log_table(rng, n_rows=24, sizes=(224, 336, 448)):
    a, b = rng.uniform(30, 50), rng.uniform(0.5, 3, 3)
    cols = {"params": rng.choice(list(MODELS.values()), n_rows), "hours": rng.choice([1.0, 7.0, 50.0, 300.0], n_rows),
            "img_size": rng.choice(sizes, n_rows).astype(float)}
    from mae_fast.scaling.laws import features

    cols["top1"] = a + features(cols["params"], cols["hours"], cols["img_size"]) @ b + rng.normal(0, 0.2, n_rows)
    return cols, np.r_[a, b]


@pytest.mark.parametrize("column,value", [("top1", math.nan), ("top1", math.inf), ("hours", 0.0),
                                          ("params", -3e7), ("img_size", math.nan)])
def test_fit_of_a_table_built_in_code_rejects_bad_values_clearly(column, value):
    rng = np.random.default_rng(7)
    cols, _ = _random_log_table(rng)
    row = int(rng.integers(len(cols["top1"])))
    cols[column] = cols[column].copy()
    cols[column][row] = value
    with pytest.raises(TableError, match=rf"{column} .*row {row}\b"):
        fit(ResultsTable(cols, source="<mine>"), forms=["log_additive"], n_boot=5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_truths_are_recovered(seed):
    """Parameters drawn at random (not a hand-picked law) come back from noisy runs, both families."""
    from mae_fast.scaling.laws import FORMS, features

    rng = np.random.default_rng(1000 + seed)
    cols, truth = _random_log_table(rng, n_rows=60)
    law = fit(ResultsTable(cols), forms=["log_additive"], n_boot=5)
    np.testing.assert_allclose(law.theta, truth, atol=0.25)

    sat = np.array([rng.uniform(20, 45), rng.uniform(4, 12), rng.uniform(0.2, 0.6), rng.uniform(5, 15),
                    rng.uniform(0.15, 0.5), rng.uniform(2, 6), rng.uniform(0.5, 1.5)])
    n, d, r = (v.ravel().repeat(2) for v in np.meshgrid(list(MODELS.values()), [0.5, 5, 50, 500, 5000],
                                                        [112, 224, 448], indexing="ij"))
    x = features(n, d, r)
    y = FORMS["saturating"].predict(sat, x) + rng.normal(0, 0.05, len(n))
    theta = FORMS["saturating"].fit(x, y, np.ones(3, bool))
    np.testing.assert_allclose(theta, sat, rtol=0.15, atol=0.3)


def test_projection_far_outside_the_data_warns():
    rng = np.random.default_rng(11)
    cols, _ = _random_log_table(rng)
    law = fit(ResultsTable(cols), forms=["log_additive"], n_boot=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        law.predict(1e9, 3000.0, 448)  # inside 10x params, 100x hours, 2x img_size
    with pytest.warns(ExtrapolationWarning, match="hours 1e\\+06 is more than 100x outside"):
        law.predict(1e8, [10.0, 1e6], 224)
    with pytest.warns(ExtrapolationWarning, match="params"):
        law.predict(1e12, 10.0, 224)
    one_size, _ = _random_log_table(rng, sizes=(224,))
    flat = fit(ResultsTable(one_size), forms=["log_additive"], n_boot=5)
    with pytest.warns(ExtrapolationWarning, match="img_size never varies"):
        flat.predict(1e8, 10.0, 448)


def test_report_when_no_held_out_split_can_be_scored(tmp_path):
    """One model at one data size: no split can be scored; the report says so instead of 'missed by inf'."""
    rng = np.random.default_rng(5)
    rows = [{"run": f"r{i}", "params": 3e8, "hours": 40.0, "img_size": r, "seed": s,
             "top1": 30 + 3 * math.log(r / 224) + rng.normal(0, 0.3)} for i, (r, s) in
            enumerate((r, s) for r in (112, 224, 448) for s in range(3))]
    table = ResultsTable.from_rows(rows)
    law = fit(table, forms=["log_additive"], n_boot=5)
    from mae_fast.scaling.report import write_report

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. matplotlib's "Tight layout not applied"
        warnings.simplefilter("ignore", ExtrapolationWarning)
        summary = write_report(table, law, tmp_path, projections=[("p", 3e8, 40.0, 336.0)])
    assert "no held-out split could be scored" in summary and "mean over splits" not in summary
    md = (tmp_path / "report.md").read_text()
    assert "inf" not in md and "nan" not in md
    head = next(i for i, line in enumerate(md.splitlines()) if line.startswith("| form |"))
    lines = md.splitlines()
    assert lines[head].count("|") == lines[head + 1].count("|") == lines[head + 2].count("|")
    for name in ("accuracy_vs_hours.png", "projections.png", "holdout.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
