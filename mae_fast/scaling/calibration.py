"""Projections with bounds calibrated for extrapolation: an ensemble of forms and an error that grows with reach.

A single chosen form with bootstrap bands covers seed noise only: it says nothing about the error of picking
that form, nor about how a law fitted on small data bends further out. Here:

* **Members.** Each form of :data:`DEFAULT_ENSEMBLE` (the two least-squares forms of :mod:`.laws` and the
  same two in logit space, whose curves are convex in log data at low accuracy, as learning curves are before
  they saturate; any form of :data:`ENSEMBLE_FORMS` can be asked for), fitted on the *window*: the runs whose
  data size lies within the calibration fit's span of data below the largest (for a calibration fit on
  ``lo..hi``, the runs from ``H * lo / hi`` to ``H``). A member is thus made the way the calibration split
  scores it (the same span of data, extrapolated the same distance), and it follows the local slope in log data
  where the projection starts rather than an average over a curve that bends. Without a calibration split
  (fewer than three data sizes) the members are fitted on every run.
* **Calibration split.** Only the fitted rows are used: with ``H`` the largest data size, fit on the runs up to
  ``H / 10`` and predict the runs at ``H`` (a one-decade extrapolation, as far as projecting ``H`` to ``10 H``);
  when fewer than two data sizes lie below ``H / 10``, on every run below ``H``. Each form's error there
  gives its weight, Akaike-like on the calibration error: ``w ~ (mse / min mse) ** (-k / 2)`` with ``k`` the
  number of configurations scored.
* **Point.** The weighted mean of the members' predictions.
* **Bounds** (``bounds=``), scaled by ``reach / reach_cal``, how far the projection extrapolates in log units
  relative to the calibration split:

  - ``"rmse"`` (default): ``estimate +- z * s``, ``s^2 = spread^2 + max(rmse_cal * reach / reach_cal, seed)^2``:
    the members' weighted spread (the error of choosing a form) and the ensemble's root-mean-square error on the
    calibration split (bias included; per-run errors, so seed noise is in it), never below the seed-to-seed
    standard deviation of one run (a projection is compared with single runs);
  - ``"conformal"``: split-conformal, ``half^2 = (z spread)^2 + max(q * reach / reach_cal, z seed)^2`` with ``q``
    the ``ceil((n + 1) ci)``-th smallest absolute calibration error (distribution-free; with few calibration
    runs it is their largest error, so it is the widest);
  - ``"spread"``: the calibration errors' standard deviation around their mean instead of their RMSE, plus the
    seed term: narrower, but blind to a bias the ensemble shares.

  ``reach`` is the sum over data, parameters and resolution of ``max(0, ln(value / largest fitted value))``;
  the calibration measures data extrapolation only, and the same error per log unit is assumed for the others.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from .laws import FACTORS, FORMS, MIN_LOG_SPAN, Form, LinearLogForm, _active, features

__all__ = ["ENSEMBLE_FORMS", "DEFAULT_ENSEMBLE", "BOUNDS", "Calibration", "Projection", "calibrate",
           "conformal_quantile", "reach", "describe_reach", "calibration_split"]


class LogitLinearForm(LinearLogForm):
    """logit(top1 / 100) linear in products of log factors (least squares in logit space)."""

    family = "logit"

    def fit(self, x, top1, active, start=None):
        p = np.clip(np.asarray(top1, float) / 100.0, 1e-4, 1 - 1e-4)
        return super().fit(x, np.log(p / (1 - p)), active)

    def predict(self, theta, x):
        return 100.0 / (1.0 + np.exp(-super().predict(theta, x)))


ENSEMBLE_FORMS: dict[str, Form] = {
    **FORMS,
    "logit_additive": LogitLinearForm(
        "logit_additive", [(), (0,), (1,), (2,)], "logit(top1/100) = a + b_n n + c_d d + e_r r"),
    "logit_interaction": LogitLinearForm(
        "logit_interaction", [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2)],
        "logit(top1/100) = a + b_n n + c_d d + e_r r + f_nd n d + g_nr n r + h_dr d r"),
}


@dataclass
class Projection:
    """A calibrated projection: estimate, bounds (``ci``), and how far it extrapolates (``reach``)."""

    estimate: np.ndarray | float
    lower: np.ndarray | float
    upper: np.ndarray | float
    ci: float
    reach: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.estimate, self.lower, self.upper))


@dataclass
class Member:
    form: str
    rows: str  # "window" (the calibration fit's span of data, ending at the largest) or "all"
    theta: np.ndarray
    weight: float


@dataclass
class Calibration:
    members: list[Member]
    split: dict  # train_max_hours, test_hours, log_ratio, n_train, n_test, per-form rmse/bias, ensemble errors
    sd_cal: float  # spread (sd around the mean) of the ensemble's calibration errors; nan when no split
    seed_sd: float  # pooled within-configuration sd of one run
    largest: dict  # largest fitted value of each factor
    ci: float = 0.9
    bounds: str = "rmse"  # "rmse": calibration errors' RMSE; "conformal": their quantile; "spread": their sd

    def point_and_spread(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        preds = np.stack([np.clip(ENSEMBLE_FORMS[m.form].predict(m.theta, x), 0.0, 100.0) for m in self.members])
        w = np.array([m.weight for m in self.members]).reshape((-1,) + (1,) * (preds.ndim - 1))
        est = (w * preds).sum(0)
        return est, np.sqrt((w * (preds - est) ** 2).sum(0))

    def project(self, params, hours, img_size) -> Projection:
        x = features(params, hours, img_size)
        est, spread = self.point_and_spread(x)
        r = reach(self.largest, params, hours, img_size)
        log_reach = np.asarray(r["log_reach"], float)
        z = float(stats.norm.ppf(0.5 + self.ci / 2))
        calibrated = math.isfinite(self.sd_cal)
        scale = log_reach / self.split["log_ratio"] if calibrated else 0.0 * log_reach
        if self.bounds == "conformal" and calibrated:
            # the calibration errors' quantile is already a half-width at the stated level; seed noise is its floor
            half = np.sqrt((z * spread) ** 2 + np.maximum(self.split["ensemble_q"] * scale, z * self.seed_sd) ** 2)
        elif self.bounds == "rmse" and calibrated:
            # per-run calibration errors include seed noise: it is the floor inside the data
            ext = self.split["ensemble_rmse"] * scale
            half = z * np.sqrt(spread ** 2 + np.maximum(ext, self.seed_sd) ** 2)
        else:
            ext = self.sd_cal * scale if calibrated else 0.0 * log_reach
            half = z * np.sqrt(spread ** 2 + ext ** 2 + self.seed_sd ** 2)
        lo, hi = np.clip(est - half, 0.0, 100.0), np.clip(est + half, 0.0, 100.0)
        if np.ndim(est) == 0:
            return Projection(float(est), float(lo), float(hi), self.ci, r)
        return Projection(est, lo, hi, self.ci, r)

    def to_dict(self) -> dict:
        return {"members": [{"form": m.form, "rows": m.rows, "weight": m.weight} for m in self.members],
                "split": self.split, "sd_cal": self.sd_cal, "seed_sd": self.seed_sd, "largest": self.largest,
                "ci": self.ci}


def reach(largest: dict, params, hours, img_size) -> dict:
    """How far (params, hours, img_size) lies beyond the largest fitted value of each factor (ratios >= 1)."""
    out = {}
    total = 0.0
    for k, v in zip(FACTORS, (params, hours, img_size)):
        ratio = np.maximum(np.asarray(v, float) / largest[k], 1.0)
        out[k] = ratio if np.ndim(ratio) else float(ratio)
        total = total + np.log(ratio)
    out["log_reach"] = total if np.ndim(total) else float(total)
    return out


def describe_reach(r: dict, data_unit: str = "data") -> str:
    """E.g. "10x the data, 2x the resolution of any fitted run" (or "within the fitted runs")."""
    names = {"hours": f"the {data_unit}", "params": "the parameters", "img_size": "the resolution"}
    parts = [f"{float(r[k]):.3g}x {names[k]}" for k in ("hours", "params", "img_size") if float(r[k]) > 1.0 + 1e-6]
    return ", ".join(parts) + " of any fitted run" if parts else "within the fitted runs"


def calibration_split(hours: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(train, test) masks: fit on runs up to H/10 (or below H), predict those at the largest data size H."""
    levels = np.unique(np.round(hours, 9))
    if len(levels) < 3:
        return None
    top = levels[-1]
    test = np.isclose(hours, top, rtol=1e-9)
    train = hours <= top / 10 * (1 + 1e-9)
    if len(np.unique(np.round(hours[train], 9))) < 2:
        train = ~test
    return train, test


