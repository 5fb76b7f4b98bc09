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


def _unit(law) -> str:
    return getattr(law, "data_unit", "hours")


def data_text(value: float, unit: str = "hours") -> str:
    """``5000 h`` or ``1.2e+07 images``."""
    return f"{value:.4g} h" if unit == "hours" else f"{value:.3g} images"


def _reach_text(r: dict, unit: str) -> str:
    from .calibration import describe_reach

    return describe_reach(r, "data" if unit == "hours" else "images")


def _price(n, d, r, unit, patch, cost_options):
    """GPU-hours of a configuration (None when the throughput table cannot price it)."""
    from .units import gpu_hours

    try:
        return gpu_hours(n, d, r, unit=unit, patch_size=int(round(patch)), **(cost_options or {}))
    except (OSError, ValueError, KeyError) as exc:  # no table, a patch size without registry models
        return {"error": f"{type(exc).__name__}: {exc}"}


def projections_table(law: ScalingLaw, projections, cost_options: dict | None = None) -> list[dict]:
    rows = []
    for label, n, d, r in projections:
        with warnings.catch_warnings():  # the reach is said in the table itself
            warnings.simplefilter("ignore", ExtrapolationWarning)
            p = law.project(n, d, r)
            by_form = {s.name: float(law.alternative(s.name).predict(n, d, r).estimate) for s in law.scores}
        rows.append({
            "label": label, "params": n, "hours": d, "img_size": r, "estimate": p.estimate,
            "lower": p.lower, "upper": p.upper, "compute": float(compute_cost(n, d, r, law.patch_size)),
            "by_form": by_form, "reach": p.reach, "reach_text": _reach_text(p.reach, _unit(law)),
            "cost": _price(n, d, r, _unit(law), law.patch_size, cost_options),
        })
    return rows


def _fmt(x: float) -> str:
    return f"{x:.2f}" if np.isfinite(x) else "n/a"


def _gpu_text(cost: dict | None) -> str:
    if not cost or "gpu_hours" not in cost:
        return "n/a"
    return f"{cost['gpu_hours']:,.0f} GPU-h" + ("" if cost["fits_one_gpu"] else " (needs sharding)")


def _edges(solution: dict) -> list[str]:
    b = solution.get("bounds") or {}
    return [k for k in ("params", "hours", "img_size") if k in b and solution[k] >= b[k][1] * 0.98]


def _solve_text(law, solution: dict) -> str:
    """One line: the cheapest setting, its prediction, its cost and how far it extrapolates."""
    unit = _unit(law)
    pr = solution["prediction"]
    edges = _edges(solution)
    names = {"params": "parameters", "hours": "data" if unit == "hours" else "images", "img_size": "resolution"}
    text = (f"{solution['params'] / 1e6:.4g}M params, {data_text(solution['hours'], unit)}, "
            f"{solution['img_size']:.0f} px: predicted {pr.estimate:.2f} [{pr.lower:.2f}, {pr.upper:.2f}], "
            f"{_gpu_text(solution.get('cost'))}; {_reach_text(pr.reach, unit) if hasattr(pr, 'reach') else ''}")
    if edges:
        text += f"; at the edge of the search grid ({', '.join(names[k] for k in edges)})"
    return text


