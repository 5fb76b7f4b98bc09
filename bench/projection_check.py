"""Check the calibrated projections on a split you can see: fit on the runs up to 50 h, predict the 500 h runs.

Reads the shared human-like-video results table (../shared/data/humanlike_vits_finetune_upto500h.csv; a benchmark,
not a test), fits on the runs with hours <= 50 (the calibration split inside the fit uses only those rows: fit
<= 5 h, predict 50 h), projects every 500 h run and scores the projections: mean absolute error, mean signed
error, how many runs fall inside the 90% bounds, and the bounds' mean width. The old projection (the chosen form
with its seed-noise bootstrap band) is scored alongside.

    python bench/projection_check.py [--table PATH] [--fit-upto 50] [--out bench/results/projection-check-DATE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "humanlike_vits_finetune_upto500h.csv"


def score(actual, est, lo, hi) -> dict:
    err = np.asarray(est) - actual
    inside = (actual >= lo) & (actual <= hi)
    return {"mae": float(np.mean(np.abs(err))), "mean_error": float(np.mean(err)),
            "inside": int(inside.sum()), "n": int(len(actual)), "mean_width": float(np.mean(np.asarray(hi) - lo))}


def seed_floor(test) -> float:
    """MAE of each held-out configuration's own mean of its runs: the error seed noise leaves to a perfect law."""
    y, key = test["top1"], test.group_ids()
    return float(np.mean([abs(y[i] - y[key == key[i]].mean()) for i in range(len(y))]))


def per_config_line(fitted_table, test, lo_hours) -> dict:
    """A diagnostic, not an ensemble member: each configuration's straight line in log hours through its runs
    from ``lo_hours`` up, extrapolated to the held-out runs of that configuration."""
    est = np.full(len(test), np.nan)
    for i in range(len(test)):
        m = ((fitted_table["params"] == test["params"][i]) & (fitted_table["img_size"] == test["img_size"][i])
             & (fitted_table["hours"] >= lo_hours * (1 - 1e-9)))
        c = np.polyfit(np.log(fitted_table["hours"][m]), fitted_table["top1"][m], 1)
        est[i] = np.polyval(c, np.log(test["hours"][i]))
    err = est - test["top1"]
    return {"mae": float(np.mean(np.abs(err))), "mean_error": float(np.mean(err))}


def main(argv=None) -> int:
    from mae_fast.scaling import fit, load_results
    from mae_fast.scaling.laws import ExtrapolationWarning

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", default=str(SHARED))
    ap.add_argument("--fit-upto", type=float, default=50.0)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"projection-check-{datetime.date.today()}"))
    args = ap.parse_args(argv)
    table = load_results(args.table)
    fitted = table["hours"] <= args.fit_upto * (1 + 1e-9)
    held = table["hours"] == table["hours"].max()
    law = fit(table.subset(fitted), n_boot=args.n_boot)
    test = table.subset(held)
    n, d, r, y = test["params"], test["hours"], test["img_size"], test["top1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExtrapolationWarning)
        proj = law.project(n, d, r)
        old = law.predict(n, d, r)
        from mae_fast.scaling.calibration import calibrate

        spread = calibrate(table.subset(fitted), bounds="spread").project(n, d, r)
        conformal = calibrate(table.subset(fitted), bounds="conformal").project(n, d, r)
    result = {
        "table": str(args.table), "fit_upto_hours": args.fit_upto, "predicted_hours": float(d.max()),
        "n_fitted": int(fitted.sum()), "ci": law.ci,
        "calibrated": score(y, proj.estimate, proj.lower, proj.upper),
        "calibrated_spread_bounds": score(y, spread.estimate, spread.lower, spread.upper),
        "calibrated_conformal_bounds": score(y, conformal.estimate, conformal.lower, conformal.upper),
        "chosen_form_bootstrap": {"form": law.name, **score(y, old.estimate, old.lower, old.upper)},
        "goal_mae": 1.5,
        "seed_floor_mae": seed_floor(test),
        "per_config_line": {"from_hours": float(d.max()) / 100,
                            **per_config_line(table.subset(fitted), test, float(d.max()) / 100)},
        "calibration": law.calibration.to_dict(),
        "runs": [{"run": str(test["run"][i]), "top1": float(y[i]), "estimate": float(proj.estimate[i]),
                  "lower": float(proj.lower[i]), "upper": float(proj.upper[i])} for i in range(len(y))],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    c, o, w = result["calibrated"], result["chosen_form_bootstrap"], result["calibrated_spread_bounds"]
    q = result["calibrated_conformal_bounds"]
    sp = law.calibration.split
    md = [f"# Projection check: fit <= {args.fit_upto:g} h, predict the {d.max():g} h runs", "",
          f"Table: `{Path(args.table).name}`; {result['n_fitted']} runs fitted, {c['n']} held out. The calibration "
          f"split uses the fitted rows only (fit <= {sp['train_max_hours']:g} h, predict {sp['test_hours']:g} h).", "",
          "| projection | MAE (points) | mean error | inside 90% bounds | mean width |", "|---|---|---|---|---|",
          f"| calibrated ensemble | {c['mae']:.2f} | {c['mean_error']:+.2f} | {c['inside']}/{c['n']} | {c['mean_width']:.2f} |",
          f"| calibrated ensemble, bounds=\"conformal\" | {q['mae']:.2f} | {q['mean_error']:+.2f} | {q['inside']}/{q['n']} | "
          f"{q['mean_width']:.2f} |",
          f"| calibrated ensemble, bounds=\"spread\" | {w['mae']:.2f} | {w['mean_error']:+.2f} | {w['inside']}/{w['n']} | "
          f"{w['mean_width']:.2f} |",
          f"| chosen form ({o['form']}) + seed bootstrap | {o['mae']:.2f} | {o['mean_error']:+.2f} | "
          f"{o['inside']}/{o['n']} | {o['mean_width']:.2f} |", "",
          f"Goal: MAE <= {result['goal_mae']:g}. Seed floor (each held-out configuration's own mean): MAE "
          f"{result['seed_floor_mae']:.2f}. Calibration split: ensemble mean error {sp['ensemble_bias']:+.2f}, RMSE "
          f"{sp['ensemble_rmse']:.2f}. Diagnostic, not a member: each configuration's straight line in log hours "
          f"through its {d.max() / 100:g}..{args.fit_upto:g} h runs: MAE {result['per_config_line']['mae']:.2f}, "
          f"mean error {result['per_config_line']['mean_error']:+.2f}.", "",
          "| run | top1 | estimate | bounds |", "|---|---|---|---|"]
    md += [f"| {row['run']} | {row['top1']:.2f} | {row['estimate']:.2f} | [{row['lower']:.2f}, {row['upper']:.2f}] |"
           for row in result["runs"]]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md[:10]))
    print(f"wrote {out.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
