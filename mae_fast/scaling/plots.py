"""Plots of a fitted law (matplotlib, Agg backend, PNG): data with fitted curves and bands,
projections to targets, and the held-out check."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .laws import ExtrapolationWarning, ScalingLaw  # noqa: E402
from .table import ResultsTable  # noqa: E402

__all__ = ["plot_accuracy_vs_hours", "plot_projections", "plot_holdout"]

_STYLES = ["-", "--", ":", "-."]


def _predict(law: ScalingLaw, params, hours, img_size):
    """``law.predict`` for drawing: curves go past the data on purpose (the projections table warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExtrapolationWarning)
        return law.predict(params, hours, img_size)


def _project(law, params, hours, img_size):
    """The calibrated projection where the law has one (:meth:`ScalingLaw.project`), else ``law.predict``."""
    if getattr(law, "calibration", None) is None:
        return _predict(law, params, hours, img_size)
    return law.project(params, hours, img_size)


def _data_label(law) -> str:
    unit = getattr(law, "data_unit", "hours")
    return f"pretraining data ({unit})"


def _configs(table: ResultsTable):
    """(model, img_size) pairs ordered by size, with their median parameter count."""
    models = table.model_key()
    out = []
    for m in dict.fromkeys(models):
        for r in sorted(set(table["img_size"][models == m])):
            mask = (models == m) & (table["img_size"] == r)
            out.append((m, int(r), float(np.median(table["params"][mask])), mask))
    return sorted(out, key=lambda c: (c[2], c[1]))