def _pooled_seed_sd(groups: np.ndarray, y: np.ndarray) -> float:
    num, dof = 0.0, 0
    for g in np.unique(groups):
        v = y[groups == g]
        if len(v) > 1:
            num += float(((v - v.mean()) ** 2).sum())
            dof += len(v) - 1
    return math.sqrt(num / dof) if dof else 0.0


def _window_mask(hours: np.ndarray, split: dict) -> np.ndarray:
    """The runs the projection members are fitted on: the calibration fit's span of data, ending at the largest.

    The calibration fits on data sizes ``lo..hi`` and predicts ``H``; the members are fitted on ``H * lo / hi .. H``,
    the window of the same span next to the projection, so that they are made the way the calibration scored
    them (a fit on the same span, extrapolated the same distance) and use the local slope in log data."""
    span = split["train_max_hours"] / split["train_min_hours"]
    return hours >= hours.max() / span * (1 - 1e-9)


def _fit_form(form: Form, x, y, mask):
    active = _active(x[mask])
    if mask.sum() <= form.n_free(active):
        return None
    return form.fit(x[mask], y[mask], active)


# The least-squares forms (fast: a fit is one lstsq). The saturating forms can be added with ``forms=``;
# each of their fits is a nonlinear search (hundreds of times slower) and on the shared human-like-video
# table their calibration error gives them about 1% of the weight.
DEFAULT_ENSEMBLE = ("log_additive", "log_interaction", "logit_additive", "logit_interaction")


