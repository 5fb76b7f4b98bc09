"""Scaling laws (mae_fast/scaling/laws.py) and their report: known laws recovered from noisy synthetic tables (hand
picked and drawn at random), the choice of form, bands against percentiles of the bootstrap computed here, the
bootstrap's resampling units, held-out splits, solve against the analytic optimum of a log-additive law,
extrapolation warnings, the Huber fit's gradient and its resistance to outliers, bad values refused; the report's
numbers and notes. Every expected value is computed here from the law's formula or the table's definition."""
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
from mae_fast.scaling.laws import FORMS, ExtrapolationWarning, _bootstrap_indices, features


# odd, non-round factor values (no zeros, no 1e8 / 100 h / 224 px at the lower edge)
PARAMS = (2.3e7, 8.7e7, 3.1e8, 6.3e8, 1.7e9)
HOURS = (0.7, 3.0, 11.0, 60.0, 250.0)
SIZES = (160.0, 224.0, 320.0)


def log_truth(theta, n, d, r):
    a, b, c, e = theta
    return a + b * np.log(np.asarray(n) / 1e8) + c * np.log(np.asarray(d) / 100) + e * np.log(np.asarray(r) / 224)


def log_table(theta, noise=0.0, seed=0, seeds=1, params=PARAMS, hours=HOURS, sizes=SIZES, extra=None):
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(params):
        for d in hours:
            for r in sizes:
                for s in range(seeds):
                    row = {"run": f"m{i}_{d}_{r}_{s}", "arch": f"m{i}", "params": n, "hours": d, "img_size": r,
                           "seed": s, "top1": float(log_truth(theta, n, d, r) + rng.normal(0, noise))}
                    row.update(extra or {})
                    rows.append(row)
    return ResultsTable.from_rows(rows)


def cheapest_log_additive(theta, lo, hi, target):
    """Analytic optimum: minimise ln N + ln D + 2 ln R subject to the linear law reaching ``target``
    inside the box [lo, hi] (log space): a fractional knapsack, filled by gain per unit of log cost."""
    a, coef = theta[0], np.asarray(theta[1:], float)
    cost = np.array([1.0, 1.0, 2.0])
    x = np.log(np.asarray(lo, float)).copy()
    top = np.log(np.asarray(hi, float))
    base = np.log([1e8, 100.0, 224.0])
    need = target - (a + coef @ (x - base))
    for i in np.argsort(-coef / cost):
        if need <= 0:
            break
        room = coef[i] * (top[i] - x[i])
        if need <= room:
            x[i] += need / coef[i]
            need = 0.0
        else:
            x[i], need = top[i], need - room
    assert need <= 0, "target not reachable in the box"
    return np.exp(x)


THETA = (40.0, 1.5, 3.0, 2.0)  # per unit of log cost (R counts twice): hours 3, params 1.5, resolution 1


def test_solve_reaches_the_analytic_optimum_within_the_default_bounds():
    law = fit(log_table(THETA), forms=["log_additive"], n_boot=3)
    np.testing.assert_allclose(law.theta, THETA, atol=1e-8)
    # documented default bounds: smallest fitted value up to 10x params, 100x hours, 2x img_size
    lo = (min(PARAMS), min(HOURS), min(SIZES))
    hi = (10 * max(PARAMS), 100 * max(HOURS), 2 * max(SIZES))
    for target in (45.0, 60.0):
        want = cheapest_log_additive(THETA, lo, hi, target)
        sol = law.solve(target)
        got = np.array([sol["params"], sol["hours"], sol["img_size"]])
        np.testing.assert_allclose(np.log(got), np.log(want), atol=2e-3, err_msg=f"target {target}")
        assert sol["compute"] == pytest.approx(want[0] * want[1] * (want[2] / 14) ** 2, rel=5e-3)
        assert sol["prediction"].estimate >= target - 1e-9
    assert sol["hours"] == pytest.approx(100 * max(HOURS), rel=1e-4)  # at 60%, hours sit at their bound


def test_solve_with_explicit_bounds_matches_the_analytic_optimum():
    law = fit(log_table(THETA), forms=["log_additive"], n_boot=3)
    bounds = {"params": (1.3e7, 1.1e8), "hours": (1.7, 13.0), "img_size": (96.0, 1000.0)}
    lo, hi = zip(*(bounds[k] for k in ("params", "hours", "img_size")))
    want = cheapest_log_additive(THETA, lo, hi, 34.5)
    assert lo[2] * 1.05 < want[2] < hi[2] / 1.05  # resolution is the interior factor here
    sol = law.solve(34.5, bounds=bounds, patch_size=16)
    got = np.array([sol["params"], sol["hours"], sol["img_size"]])
    np.testing.assert_allclose(np.log(got), np.log(want), atol=2e-3)
    assert sol["compute"] == pytest.approx(want[0] * want[1] * (want[2] / 16) ** 2, rel=5e-3)


