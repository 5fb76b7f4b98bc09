"""Calibrated projections (mae_fast/scaling/calibration.py): bounds that cover the truth at about their stated rate
when extrapolating a decade beyond the data, the calibration split using only the fitted rows, the ensemble's
weights following the calibration error, and the reach each projection reports."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mae_fast.scaling.calibration import (ENSEMBLE_FORMS, calibrate, calibration_split, conformal_quantile,
                                          describe_reach, reach)
from mae_fast.scaling.table import ResultsTable

MODELS = {"s": 2.2e7, "b": 8.65e7, "l": 3.04e8, "h": 6.32e8}


def logit_truth(n, d, r):
    """A learning curve convex in log data at low accuracy."""
    z = -1.3 + 0.25 * math.log(n / 1e8) + 0.28 * math.log(d / 100) + 0.4 * math.log(r / 224)
    return 100 / (1 + math.exp(-z))


def saturating_truth(n, d, r):
    """Concave in log data: every default member (log and logit linear) over-predicts it far out."""
    return 100 - (35 + 8 * (n / 1e8) ** -0.35 + 10 * (d / 100) ** -0.25 + 4 * (r / 224) ** -1.0)


def table_of(truth, rng, hours, noise=0.8, seeds=3, sizes=(224, 448)):
    rows = [{"run": f"{a}_{r}_{d}_{s}", "arch": a, "params": n, "hours": d, "img_size": r, "seed": s,
             "top1": truth(n, d, r) + rng.normal(0, noise)}
            for a, n in MODELS.items() for r in sizes for d in hours for s in range(seeds)]
    return ResultsTable.from_rows(rows, source="<synthetic>")


def _coverage(truth, studies=8, bounds="rmse"):
    """Fit on 1..100 h, project the 1000 h runs (10x the data) of seeded synthetic studies."""
    inside, total, widths, errors = 0, 0, [], []
    for seed in range(studies):
        rng = np.random.default_rng(seed)
        fitted = table_of(truth, rng, hours=(1.0, 10.0, 100.0))
        held = table_of(truth, rng, hours=(1000.0,))
        cal = calibrate(fitted, bounds=bounds)
        assert cal.split["train_max_hours"] == 10.0 and cal.split["test_hours"] == 100.0  # fitted rows only
        p = cal.project(held["params"], held["hours"], held["img_size"])
        y = held["top1"]
        inside += int(np.sum((y >= p.lower) & (y <= p.upper)))
        total += len(y)
        widths.append(np.mean(p.upper - p.lower))
        errors.append(np.mean(np.abs(p.estimate - y)))
    return inside / total, float(np.mean(widths)), float(np.mean(errors))


def test_bounds_cover_the_truth_at_the_stated_rate_when_extrapolating_a_decade():
    """A law the ensemble can follow: about 90% of the runs 10x beyond the data inside the 90% bounds, with bounds
    a few points wide; a law it cannot (concave, the point is off by points): the bounds widen to cover it."""
    rate, width, error = _coverage(logit_truth)
    assert 0.8 <= rate <= 1.0 and width < 6.0 and error < 1.2, (rate, width, error)
    rate, width, error = _coverage(saturating_truth, studies=3)
    assert error > 2.0 and rate >= 0.9, (rate, width, error)


def test_calibration_split_and_weights_follow_the_calibration_error():
    hours = np.array([0.5, 5, 50, 500] * 3, float)
    train, test = calibration_split(hours)
    assert set(hours[train]) == {0.5, 5.0, 50.0} and set(hours[test]) == {500.0}  # up to H/10, predict H
    train, _ = calibration_split(np.array([1, 2, 3, 4], float))  # nothing two sizes deep below H/10: all below H
    assert train.tolist() == [True, True, True, False]
    assert calibration_split(np.array([1, 10, 1, 10], float)) is None  # two sizes: no split
    rng = np.random.default_rng(0)
    cal = calibrate(table_of(logit_truth, rng, hours=(1.0, 10.0, 100.0, 1000.0)))
    weight = {}
    for m in cal.members:
        weight[m.form] = weight.get(m.form, 0.0) + m.weight
    assert sum(weight.values()) == pytest.approx(1.0)
    rmse = {k: v["rmse"] for k, v in cal.split["forms"].items()}
    order = sorted(rmse, key=rmse.get)
    assert [weight[k] for k in order] == sorted(weight.values(), reverse=True)  # lower error, more weight
    # members are fitted on the calibration fit's span of data (1..100 h) next to the largest: 10..1000 h
    assert {m.rows for m in cal.members} == {"window"}
    table = table_of(logit_truth, np.random.default_rng(0), hours=(1.0, 10.0, 100.0, 1000.0))
    near = table["hours"] >= 10.0
    design = np.stack([np.ones(near.sum()), np.log(table["params"][near] / 1e8), np.log(table["hours"][near] / 100),
                       np.log(table["img_size"][near] / 224)], 1)
    expected, *_ = np.linalg.lstsq(design, table["top1"][near], rcond=None)
    additive = next(m for m in cal.members if m.form == "log_additive")
    np.testing.assert_allclose(additive.theta, expected, rtol=1e-8, atol=1e-8)


def test_conformal_quantile_is_the_smallest_value_covering_the_stated_share():
    rng = np.random.default_rng(3)
    for n in (5, 18, 19, 40):
        a = rng.exponential(size=n)
        q = conformal_quantile(a, 0.9)
        # brute force: the smallest observed value with at least (n + 1) * 0.9 values at or below it, else the largest
        need = min(n, math.ceil((n + 1) * 0.9))
        assert q == min(v for v in a if np.sum(a <= v) >= need)


def test_conformal_bounds_cover_at_the_stated_rate_and_are_no_narrower_than_needed():
    """Split-conformal bounds on a law the ensemble can follow: >= 90% inside, at most a few points wide."""
    rate, width, error = _coverage(logit_truth, studies=4, bounds="conformal")
    assert 0.85 <= rate <= 1.0 and width < 5.0 and error < 1.2, (rate, width, error)


def test_bounds_widen_with_reach_and_reach_is_reported():
    rng = np.random.default_rng(1)
    cal = calibrate(table_of(logit_truth, rng, hours=(1.0, 10.0, 100.0)))
    near, far = cal.project(3e8, 100.0, 448), cal.project(3e8, 10000.0, 448)
    assert far.upper - far.lower > near.upper - near.lower
    assert near.reach["hours"] == 1.0 and far.reach["hours"] == pytest.approx(100.0)
    r = reach({"params": 6.32e8, "hours": 500.0, "img_size": 476.0}, 2.5e9, 50000.0, 952.0)
    assert r["log_reach"] == pytest.approx(math.log(2.5e9 / 6.32e8) + math.log(100) + math.log(2))
    assert describe_reach(r) == "100x the data, 3.96x the parameters, 2x the resolution of any fitted run"
    assert describe_reach(reach({"params": 1e9, "hours": 5.0, "img_size": 224.0}, 1e8, 5.0, 224.0)) \
        == "within the fitted runs"
