"""Scaling laws against independent expectations: solve against the analytic optimum of a known
log-additive law, bands against percentiles of the bootstrap computed here, the held-out splits, the
choice between tied forms, the bootstrap's resampling, the Huber fit's gradient and robustness, and
the results table's and report's contracts. Every expected value is computed in this file from the
law's formula or the table's definition, never taken from the code under test."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from mae_fast.scaling import ResultsTable, TableError, fit, load_results
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


# --- solve --------------------------------------------------------------------------------------------
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


# --- bands --------------------------------------------------------------------------------------------
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


# --- splits and the choice of form ------------------------------------------------------------------
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


# --- the Huber fit ------------------------------------------------------------------------------------
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


# --- tables -------------------------------------------------------------------------------------------
def _csv(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_negative_accuracy_and_infinite_factors_are_refused(tmp_path):
    head = "run,params,hours,img_size,top1,top5"
    with pytest.raises(TableError, match=r"line 3: top1 must be a percentage"):
        load_results(_csv(tmp_path / "a.csv", [head, "a,1e8,5,224,20,40", "b,1e8,7,224,-3,40"]))
    with pytest.raises(TableError, match=r"line 2: top5 must be a percentage"):
        load_results(_csv(tmp_path / "b.csv", [head, "a,1e8,5,224,20,-40"]))
    for col, row in (("hours", "a,1e8,inf,224,20,40"), ("params", "a,inf,5,224,20,40"),
                     ("top5", "a,1e8,5,224,20,inf")):
        with pytest.raises(TableError, match=rf"column '{col}': 'inf' is not a finite number"):
            load_results(_csv(tmp_path / f"{col}.csv", [head, row]))


@pytest.mark.parametrize("value", [100.5, 130.0, -2.0])
def test_fit_of_a_table_built_in_code_refuses_accuracy_outside_0_100(value):
    cols = {k: np.asarray(log_table(THETA, noise=0.2)[k]) for k in ("params", "hours", "img_size", "top1")}
    cols["top1"][11] = value
    with pytest.raises(TableError, match=r"top1 must be a finite percentage.*row 11\b"):
        fit(ResultsTable(cols, source="<mine>"), forms=["log_additive"], n_boot=3)


def test_rows_without_a_run_id_are_all_kept(tmp_path):
    lines = ["run,params,hours,img_size,top1", ",1e8,5,224,20", "x,2e8,5,224,22", ",3e8,5,224,23",
             "x,2e8,5,224,24", ",3e8,5,224,25"]
    t = load_results(_csv(tmp_path / "u.csv", lines))
    assert list(t["top1"]) == [20, 23, 24, 25]


def test_models_without_an_arch_column_are_told_apart_by_their_parameter_count():
    rows = [{"params": p, "hours": 9.0, "img_size": 224.0, "top1": 30.0} for p in (2.2e7, 2.6e7, 2.2e7, 2.61e7)]
    t = ResultsTable.from_rows(rows)
    assert t.group_ids().tolist() == [0, 1, 0, 2]


# --- report -------------------------------------------------------------------------------------------
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