@pytest.mark.parametrize("ci", [0.9, 0.7])
def test_bands_are_the_central_percentiles_of_the_bootstrap(ci):
    law = fit(log_table(THETA, noise=0.7, seed=3, seeds=2), forms=["log_additive"], n_boot=41, ci=ci)
    boots = law.boot_thetas
    assert boots.shape == (41, 4)
    q = [50 * (1 - ci), 50 * (1 + ci)]
    n, d, r = np.array([5.5e8, 3.3e9]), np.array([170.0, 4100.0]), np.array([288.0, 560.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExtrapolationWarning)
        pred = law.predict(n, d, r)
    per_boot = np.stack([log_truth(t, n, d, r) for t in boots])
    lo, hi = np.percentile(per_boot, q, axis=0)
    np.testing.assert_allclose(pred.lower, lo, atol=1e-9)
    np.testing.assert_allclose(pred.upper, hi, atol=1e-9)
    np.testing.assert_allclose(pred.estimate, log_truth(law.theta, n, d, r), atol=1e-9)
    bands = law.param_bands()
    for j, name in enumerate(("a", "b_n", "c_d", "e_r")):
        np.testing.assert_allclose(bands[name], np.percentile(boots[:, j], q), atol=1e-12, err_msg=name)


def test_bootstrap_keeps_every_factor_in_every_resample():
    """R varies in one configuration only; a resample of configurations without it cannot estimate
    e_r and must be redrawn, not counted as e_r = 0."""
    rng = np.random.default_rng(17)
    truth = (35.0, 2.0, 2.5, 6.0)
    rows = [{"run": f"m{i}_{d}", "arch": f"m{i}", "params": n, "hours": d, "img_size": 256.0,
             "top1": float(log_truth(truth, n, d, 256.0) + rng.normal(0, 0.05))}
            for i, n in enumerate(PARAMS) for d in HOURS[:4]]
    rows.append({"run": "odd", "arch": "m2", "params": PARAMS[2], "hours": 11.0, "img_size": 352.0,
                 "top1": float(log_truth(truth, PARAMS[2], 11.0, 352.0) + rng.normal(0, 0.05))})
    law = fit(ResultsTable.from_rows(rows), forms=["log_additive"], n_boot=60)
    assert law.bootstrap_by == "configs" and len(law.boot_thetas) == 60
    assert np.all(np.abs(law.boot_thetas[:, 3] - 6.0) < 1.5), law.boot_thetas[:, 3]
    lo, hi = law.param_bands()["e_r"]
    assert 4.5 < lo < hi < 7.5  # the one odd run sets e_r: its noise, not 0


def test_two_seeds_per_configuration_bootstrap_seeds():
    assert fit(log_table(THETA, noise=0.3, seeds=2), forms=["log_additive"], n_boot=5).bootstrap_by == "seeds"
    table = log_table(THETA, noise=0.3, seeds=2)
    keep = np.ones(len(table), bool)
    keep[1] = False  # one configuration left with a single run
    assert fit(table.subset(keep), forms=["log_additive"], n_boot=5).bootstrap_by == "configs"


@pytest.mark.parametrize("by", ["seeds", "configs"])
def test_bootstrap_indices_resample_the_right_units(by):
    sizes = [1, 2, 3, 5, 7]  # distinct sizes: the blocks a resample is made of can be counted
    groups = np.repeat(np.arange(len(sizes)), sizes)
    perm = np.random.default_rng(2).permutation(len(groups))
    groups = groups[perm]
    for seed in range(20):
        idx = _bootstrap_indices(groups, np.random.default_rng(seed), by)
        counts = np.bincount(groups[idx], minlength=len(sizes))
        if by == "seeds":  # each configuration keeps its size, its own runs only
            np.testing.assert_array_equal(counts, sizes)
        else:  # whole configurations, as many as there are
            assert np.all(counts % sizes == 0)
            assert (counts // sizes).sum() == len(sizes)
            for g in range(len(sizes)):  # a picked configuration brings all its runs, each once per pick
                members = np.flatnonzero(groups == g)
                per_run = np.bincount(idx, minlength=len(groups))[members]
                assert len(set(per_run)) == 1


def test_holdout_splits_hold_out_the_largest_hours_and_the_largest_model():
    table = log_table(THETA, noise=0.4, seed=5, seeds=2)
    law = fit(table, forms=["log_additive"], n_boot=3)
    ho = law.score.holdout
    assert ho["largest_hours"]["rows"] == np.flatnonzero(table["hours"] == max(HOURS)).tolist()
    assert ho["largest_model"]["rows"] == np.flatnonzero(table["params"] == max(PARAMS)).tolist()
    assert ho["largest_hours"]["n_left_out"] == ho["largest_model"]["n_left_out"] == 0


def test_tied_forms_go_to_the_one_with_fewer_parameters():
    """Noise-free log-additive runs: both log forms extrapolate exactly, the simpler must be chosen."""
    law = fit(log_table(THETA), forms=["log_interaction", "log_additive"], n_boot=3)
    assert all(s.holdout_rmse < 1e-8 for s in law.scores)
    assert law.name == "log_additive"


def test_saturating_forms_count_one_floor_and_two_parameters_per_varying_factor():
    table = log_table(THETA, noise=0.3, seed=4)
    law = fit(table, forms=["saturating", "log_additive"], choose="log_additive", n_boot=3)
    assert {s.name: s.n_params for s in law.scores} == {"saturating": 7, "log_additive": 4}
    one_size = table.subset(table["img_size"] == 224.0)
    law = fit(one_size, forms=["saturating", "log_additive"], choose="log_additive", n_boot=3)
    assert {s.name: s.n_params for s in law.scores} == {"saturating": 5, "log_additive": 3}


def test_prediction_below_the_fitted_range_warns_too():
    law = fit(log_table(THETA, noise=0.3, seed=6), forms=["log_additive"], n_boot=3)
    for args, name in [((min(PARAMS) / 11, 10.0, 224.0), "params"), ((1e8, min(HOURS) / 101, 224.0), "hours"),
                       ((1e8, 10.0, min(SIZES) / 2.1), "img_size")]:
        with pytest.warns(ExtrapolationWarning, match=rf"{name} \S+ is more than"):
            law.predict(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        law.predict(min(PARAMS) / 9, min(HOURS) / 99, min(SIZES) / 1.9)  # inside the limits


def test_huber_loss_gradient_matches_finite_differences():
    form = FORMS["huber_log"]
    rng = np.random.default_rng(9)
    x = features(rng.choice(PARAMS, 23), rng.choice(HOURS, 23), rng.choice(SIZES, 23))
    log_err = np.log(rng.uniform(30, 70, 23))
    idx = np.array([0, 1, 2])
    for _ in range(5):
        p = np.array([rng.uniform(2, 3.5), rng.uniform(0.5, 2.5), rng.uniform(0.1, 1.2), rng.uniform(0.5, 2.5),
                      rng.uniform(0.1, 1.2), rng.uniform(0.5, 2.5), rng.uniform(0.1, 1.2)])
        _, grad = form._loss(p, x, log_err, idx)
        h = 1e-6
        num = np.array([(form._loss(p + h * e, x, log_err, idx)[0] - form._loss(p - h * e, x, log_err, idx)[0]) / (2 * h)
                        for e in np.eye(len(p))])
        np.testing.assert_allclose(grad, num, rtol=1e-4, atol=1e-7)


def test_huber_fit_shrugs_off_an_outlier():
    """One run 12 points low: the Huber fit on log error still recovers the law the others follow."""
    truth = np.array([30.0, 9.0, 0.4, 12.0, 0.3, 5.0, 0.9])  # E, A, alpha, B, beta, C, gamma
    n, d, r = (v.ravel() for v in np.meshgrid(PARAMS, HOURS, (112.0, 224.0, 448.0), indexing="ij"))
    x = features(n, d, r)
    err = truth[0] + truth[1] * np.exp(-truth[2] * x[:, 0]) + truth[3] * np.exp(-truth[4] * x[:, 1]) \
        + truth[5] * np.exp(-truth[6] * x[:, 2])
    top1 = 100 - err * np.exp(np.random.default_rng(1).normal(0, 0.002, len(err)))
    top1[37] -= 12.0
    least_squares = FORMS["saturating"].fit(x, top1, np.ones(3, bool))
    assert abs(least_squares[0] - truth[0]) > 3  # the outlier drags a least-squares fit off
    # started from that fit (one L-BFGS run instead of the grid of starts, to stay fast)
    theta = FORMS["huber_log"].fit(x, top1, np.ones(3, bool), start=least_squares)
    np.testing.assert_allclose(theta, truth, rtol=0.05)


# --- recovery of hand-picked and random laws; solve's ceiling; the shared results table ----------------------------


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


def log_law(n, d, r):
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
    table = synthetic(log_law, noise=0.3, seed=1)
    law = fit(table, n_boot=30)
    assert law.form.family == "log", [(s.name, s.holdout_rmse) for s in law.scores]
    p = law.alternative("log_additive").params_dict()
    assert p["a"] == pytest.approx(20, abs=0.3)
    assert p["b_n"] == pytest.approx(2.0, abs=0.15)
    assert p["c_d"] == pytest.approx(3.0, abs=0.1)
    assert p["e_r"] == pytest.approx(5.0, abs=0.4)


def test_bands_cover_the_truth_and_widen_with_noise():
    quiet = fit(synthetic(log_law, noise=0.2, seed=2), forms=["log_additive"], n_boot=100)
    noisy = fit(synthetic(log_law, noise=2.0, seed=2), forms=["log_additive"], n_boot=100)
    n, d, r = 1e9, 20000.0, 952.0  # far outside the data
    for law in (quiet, noisy):
        pred = law.predict(params=n, hours=d, img_size=r)
        assert pred.lower < pred.estimate < pred.upper
        assert pred.lower - 0.5 < log_law(n, d, r) < pred.upper + 0.5
    def width(law):
        pred = law.predict(n, d, r)
        return pred.upper - pred.lower

    assert width(noisy) > 4 * width(quiet)
    arr = quiet.predict(params=[1e8, 1e9], hours=[10, 100], img_size=224)  # broadcasts
    assert arr.estimate.shape == (2,)
    np.testing.assert_allclose(arr.estimate, [log_law(1e8, 10, 224), log_law(1e9, 100, 224)], atol=0.3)


def test_bootstrap_resamples_whole_configurations_when_there_is_one_seed():
    law = fit(synthetic(log_law, noise=0.5, seeds=1), forms=["log_additive"], n_boot=20)
    assert law.bootstrap_by == "configs" and len(law.boot_thetas) == 20
    assert law.param_bands()["c_d"][1] > law.param_bands()["c_d"][0]
    assert fit(synthetic(log_law, noise=0.5), forms=["log_additive"], n_boot=5).bootstrap_by == "seeds"


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


def _random_log_table(rng, n_rows=24, sizes=(224, 336, 448)):
    a, b = rng.uniform(30, 50), rng.uniform(0.5, 3, 3)
    cols = {"params": rng.choice(list(MODELS.values()), n_rows), "hours": rng.choice([1.0, 7.0, 50.0, 300.0], n_rows),
            "img_size": rng.choice(sizes, n_rows).astype(float)}
    from mae_fast.scaling.laws import features

    cols["top1"] = a + features(cols["params"], cols["hours"], cols["img_size"]) @ b + rng.normal(0, 0.2, n_rows)
    return cols, np.r_[a, b]


@pytest.mark.parametrize("column,value", [("top1", math.nan), ("top1", math.inf), ("top1", 100.5), ("top1", -2.0),
                                          ("hours", 0.0), ("params", -3e7), ("img_size", math.nan)])
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


# --- the report ------------------------------------------------------------------------------------------------------


def test_report_projection_compute_uses_the_tables_patch_size(tmp_path):
    from mae_fast.scaling.report import write_report

    table = log_table(THETA, noise=0.3, seed=8, extra={"patch_size": 16})
    law = fit(table, forms=["log_additive"], n_boot=5)
    assert law.patch_size == 16
    proj = [("p", 7.7e8, 900.0, 384.0)]
    write_report(table, law, tmp_path, projections=proj)
    data = json.loads((tmp_path / "fit.json").read_text())
    assert data["projections"][0]["compute"] == pytest.approx(7.7e8 * 900.0 * (384.0 / 16) ** 2)


def test_report_caution_and_bound_note_follow_the_numbers(tmp_path):
    from mae_fast.scaling.report import write_report

    # a law that extrapolates well, projected far (wide band): no caution; hours end at their bound
    good = log_table((20.0, 0.5, 0.8, 0.6), noise=0.3, seed=10)
    law = fit(good, forms=["log_additive"], n_boot=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExtrapolationWarning)
        write_report(good, law, tmp_path / "good", projections=[("far", 1e15, 1e9, 5000.0)], target_accuracy=25.0)
        pred = law.predict(1e15, 1e9, 5000.0)
    assert law.score.holdout_rmse < (pred.upper - pred.lower) / 2
    md = (tmp_path / "good" / "report.md").read_text()
    assert "**Caution:**" not in md
    assert "upper search bound of hours" in md  # 100x the largest hours, as the analytic optimum says

    # a log law forced on saturating runs misses held-out runs by far more than its narrow band
    sat = ResultsTable.from_rows([
        {"run": f"{n}_{d}_{r}", "arch": f"{n:g}", "params": n, "hours": d, "img_size": r,
         "top1": 100 - (40 + 9 * (n / 1e8) ** -0.4 + 5 * (d / 100) ** -0.3 + 3 * (r / 224) ** -1.0)}
        for n in PARAMS for d in HOURS for r in SIZES])
    law = fit(sat, forms=["log_additive"], n_boot=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExtrapolationWarning)
        write_report(sat, law, tmp_path / "bad", projections=[("near", 3e8, 100.0, 224.0)])
        pred = law.predict(3e8, 100.0, 224.0)
    assert law.score.holdout_rmse > (pred.upper - pred.lower) / 2
    assert "**Caution:** on held-out runs the chosen law missed by" in (tmp_path / "bad" / "report.md").read_text()


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
