"""The fit report: a console summary, ``report.md``, ``fit.json`` and the plots in one directory."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .laws import ExtrapolationWarning, ScalingLaw, UnreachableTarget, compute_cost
from .plots import plot_accuracy_vs_hours, plot_holdout, plot_projections
from .table import ResultsTable

__all__ = ["DEFAULT_PROJECTIONS", "projections_table", "write_report"]

# (label, params, hours, img_size)
DEFAULT_PROJECTIONS: list[tuple[str, float, float, float]] = [
    ("ViT-H/14 (632M), 476 px, 5,000 h", 632e6, 5000.0, 476.0),
    ("2.5B params, 952 px, 20,000 h", 2.5e9, 20000.0, 952.0),
]


def projections_table(law: ScalingLaw, projections) -> list[dict]:
    rows = []
    for label, n, d, r in projections:
        p = law.predict(n, d, r)
        with warnings.catch_warnings():  # the chosen law's prediction has warned already
            warnings.simplefilter("ignore", ExtrapolationWarning)
            by_form = {s.name: float(law.alternative(s.name).predict(n, d, r).estimate) for s in law.scores}
        rows.append({
            "label": label, "params": n, "hours": d, "img_size": r, "estimate": p.estimate,
            "lower": p.lower, "upper": p.upper, "compute": float(compute_cost(n, d, r, law.patch_size)),
            "by_form": by_form,
        })
    return rows


def _fmt(x: float) -> str:
    return f"{x:.2f}" if np.isfinite(x) else "n/a"


def write_report(table: ResultsTable, law: ScalingLaw, out_dir: str | Path,
                 projections: Sequence[tuple[str, float, float, float]] = DEFAULT_PROJECTIONS,
                 target_accuracy: float | None = None) -> str:
    """Write report.md, fit.json and PNG plots into ``out_dir``; return the console summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    proj = projections_table(law, projections)
    solution, solve_error = None, None
    if target_accuracy is not None:
        try:
            solution = law.solve(target_accuracy)
        except UnreachableTarget as exc:
            solve_error = str(exc)

    plots = {
        "accuracy_vs_hours.png": plot_accuracy_vs_hours(
            table, law, out / "accuracy_vs_hours.png", extend_to_hours=max(p[2] for p in projections)),
        "projections.png": plot_projections(law, projections, out / "projections.png", target_accuracy, solution),
        "holdout.png": plot_holdout(table, law, out / "holdout.png"),
    }
    band = f"{law.ci:.0%}"
    splits = list(law.scores[0].holdout)
    md = [f"# Scaling fit: {table.source}", ""]
    dr = law.data_range
    md += [f"{dr['runs']} runs; params {dr['params'][0] / 1e6:.3g}M to {dr['params'][1] / 1e6:.3g}M, "
           f"hours {dr['hours'][0]:g} to {dr['hours'][1]:g}, img_size {dr['img_size'][0]:g} to {dr['img_size'][1]:g}; "
           f"target `{law.target}`.", ""]
    md += ["## Forms compared", "",
           "Chosen by extrapolation: fit on all runs but the held-out ones, RMSE (points of accuracy) on the "
           "held-out runs (in brackets: the mean signed error, predicted - actual, and the number of runs scored); "
           "the mean RMSE over splits decides (ties within 1% go to fewer parameters). Held-out runs at a "
           "factor value the training part never varies (e.g. resolutions other models never ran at) cannot be "
           "scored and are left out.", "",
           "| form | params | in-sample RMSE | " + "".join(f"held out: {s} | " for s in splits) + "mean held-out |",
           "|---|---|---|" + "---|" * len(splits) + "---|"]
    for s in sorted(law.scores, key=lambda s: s.holdout_rmse):
        cells = [f"{_fmt(s.holdout[k]['rmse'])} ({s.holdout[k].get('bias', math.nan):+.2f}, n={s.holdout[k]['n_test']})"
                 for k in splits]
        name = f"**{s.name}** (chosen)" if s.name == law.name else s.name
        md.append(f"| {name} | {s.n_params} | {_fmt(s.rmse_in_sample)} | " + "".join(c + " | " for c in cells)
                  + f"{_fmt(s.holdout_rmse)} |")
    md += ["", "## Chosen law", "", f"`{law.form.formula}`", "",
           f"Parameters with {band} bootstrap intervals ({len(law.boot_thetas)} resamples of "
           f"{'seeds within each configuration' if law.bootstrap_by == 'seeds' else 'whole configurations'}); "
           "n = ln(N/1e8), d = ln(hours/100), r = ln(img_size/224):", ""]
    bands = law.param_bands()
    md += ["| parameter | value | band |", "|---|---|---|"]
    for k, v in law.params_dict().items():
        b = bands.get(k)
        md.append(f"| {k} | {v:.4g} | " + (f"[{b[0]:.4g}, {b[1]:.4g}]" if b else "") + " |")
    md += ["", f"Ceiling (accuracy as N, D, R grow without bound): {law.ceiling:.2f}%.", ""]
    constant = [f for f, on in zip(("params", "hours", "img_size"), law.active) if not on]
    if constant:
        md += [f"**Note:** {', '.join(constant)} never varies in this table, so the law has no term for it and "
               "its projections ignore it.", ""]
    md += ["## Projections", "",
           f"Estimate and {band} band of the chosen law; the other forms' point estimates show how much the choice "
           "of form matters (the band covers seed noise only, not that choice). Compute C = N x hours x "
           f"(img_size/{law.patch_size:g})^2 (see `compute_cost`).", "",
           "| setting | estimate | band | " + " | ".join(s.name for s in law.scores) + " | C |",
           "|---|---|---|" + "---|" * len(law.scores) + "---|"]
    for p in proj:
        md.append(f"| {p['label']} | **{p['estimate']:.2f}** | [{p['lower']:.2f}, {p['upper']:.2f}] | "
                  + " | ".join(f"{p['by_form'][s.name]:.2f}" for s in law.scores) + f" | {p['compute']:.3g} |")
    half_band = max((p["upper"] - p["lower"]) / 2 for p in proj)
    if not math.isfinite(law.score.holdout_rmse):
        md += ["", "**Caution:** no held-out split could be scored (the table does not vary the held-out factors "
               "enough), so how well the law extrapolates is untested: the bands are a lower bound on the "
               "uncertainty of an extrapolation."]
    elif law.score.holdout_rmse > half_band:
        biases = [h["bias"] for h in law.score.holdout.values() if np.isfinite(h["rmse"])]
        md += ["", f"**Caution:** on held-out runs the chosen law missed by {law.score.holdout_rmse:.2f} points RMSE "
               f"(mean signed error {np.mean(biases):+.2f}), more than the half-width of these bands "
               f"({half_band:.2f}): the bands are a lower bound on the uncertainty of an extrapolation."]
    if target_accuracy is not None:
        md += ["", f"### Cheapest setting for {law.target} >= {target_accuracy:g}%", ""]
        if solution:
            pr = solution["prediction"]
            md.append(f"params {solution['params'] / 1e6:.4g}M, {solution['hours']:.4g} h, "
                      f"{solution['img_size']:.0f} px: C = {solution['compute']:.3g}, predicted "
                      f"{pr.estimate:.2f} [{pr.lower:.2f}, {pr.upper:.2f}] (searched from the smallest "
                      "fitted params, hours and img_size up to 10x, 100x and 2x the largest).")
            dr = law.data_range
            edges = [k for k, hi in (("params", 10 * dr["params"][1]), ("hours", 100 * dr["hours"][1]),
                                     ("img_size", 2 * dr["img_size"][1])) if solution[k] >= hi * 0.98]
            if edges:
                md.append(f"It sits at the upper search bound of {', '.join(edges)}: the law sees no diminishing "
                          "returns there, so the cheapest point is wherever the search stops.")
        else:
            md.append(f"Unreachable: {solve_error}")
    md += ["", "## Plots", ""] + [f"![{k}]({k})" for k in plots] + [""]
    (out / "report.md").write_text("\n".join(md))

    fit_json = law.to_dict()
    fit_json["projections"] = [{k: v for k, v in p.items()} for p in proj]
    if solution:
        fit_json["solution"] = {**solution, "prediction": list(solution["prediction"])}
    (out / "fit.json").write_text(json.dumps(fit_json, indent=1, default=float))

    lines = [f"table: {table.source} ({len(table)} runs)",
             "forms (held-out RMSE, mean over splits " + ", ".join(splits) + "):" if splits
             else "forms (no held-out split could be scored):"]
    for s in sorted(law.scores, key=lambda s: s.holdout_rmse):
        lines.append(f"  {s.name:16s} {_fmt(s.holdout_rmse):>6s}  ("
                     + ", ".join(f"{k} {_fmt(s.holdout[k]['rmse'])}" for k in splits)
                     + f"; in-sample {_fmt(s.rmse_in_sample)})" + ("  <- chosen" if s.name == law.name else ""))
    lines.append("chosen " + law.describe())
    lines.append(f"projections ({band} band):")
    for p in proj:
        lines.append(f"  {p['label']:36s} {p['estimate']:6.2f} [{p['lower']:.2f}, {p['upper']:.2f}]   "
                     "other forms: " + ", ".join(f"{k} {v:.1f}" for k, v in p["by_form"].items() if k != law.name))
    if target_accuracy is not None:
        if solution:
            lines.append(f"cheapest for {target_accuracy:g}%: {solution['params'] / 1e6:.4g}M params, "
                         f"{solution['hours']:.4g} h, {solution['img_size']:.0f} px (C={solution['compute']:.3g})")
        else:
            lines.append(f"target {target_accuracy:g}%: {solve_error}")
    lines.append(f"wrote {out / 'report.md'}, fit.json, " + ", ".join(plots))
    return "\n".join(lines)