def plot_accuracy_vs_hours(table: ResultsTable, law: ScalingLaw, path: str | Path,
                           extend_to_hours: float | None = None) -> Path:
    """Accuracy vs hours per model and resolution: runs, seed means, fitted curve and bootstrap band."""
    target = law.target
    hours = table["hours"]
    h = np.geomspace(hours.min() / 1.5, max(hours.max() * 1.5, extend_to_hours or 0), 120)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    models = list(dict.fromkeys(c[0] for c in _configs(table)))
    colors = {m: plt.cm.viridis(i / max(1, len(models) - 1) * 0.9) for i, m in enumerate(models)}
    res_rank: dict[str, list[int]] = {}
    for model, res, params, mask in _configs(table):
        res_rank.setdefault(model, []).append(res)
        k = len(res_rank[model]) - 1  # resolutions of one model: line style and marker
        style, marker = _STYLES[k % len(_STYLES)], "osD^v"[k % 5]
        c = colors[model]
        label = f"{model} @{res}px ({params / 1e6:.3g}M)"
        ax.scatter(hours[mask], table[target][mask], s=10, color=c, alpha=0.35, marker=marker)
        uh = np.unique(hours[mask])
        means = [np.mean(table[target][mask & (hours == u)]) for u in uh]
        ax.plot(uh, means, marker, color=c, ms=5)
        pred = _predict(law, params, h, res)
        ax.plot(h, pred.estimate, style, color=c, lw=1.6, label=label)
        ax.fill_between(h, pred.lower, pred.upper, color=c, alpha=0.15, lw=0)
    ax.axvspan(hours.max(), h.max(), color="0.9", zorder=0)
    ax.text(hours.max() * 1.1, ax.get_ylim()[0] + 0.5, "extrapolation", fontsize=8, color="0.4")
    ax.set_xscale("log")
    ax.set_xlabel(_data_label(law))
    ax.set_ylabel(f"{target} (%)")
    ax.set_title(f"{target} vs data: {law.name} law, {law.ci:.0%} bootstrap bands\n(small: runs, large: seed means; marker and line style: resolution)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_projections(law: ScalingLaw, projections: Sequence[tuple[str, float, float, float]], path: str | Path,
                     target_accuracy: float | None = None, solution: dict | None = None) -> Path:
    """Each projected (params, img_size) as a curve over hours up to its target hours, band and point."""
    data_max = law.data_range["hours"][1]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    top = max([p[2] for p in projections] + [data_max * 10])
    h = np.geomspace(law.data_range["hours"][0], top * 2, 200)
    for i, (label, params, hours, res) in enumerate(projections):
        c = plt.cm.tab10(i)
        curve = _project(law, params, h, res)
        ax.plot(h, curve.estimate, color=c, lw=1.6, label=f"{label}")
        ax.fill_between(h, curve.lower, curve.upper, color=c, alpha=0.15, lw=0)
        pt = _project(law, params, hours, res)
        # a percentile band need not contain the point estimate (a biased bootstrap): clip the bars
        ax.errorbar([hours], [pt.estimate], yerr=[[max(0.0, pt.estimate - pt.lower)], [max(0.0, pt.upper - pt.estimate)]],
                    fmt="o", color=c, capsize=4)
        ax.annotate(f"{pt.estimate:.1f} [{pt.lower:.1f}, {pt.upper:.1f}]", (hours, pt.estimate),
                    textcoords="offset points", xytext=(-10, 10), ha="right", fontsize=8, color=c)
    if target_accuracy is not None:
        ax.axhline(target_accuracy, color="k", lw=0.8, ls="--")
        text = f"target {target_accuracy:g}%"
        if solution:
            text += (f": cheapest N={solution['params'] / 1e6:.3g}M, {solution['hours']:.3g} h, "
                     f"{solution['img_size']:.0f} px (C={solution['compute']:.2e})")
        ax.text(h[0], target_accuracy + 0.4, text, fontsize=8)
    if law.ceiling < 100:
        ax.axhline(law.ceiling, color="r", lw=0.8, ls=":")
        ax.text(h[0], law.ceiling - 1.5, f"law ceiling {law.ceiling:.1f}%", fontsize=8, color="r")
    ax.axvspan(h[0], data_max, color="0.92", zorder=0)
    # x in data units, y in axes units: stays inside the axes however narrow the accuracy range is
    ax.text(h[0] * 1.1, 0.97, "fitted data range", fontsize=8, color="0.4", va="top",
            transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.set_xlabel(_data_label(law))
    ax.set_ylabel(f"{law.target} (%)")
    ax.set_title(f"Projections: calibrated ensemble with {law.ci:.0%} bounds (form choice, extrapolation, seed)"
                 if getattr(law, "calibration", None) is not None
                 else f"Projections: {law.name} law with {law.ci:.0%} bootstrap bands", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_holdout(table: ResultsTable, law: ScalingLaw, path: str | Path) -> Path:
    """Predicted vs actual accuracy of the held-out runs, one panel per split that some form could score, every
    form (a split no form could score gets no panel; with none at all, one panel says so)."""
    splits = [k for k in law.scores[0].holdout if any(s.holdout[k].get("rows") for s in law.scores)]
    fig, axes = plt.subplots(1, max(1, len(splits)), figsize=(5.2 * max(1, len(splits)), 4.8), squeeze=False)
    y = table[law.target]
    markers = "osD^v"
    if not splits:
        ax = axes[0][0]
        ax.text(0.5, 0.5, "no held-out run could be scored\n(a factor never varies in the rest)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    for ax, split in zip(axes[0], splits):
        lo, hi = np.inf, -np.inf
        for j, s in enumerate(law.scores):
            ho = s.holdout[split]
            if not ho.get("rows"):
                continue
            actual, pred = y[ho["rows"]], np.asarray(ho["predicted"])
            chosen = s.name == law.name
            ax.scatter(actual, pred, marker=markers[j % len(markers)], s=40 if chosen else 18,
                       alpha=0.9 if chosen else 0.5, label=f"{s.name}: RMSE {ho['rmse']:.2f}" + (" (chosen)" if chosen else ""))
            lo, hi = min(lo, actual.min(), pred.min()), max(hi, actual.max(), pred.max())
        if np.isfinite(lo):
            ax.plot([lo - 1, hi + 1], [lo - 1, hi + 1], "k-", lw=0.8)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no held-out run could be scored\n(a factor never varies in the rest)",
                    ha="center", va="center", transform=ax.transAxes)
        n = law.score.holdout[split]
        ax.set_title(f"held out: {split.replace('_', ' ')} ({n['n_test']} runs"
                     + (f", {n['n_left_out']} unscoreable" if n["n_left_out"] else "") + ")", fontsize=10)
        ax.set_xlabel(f"actual {law.target} (%)")
        ax.set_ylabel(f"predicted {law.target} (%)")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