BOUNDS = ("conformal", "rmse", "spread")


def conformal_quantile(abs_err: np.ndarray, ci: float) -> float:
    """Split-conformal half-width: the ceil((n + 1) ci)-th smallest absolute error (the largest when n is small)."""
    a = np.sort(np.asarray(abs_err, float))
    return float(a[min(len(a), math.ceil((len(a) + 1) * ci)) - 1])


def calibrate(table, target: str = "top1", ci: float = 0.9, forms=None, bounds: str = "rmse") -> Calibration:
    """Fit the ensemble's members on ``table`` and calibrate their extrapolation error on its own rows.

    ``bounds="rmse"`` (default) scales the ensemble's root-mean-square calibration error, its bias included;
    ``"conformal"`` its split-conformal quantile of absolute errors; ``"spread"`` only its standard deviation
    around its mean (narrower; honest only when the members' spread covers the bias, which a curved learning
    curve breaks)."""
    if bounds not in BOUNDS:
        raise ValueError(f"bounds must be one of {BOUNDS}, got {bounds!r}")
    forms = list(forms or DEFAULT_ENSEMBLE)
    unknown = [f for f in forms if f not in ENSEMBLE_FORMS]
    if unknown:
        raise ValueError(f"unknown form(s) {unknown}; known: {list(ENSEMBLE_FORMS)}")
    x = features(table["params"], table["hours"], table["img_size"])
    y = np.asarray(table[target], float)
    hours = np.asarray(table["hours"], float)
    groups = table.group_ids()
    split_masks = calibration_split(hours)
    split: dict = {"log_ratio": math.nan}
    mse: dict[str, float] = {}
    cal_pred: dict[str, np.ndarray] = {}
    if split_masks is not None:
        train, test = split_masks
        # rows at a factor value the training part never varies cannot be judged
        active = _active(x[train])
        usable = test.copy()
        for i in np.flatnonzero(~active):
            usable &= np.abs(x[:, i] - x[train][:, i].mean()) <= MIN_LOG_SPAN
        for name in forms:
            theta = _fit_form(ENSEMBLE_FORMS[name], x, y, train) if usable.any() else None
            if theta is not None:
                cal_pred[name] = np.clip(ENSEMBLE_FORMS[name].predict(theta, x[usable]), 0.0, 100.0)
                mse[name] = float(np.mean((cal_pred[name] - y[usable]) ** 2))
        split = {"train_max_hours": float(hours[train].max()), "train_min_hours": float(hours[train].min()),
                 "test_hours": float(hours[test].max()),
                 "log_ratio": float(math.log(hours[test].max() / hours[train].max())),
                 "n_train": int(train.sum()), "n_test": int(usable.sum()),
                 "forms": {n: {"rmse": math.sqrt(v), "bias": float(np.mean(cal_pred[n] - y[usable]))}
                           for n, v in mse.items()}}
    if mse:
        k = len(np.unique(groups[usable]))
        best = max(min(mse.values()), 1e-12)
        raw = {n: (max(v, 1e-12) / best) ** (-k / 2) for n, v in mse.items()}
    else:
        raw = {n: 1.0 for n in forms}
    window = _window_mask(hours, split) if mse else None
    members = []
    for name, w in raw.items():
        for rows, mask in ((("window", window),) if window is not None else (("all", np.ones(len(y), bool)),)):
            theta = _fit_form(ENSEMBLE_FORMS[name], x, y, mask)
            if theta is not None:
                members.append(Member(name, rows, theta, w))
    if not members:
        raise ValueError(f"{table.source}: too few runs ({len(y)}) to fit any form")
    total = sum(m.weight for m in members)
    for m in members:
        m.weight /= total
    sd_cal = math.nan
    if mse:
        wsum = sum(raw.values())
        ens = sum(raw[n] / wsum * cal_pred[n] for n in raw)
        err = ens - y[usable]
        sd_cal = float(np.std(err))
        split.update(ensemble_rmse=float(np.sqrt(np.mean(err ** 2))), ensemble_bias=float(np.mean(err)),
                     ensemble_sd=sd_cal, ensemble_q=conformal_quantile(np.abs(err), ci))
    largest = {k: float(np.max(table[k])) for k in FACTORS}
    return Calibration(members, split, sd_cal, _pooled_seed_sd(groups, y), largest, ci, bounds)