def _forms_section(law, splits) -> list[str]:
    md = ["## Forms compared", "",
          "Chosen by extrapolation: fit on all runs but the held-out ones, RMSE (points of accuracy) on the "
          "held-out runs (in brackets: the mean signed error, predicted - actual, and the number of runs scored); "
          "the mean RMSE over splits decides (ties within 1% go to fewer parameters). Held-out runs at a "
          "factor value the training part never varies (e.g. resolutions other models never ran at) cannot be "
          "scored and are left out.", ""]
    dropped = [k for k in law.scores[0].holdout if k not in splits]
    if dropped:
        md += [f"Not scored: the split(s) {', '.join(dropped)} (no held-out run could be scored there).", ""]
    if not splits:
        md += ["No held-out split could be scored, so the form with the lowest in-sample RMSE was chosen.", "",
               "| form | params | in-sample RMSE |", "|---|---|---|"]
        for s in sorted(law.scores, key=lambda s: s.rmse_in_sample):
            name = f"**{s.name}** (chosen)" if s.name == law.name else s.name
            md.append(f"| {name} | {s.n_params} | {_fmt(s.rmse_in_sample)} |")
        return md
    md += ["| form | params | in-sample RMSE | " + "".join(f"held out: {s} | " for s in splits) + "mean held-out |",
           "|---|---|---|" + "---|" * len(splits) + "---|"]
    for s in sorted(law.scores, key=lambda s: s.holdout_rmse):
        cells = [(f"{_fmt(s.holdout[k]['rmse'])} ({s.holdout[k]['bias']:+.2f}, n={s.holdout[k]['n_test']})"
                  if np.isfinite(s.holdout[k]["rmse"]) else "not scored (too few runs)") for k in splits]
        name = f"**{s.name}** (chosen)" if s.name == law.name else s.name
        md.append(f"| {name} | {s.n_params} | {_fmt(s.rmse_in_sample)} | " + "".join(c + " | " for c in cells)
                  + (f"{_fmt(s.holdout_rmse)} |" if np.isfinite(s.holdout_rmse) else "not scored |"))
    return md


def _chosen_caution(law, projections, splits) -> list[str]:
    """When the chosen form's own (seed-noise) band is narrower than its held-out error, or untested, say so."""
    if not splits:
        return ["**Caution:** no held-out split could be scored (the table does not vary the held-out factors "
                "enough), so how well the chosen law extrapolates is untested: its bootstrap band is a lower bound "
                "on the uncertainty of an extrapolation.", ""]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExtrapolationWarning)
        half_band = max((p.upper - p.lower) / 2 for p in (law.predict(n, d, r) for _, n, d, r in projections))
    if law.score.holdout_rmse <= half_band:
        return []
    biases = [h["bias"] for h in law.score.holdout.values() if np.isfinite(h["rmse"])]
    return [f"**Caution:** on held-out runs the chosen law missed by {law.score.holdout_rmse:.2f} points RMSE "
            f"(mean signed error {np.mean(biases):+.2f}), more than the half-width of its bootstrap band "
            f"({half_band:.2f}), which covers seed noise only: "
            + ("the projections below use the calibrated bounds instead." if law.calibration is not None
               else "the band is a lower bound on the uncertainty of an extrapolation."), ""]


def _calibration_section(law) -> list[str]:
    cal = law.calibration
    if cal is None:
        return []
    md = ["## How far the projections can be trusted", "",
          "Projections are the weighted mean of an ensemble of forms, each fitted on the runs within the "
          "calibration fit's span of data below the largest; their bounds add the members' spread (the choice of "
          "form), the calibrated extrapolation error, scaled by how far each projection reaches, and one run's "
          f"seed-to-seed spread ({cal.seed_sd:.2f} points). See `mae_fast.scaling.calibration`.", ""]
    sp = cal.split
    if "test_hours" in sp:
        unit = _unit(law)
        md += [f"Calibration on the fitted rows only: fit on runs up to {data_text(sp['train_max_hours'], unit)}, "
               f"predict the {sp['n_test']} runs at {data_text(sp['test_hours'], unit)} "
               f"({math.exp(sp['log_ratio']):.3g}x the data). Ensemble error there: RMSE {sp['ensemble_rmse']:.2f}, "
               f"mean {sp['ensemble_bias']:+.2f}, spread {sp['ensemble_sd']:.2f} points.", "",
               "| form | calibration RMSE | mean error | weight |", "|---|---|---|---|"]
        weights: dict[str, float] = {}
        for m in cal.members:
            weights[m.form] = weights.get(m.form, 0.0) + m.weight
        for name, f in sp["forms"].items():
            md.append(f"| {name} | {f['rmse']:.2f} | {f['bias']:+.2f} | {weights.get(name, 0.0):.2f} |")
    else:
        md += ["**Caution:** the table has fewer than three data sizes, so no calibration split exists: the "
               "bounds hold the members' spread and seed noise only, not the error of extrapolating."]
    return md + [""]


