"""Scaling plots (mae_fast/scaling/plots.py): what each figure draws, against the law's own predictions and the
table's seed means."""
from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest

from mae_fast.scaling import plots
from mae_fast.scaling.laws import ExtrapolationWarning, Prediction, fit
from mae_fast.scaling.table import ResultsTable


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions draw (kept open instead of closed)."""
    figs, close = [], plots.plt.close
    monkeypatch.setattr(plots.plt, "close", figs.append)
    yield figs
    for f in figs:
        close(f)


def _table(rng, truth):
    """Two models (the bigger one listed first, at two resolutions), 3 hours, 2 seeds each, accuracy from truth()."""
    rows = []
    for arch, params, sizes in (("big", 3.1e8, (224, 448)), ("small", 2.3e7, (224,))):
        for size, hours, seed in itertools.product(sizes, (3.0, 30.0, 300.0), (1, 2)):
            cfg = {"params": params, "hours": hours, "img_size": size, "seed": seed}
            rows.append({"run": f"{arch}-{size}-{hours}-{seed}", "arch": arch, "params": params, "hours": hours,
                         "img_size": size, "top1": truth(cfg) + 25 + rng.normal(0, 0.3)})
    return ResultsTable.from_rows(rows)


def test_accuracy_plot_draws_each_models_law_and_seed_means(truth, tmp_path, drawn):
    """One curve per (model, resolution) present, ordered by size, each the law's prediction over hours extended to
    extend_to_hours; the large markers are that configuration's seed means; drawing far past the data warns nothing
    (the projections table is where extrapolation is reported)."""
    table = _table(np.random.default_rng(3), truth)
    law = fit(table, forms=["log_additive"], n_boot=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plots.plot_accuracy_vs_hours(table, law, tmp_path / "a.png", extend_to_hours=1e5)  # 333x the data
    assert not [w for w in caught if issubclass(w.category, ExtrapolationWarning)]
    (ax,) = drawn[0].axes
    curves = [ln for ln in ax.lines if not ln.get_label().startswith("_")]
    assert [c.get_label().split(" (")[0] for c in curves] == ["small @224px", "big @224px", "big @448px"]
    means = [ln for ln in ax.lines if ln.get_label().startswith("_") and ln.get_linestyle() == "None"]
    for curve, mean, (arch, params, size) in zip(curves, means, [("small", 2.3e7, 224), ("big", 3.1e8, 224),
                                                                 ("big", 3.1e8, 448)]):
        h = curve.get_xdata()
        assert h[0] == pytest.approx(3.0 / 1.5) and h[-1] == pytest.approx(1e5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExtrapolationWarning)
            want_curve = law.predict(params, h, size).estimate
        np.testing.assert_allclose(curve.get_ydata(), want_curve, rtol=1e-9)
        mask = (table.model_key() == arch) & (table["img_size"] == size)
        want = [table["top1"][mask & (table["hours"] == u)].mean() for u in (3.0, 30.0, 300.0)]
        np.testing.assert_allclose(mean.get_xdata(), [3.0, 30.0, 300.0])
        np.testing.assert_allclose(mean.get_ydata(), want, rtol=1e-12)


class _StubLaw:
    """A law whose bootstrap band lies above its estimate (as a biased bootstrap can), for plot_projections."""
    target, name, ci = "top1", "stub", 0.9
    data_range = {"hours": (1.0, 100.0)}

    def __init__(self, ceiling):
        self.ceiling = ceiling

    def predict(self, params, hours, img_size):
        est = 10 + np.log(np.asarray(hours, dtype=float)) + params / 1e9 + img_size / 1000
        return Prediction(est, est + 1.0, est + 3.0)


def test_projection_plot_points_curves_and_ceiling(tmp_path, drawn):
    """Each projection: a curve up to twice the largest projected hours, a point at its own hours with error bars
    clipped at 0 where the band misses the estimate; the ceiling line only for a law with a ceiling below 100."""
    plots.plot_projections(_StubLaw(100.0), [("far", 2e9, 5000.0, 476.0), ("near", 1e8, 20.0, 224.0)],
                           tmp_path / "p.png")
    (ax,) = drawn[0].axes
    curves = [ln for ln in ax.lines if ln.get_label() in ("far", "near")]
    assert [c.get_xdata()[-1] for c in curves] == [pytest.approx(10000.0)] * 2
    points = [ln for ln in ax.lines if ln.get_marker() == "o"]
    assert [(p.get_xdata()[0], p.get_ydata()[0]) for p in points] == [
        (5000.0, pytest.approx(10 + math.log(5000) + 2 + 0.476)), (20.0, pytest.approx(10 + math.log(20) + 0.1 + 0.224))]
    assert not any("ceiling" in t.get_text() for t in ax.texts)
    plots.plot_projections(_StubLaw(80.0), [("far", 2e9, 5000.0, 476.0)], tmp_path / "q.png")
    assert any("law ceiling 80.0%" in t.get_text() for t in drawn[1].axes[0].texts)


def test_holdout_plot_is_actual_against_predicted(truth, tmp_path, drawn):
    """Held-out panels: x the runs' actual accuracy, y the form's prediction; the chosen form drawn larger."""
    table = _table(np.random.default_rng(5), truth)
    law = fit(table, forms=["log_additive", "log_interaction"], n_boot=3)
    plots.plot_holdout(table, law, tmp_path / "h.png")
    axes = drawn[0].axes
    scored = [k for k in law.scores[0].holdout if any(s.holdout[k].get("rows") for s in law.scores)]
    assert len(axes) == len(scored) >= 1  # a split no form could score gets no (empty) panel
    checked = 0
    for ax, split in zip(axes, scored):
        scored = [s for s in law.scores if s.holdout[split].get("rows")]
        for s, coll in zip(scored, ax.collections):
            ho = s.holdout[split]
            np.testing.assert_allclose(coll.get_offsets(), np.c_[table["top1"][ho["rows"]], ho["predicted"]])
            assert coll.get_sizes()[0] == (40 if s.name == law.name else 18)
            checked += 1
    assert checked >= 2


def test_holdout_plot_has_no_empty_panel(truth, tmp_path, drawn):
    """When no held-out run could be scored in any split, the single panel says so instead of showing empty axes."""
    table = _table(np.random.default_rng(6), truth)
    law = fit(table, forms=["log_additive"], n_boot=0, calibrate=False)
    for s in law.scores:  # as if no held-out run could be scored anywhere
        for ho in s.holdout.values():
            ho.pop("rows", None)
    plots.plot_holdout(table, law, tmp_path / "none.png")
    ax, = drawn[-1].axes
    assert "no held-out run could be scored" in ax.texts[0].get_text() and not ax.collections