def write_report(table: ResultsTable, law: ScalingLaw, out_dir: str | Path,
                 projections: Sequence[tuple[str, float, float, float]] = DEFAULT_PROJECTIONS,
                 target_accuracy: float | None = None, cost_options: dict | None = None) -> str:
    """Write report.md, fit.json and PNG plots into ``out_dir``; return the console summary.

    ``cost_options`` go to :func:`mae_fast.scaling.units.gpu_hours` (``fps``, ``epochs``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unit = _unit(law)
    proj = projections_table(law, projections, cost_options)
    solution, solve_error = None, None
    if target_accuracy is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExtrapolationWarning)
                solution = law.solve(target_accuracy, calibrated=True)
            solution["cost"] = _price(solution["params"], solution["hours"], solution["img_size"], unit,
                                      law.patch_size, cost_options)
        except UnreachableTarget as exc:
            solve_error = str(exc)

    plots = {
        "accuracy_vs_hours.png": plot_accuracy_vs_hours(
            table, law, out / "accuracy_vs_hours.png", extend_to_hours=max(p[2] for p in projections)),
        "projections.png": plot_projections(law, projections, out / "projections.png", target_accuracy, solution),
        "holdout.png": plot_holdout(table, law, out / "holdout.png"),
    }
    band = f"{law.ci:.0%}"
    splits = [k for k in law.scores[0].holdout if any(np.isfinite(s.holdout[k]["rmse"]) for s in law.scores)]
    md = [f"# Scaling fit: {table.source}", ""]
    dr = law.data_range
    md += [f"{dr['runs']} runs; params {dr['params'][0] / 1e6:.3g}M to {dr['params'][1] / 1e6:.3g}M, "
           f"data {data_text(dr['hours'][0], unit)} to {data_text(dr['hours'][1], unit)} (data axis: `{unit}`), "
           f"img_size {dr['img_size'][0]:g} to {dr['img_size'][1]:g}; target `{law.target}`"
           + (f"; protocol `{law.protocol}`" if getattr(law, "protocol", "") else "") + ".", ""]
    md += _forms_section(law, splits)
    md += ["", "## Chosen law", "", f"`{law.form.formula}`", "",
           f"Parameters with {band} bootstrap intervals ({len(law.boot_thetas)} resamples of "
           f"{'seeds within each configuration' if law.bootstrap_by == 'seeds' else 'whole configurations'}); "
           f"n = ln(N/1e8), d = ln({'hours/100' if unit == 'hours' else 'images/100'}), r = ln(img_size/224):", ""]
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
    md += _chosen_caution(law, projections, splits)
    md += _calibration_section(law)
    md += ["## Projections", "",
           f"Estimate and {band} bounds of the calibrated ensemble, how far each extrapolates beyond the largest "
           "fitted run, and its pretraining cost in GPU-hours (see `mae_fast.scaling.units`); the other columns "
           "are each form's own point estimate. Compute C = N x data x "
           f"(img_size/{law.patch_size:g})^2 (see `compute_cost`).", "",
           "| setting | estimate | bounds | extrapolates | GPU-hours | " + " | ".join(s.name for s in law.scores)
           + " | C |", "|---|---|---|---|---|" + "---|" * len(law.scores) + "---|"]
    for p in proj:
        md.append(f"| {p['label']} | **{p['estimate']:.2f}** | [{p['lower']:.2f}, {p['upper']:.2f}] | "
                  f"{p['reach_text']} | {_gpu_text(p['cost'])} | "
                  + " | ".join(f"{p['by_form'][s.name]:.2f}" for s in law.scores) + f" | {p['compute']:.3g} |")
    priced = [p["cost"] for p in proj if "gpu_hours" in p["cost"]]
    if priced:
        c = priced[0]
        md += ["", f"GPU-hours on one {c['device']}: {c['epochs']:g} pass(es) over the data"
               + (f" at {c['fps']:g} frame/s" if unit == "hours" else "")
               + ", each image at the measured (or FLOP-scaled) training throughput of the nearest measured "
               "model and resolution; 'needs sharding' where weights and optimizer state exceed one GPU."]
    if target_accuracy is not None:
        md += ["", f"### Cheapest setting for {law.target} >= {target_accuracy:g}%", ""]
        if solution:
            md.append(_solve_text(law, solution) + f" (C = {solution['compute']:.3g}; searched from the smallest "
                      "fitted params, data and img_size up to 10x, 100x and 2x the largest).")
            if _edges(solution):
                md.append(f"It sits at the upper search bound of {', '.join(_edges(solution))}: the law sees no "
                          "diminishing returns there, so the cheapest point is wherever the search stops.")
        else:
            md.append(f"Unreachable: {solve_error}")
    md += ["", "## Plots", ""] + [f"![{k}]({k})" for k in plots] + [""]
    (out / "report.md").write_text("\n".join(md))

    fit_json = law.to_dict()
    fit_json["projections"] = [{k: v for k, v in p.items()} for p in proj]
    if solution:
        fit_json["solution"] = {**solution, "prediction": list(solution["prediction"]),
                                "reach": getattr(solution["prediction"], "reach", None)}
    (out / "fit.json").write_text(json.dumps(fit_json, indent=1, default=_jsonable))
    return _console(table, law, splits, proj, target_accuracy, solution, solve_error, out, plots)


def _jsonable(v):
    return v.tolist() if isinstance(v, np.ndarray) else float(v)


def _console(table, law, splits, proj, target_accuracy, solution, solve_error, out, plots) -> str:
    unit = _unit(law)
    band = f"{law.ci:.0%}"
    lines = [f"table: {table.source} ({len(table)} runs; data axis: {unit}"
             + (f"; protocol {law.protocol}" if getattr(law, "protocol", "") else "") + ")",
             "forms (held-out RMSE, mean over splits " + ", ".join(splits) + "):" if splits
             else "forms (no held-out split could be scored; in-sample RMSE):"]
    for s in sorted(law.scores, key=lambda s: (s.holdout_rmse, s.rmse_in_sample)):
        held = (f"{_fmt(s.holdout_rmse):>6s}  (" + ", ".join(f"{k} {_fmt(s.holdout[k]['rmse'])}" for k in splits)
                + "; ") if splits else "  ("
        lines.append(f"  {s.name:16s} {held}in-sample {_fmt(s.rmse_in_sample)})"
                     + ("  <- chosen" if s.name == law.name else ""))
    lines.append("chosen " + law.describe())
    lines.append(f"projections (calibrated ensemble, {band} bounds" if law.calibration is not None
                 else f"projections ({band} band")
    priced = [p["cost"] for p in proj if "gpu_hours" in p["cost"]]
    if priced:
        c = priced[0]
        lines[-1] += (f"; GPU-hours on one {c['device']}, {c['epochs']:g} pass(es) over the data"
                      + (f" at {c['fps']:g} frame/s" if unit == "hours" else ""))
    lines[-1] += "):"
    for p in proj:
        lines.append(f"  {p['label']:36s} {p['estimate']:6.2f} [{p['lower']:.2f}, {p['upper']:.2f}]  "
                     f"{_gpu_text(p['cost'])}; {p['reach_text']}")
    if target_accuracy is not None:
        if solution:
            lines.append(f"cheapest for {target_accuracy:g}%: " + _solve_text(law, solution))
        else:
            lines.append(f"target {target_accuracy:g}%: {solve_error}")
    lines.append(f"wrote {out / 'report.md'}, fit.json, " + ", ".join(plots))
    return "\n".join(lines)
