"""Scaling laws of accuracy in model size N, data hours D and resolution R: forms, fits, choice, bands.

Four forms compete (factors are normalised: ``n = ln(N / 1e8)``, ``d = ln(D / 100 h)``,
``r = ln(R / 224 px)``, and ``err = 100 - top1``):

* ``log_additive``     top1 = a + b_n n + c_d d + e_r r                              (least squares)
* ``log_interaction``  top1 = a + b_n n + c_d d + e_r r + f_nd nd + g_nr nr + h_dr dr (least squares)
* ``saturating``       err  = E + A e^(-alpha n) + B e^(-beta d) + C e^(-gamma r)
                       i.e. E + A (N/1e8)^-alpha + B (D/100)^-beta + C (R/224)^-gamma, least squares on err
                       (variable projection: non-negative least squares for E, A, B, C inside a search
                       over the exponents)
* ``huber_log``        the same law fitted as Chinchilla's approach 3: Huber loss on
                       ``log err_pred - log err`` with ``log err_pred = LSE(log E, log A - alpha n, ...)``,
                       L-BFGS from a grid of starts (the grid is screened by its loss and the 8 best
                       starts, plus the least-squares fit, are run), the best end point kept.

The choice is by extrapolation: for each split (hold out the largest data size; hold out the largest
model) every form is fitted on the rest and scored by the RMSE of its predictions for the held-out runs.
A factor that is constant in a split's training rows is frozen (its terms dropped) and held-out rows at
other values of it are left out of that split's score, since no fit could say anything about them.
The chosen form is refitted on every run, and its uncertainty is a bootstrap over runs: seeds are
resampled within each configuration (model, resolution, hours), or whole configurations when some
configuration has a single run. The bands therefore cover seed noise in the fit, not the choice of form; the report
shows every form's projections so that spread can be seen too.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import optimize

from .table import ResultsTable, TableError, load_results

__all__ = [
    "FORMS", "fit", "ScalingLaw", "Prediction", "FormScore", "UnreachableTarget", "ExtrapolationWarning",
    "compute_cost", "N0", "D0", "R0",
]

N0, D0, R0 = 1e8, 100.0, 224.0
FACTORS = ("params", "hours", "img_size")


class UnreachableTarget(ValueError):
    """The law never reaches the requested accuracy (above its ceiling or outside the search bounds)."""


class ExtrapolationWarning(UserWarning):
    """A prediction far outside the fitted runs, or at another value of a factor the runs never vary."""


# how far past the fitted range (a factor, either way) a prediction may go before it warns: the same reach
# as :meth:`ScalingLaw.solve`'s default search bounds
EXTRAPOLATION_LIMITS = {"params": 10.0, "hours": 100.0, "img_size": 2.0}


@contextlib.contextmanager
def single_threaded_blas():
    """Run OpenBLAS on one thread inside (best effort, Linux; a no-op elsewhere).

    The fits call L-BFGS-B and NNLS on tiny matrices thousands of times; OpenBLAS threads on such
    sizes, which on a busy 2-core machine makes fits several times slower.
    """
    setters = []
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "openblas" in line.rsplit("/", 1)[-1]}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            for get, set_ in (("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
                              ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                              ("openblas_get_num_threads", "openblas_set_num_threads")):
                if hasattr(lib, get) and hasattr(lib, set_):
                    setters.append((getattr(lib, set_), getattr(lib, get)()))
                    getattr(lib, set_)(1)
                    break
    except OSError:
        pass
    try:
        yield
    finally:
        for set_, n in setters:
            set_(n)


def features(params, hours, img_size) -> np.ndarray:
    """Normalised log factors, shape (..., 3)."""
    params, hours, img_size = np.broadcast_arrays(
        np.asarray(params, float), np.asarray(hours, float), np.asarray(img_size, float)
    )
    return np.stack([np.log(params / N0), np.log(hours / D0), np.log(img_size / R0)], axis=-1)


def compute_cost(params, hours, img_size, patch_size: float = 14.0):
    """Relative pretraining compute ``C = N * hours * (R / p)^2`` (parameter x hour x token).

    Training FLOPs are about ``6 * N * tokens processed``; with frames sampled at a fixed rate, a
    fixed number of epochs and a fixed mask ratio, tokens processed are proportional to
    ``hours * (R / p)^2``, so C differs from FLOPs by a constant: for 1 frame/s, ``k`` epochs and 25%
    visible tokens in the encoder, FLOPs ~ 6 * 3600 * k * 0.25 * C (decoder ignored).
    """
    return np.asarray(params, float) * np.asarray(hours, float) * (np.asarray(img_size, float) / patch_size) ** 2


# ---------------------------------------------------------------------------------------------------
# Forms
# ---------------------------------------------------------------------------------------------------
class Form:
    """A functional form: ``fit`` returns a parameter vector, ``predict`` maps it to top-1 accuracy.

    ``active`` (bool per factor N, D, R) says which factors vary in the training rows; the terms of an
    inactive factor are dropped (their parameters are zero)."""

    name: str = ""
    family: str = ""
    formula: str = ""
    param_names: tuple[str, ...] = ()

    def fit(self, x: np.ndarray, top1: np.ndarray, active: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def predict(self, theta: np.ndarray, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def ceiling(self, theta: np.ndarray) -> float:
        """Accuracy approached as N, D, R grow without bound (100 for forms that have no floor)."""
        return 100.0

    def n_free(self, active: np.ndarray) -> int:
        return len(self.param_names)


class LinearLogForm(Form):
    """top1 linear in products of log factors (least squares, rank-deficient terms dropped)."""

    family = "log"

    def __init__(self, name: str, terms: Sequence[tuple[int, ...]], formula: str):
        self.name, self.terms, self.formula = name, tuple(terms), formula
        # the coefficient of each term is named after it: a (intercept), b_n, c_d, e_r, f_nd, g_nr, h_dr
        labels = {(): "a", (0,): "b_n", (1,): "c_d", (2,): "e_r", (0, 1): "f_nd", (0, 2): "g_nr", (1, 2): "h_dr"}
        self.param_names = tuple(labels[t] for t in self.terms)

    def _design(self, x: np.ndarray) -> np.ndarray:
        cols = [np.ones(x.shape[:-1])]
        for t in self.terms[1:]:
            cols.append(np.prod([x[..., i] for i in t], axis=0))
        return np.stack(cols, axis=-1)

    def fit(self, x, top1, active, start=None):
        design = self._design(x)
        keep: list[int] = []
        for j, t in enumerate(self.terms):
            if not all(active[i] for i in t):
                continue
            # keep a term only if the kept ones leave a real part of it unexplained: a term that varies
            # only through tiny differences (e.g. n*r where R varies for one model only, whose params
            # differ by a 0.2% position embedding) would get a wild, meaningless coefficient
            col = design[:, j]
            if keep:
                coef, *_ = np.linalg.lstsq(design[:, keep], col, rcond=None)
                col = col - design[:, keep] @ coef
            if np.linalg.norm(col) > 1e-2 * max(np.linalg.norm(design[:, j]), 1.0):
                keep.append(j)
        theta = np.zeros(len(self.terms))
        coef, *_ = np.linalg.lstsq(design[:, keep], top1, rcond=None)
        theta[keep] = coef
        return theta

    def predict(self, theta, x):
        return self._design(x) @ theta

    def n_free(self, active):
        return sum(all(active[i] for i in t) for t in self.terms)


SAT_NAMES = ("E", "A", "alpha", "B", "beta", "C", "gamma")


class SaturatingForm(Form):
    """err = E + A e^(-alpha n) + B e^(-beta d) + C e^(-gamma r), all parameters >= 0."""

    family = "saturating"
    name = "saturating"
    param_names = SAT_NAMES
    formula = "100 - top1 = E + A (N/1e8)^-alpha + B (D/100h)^-beta + C (R/224)^-gamma"
    exponent_bounds = (0.01, 4.0)

    def predict(self, theta, x):
        return 100.0 - self.error(theta, x)

    @staticmethod
    def error(theta, x):
        E, A, alpha, B, beta, C, gamma = theta
        return E + A * np.exp(-alpha * x[..., 0]) + B * np.exp(-beta * x[..., 1]) + C * np.exp(-gamma * x[..., 2])

    def ceiling(self, theta):
        return 100.0 - theta[0]

    def n_free(self, active):
        return 1 + 2 * int(np.sum(active))

    # variable projection: for fixed exponents, (E, A, B, C) is a non-negative least-squares problem.
    def _inner(self, exps: np.ndarray, x, err, active) -> tuple[float, np.ndarray]:
        cols = [np.ones(len(err))] + [np.exp(-e * x[:, i]) for i, e in zip(np.flatnonzero(active), exps)]
        coef, rnorm = optimize.nnls(np.stack(cols, axis=1), err)
        return rnorm ** 2, coef

    def _theta(self, exps, coef, active) -> np.ndarray:
        theta = np.zeros(7)
        theta[0] = coef[0]
        for k, (i, e) in enumerate(zip(np.flatnonzero(active), exps)):
            theta[1 + 2 * i], theta[2 + 2 * i] = coef[1 + k], e
        return theta

    def fit(self, x, top1, active, start=None):
        active = np.asarray(active, bool)
        err = 100.0 - top1
        k = int(active.sum())
        lo, hi = self.exponent_bounds
        if k == 0:
            return self._theta([], [float(np.mean(err))], active)
        if start is not None:
            starts = [np.clip(start[2 + 2 * np.flatnonzero(active)], lo, hi)]
        else:
            grid = np.geomspace(0.03, 2.0, 8)
            mesh = np.stack(np.meshgrid(*([grid] * k), indexing="ij"), -1).reshape(-1, k)
            sse = np.array([self._inner(e, x, err, active)[0] for e in mesh])
            starts = list(mesh[np.argsort(sse)[:4]])
        best = None
        for s in starts:
            res = optimize.minimize(lambda e: self._inner(e, x, err, active)[0], s, method="L-BFGS-B",
                                    bounds=[(lo, hi)] * k)
            if best is None or res.fun < best.fun:
                best = res
        return self._theta(best.x, self._inner(best.x, x, err, active)[1], active)


class HuberLogForm(SaturatingForm):
    """The saturating law fitted Chinchilla-style: Huber loss on log error, L-BFGS from a grid of starts."""

    family = "saturating"
    name = "huber_log"

    def __init__(self, delta: float = 0.01, n_starts: int = 8):
        self.delta, self.n_starts = delta, n_starts
        self.formula = SaturatingForm.formula + f"  [Huber loss on log err, delta={delta:g}]"

    def _loss(self, p, x, log_err, idx):
        # p = (log E, then log coefficient and exponent of each active factor)
        comps = [np.full(len(log_err), p[0])]
        for k, i in enumerate(idx):
            comps.append(p[1 + 2 * k] - p[2 + 2 * k] * x[:, i])
        z = np.stack(comps, 1)
        zmax = z.max(1, keepdims=True)
        w = np.exp(z - zmax)
        lse = zmax[:, 0] + np.log(w.sum(1))
        w /= w.sum(1, keepdims=True)
        r = lse - log_err
        d = self.delta
        absr = np.abs(r)
        loss = np.where(absr <= d, 0.5 * r * r, d * (absr - 0.5 * d)).sum()
        h = np.clip(r, -d, d)
        grad = np.empty_like(p)
        grad[0] = h @ w[:, 0]
        for k, i in enumerate(idx):
            grad[1 + 2 * k] = h @ w[:, 1 + k]
            grad[2 + 2 * k] = -(h * w[:, 1 + k]) @ x[:, i]
        return loss, grad

    def fit(self, x, top1, active, start=None):
        active = np.asarray(active, bool)
        idx = np.flatnonzero(active)
        err = 100.0 - top1
        if np.any(err <= 0):
            raise ValueError("huber_log needs top1 < 100 for every run (it takes log(100 - top1))")
        log_err = np.log(err)
        lo, hi = self.exponent_bounds
        # bounded logs: a floor or a term driven to zero would otherwise send L-BFGS off to -inf
        bounds = [(math.log(1e-3), math.log(100.0))] + [(math.log(1e-3), math.log(1e4)), (lo, hi)] * len(idx)
        if start is not None:
            starts = [self._pack(start, idx)]
        else:
            m = float(np.min(err))
            starts = []
            for e_frac in (0.1, 0.4, 0.7, 0.9):
                for c_frac in (0.02, 0.1, 0.3):
                    for exps in np.stack(np.meshgrid(*([[0.03, 0.1, 0.3, 1.0]] * len(idx)), indexing="ij"), -1).reshape(-1, len(idx)):
                        p = [math.log(e_frac * m)]
                        for e in exps:
                            p += [math.log(c_frac * m), e]
                        starts.append(np.array(p))
            # the least-squares fit of the same law is a good start; then the grid's most promising
            starts.append(self._pack(SaturatingForm.fit(self, x, top1, active), idx))
            losses = [self._loss(s, x, log_err, idx)[0] for s in starts]
            starts = [starts[j] for j in np.argsort(losses)[: self.n_starts]]
        best = None
        for s in starts:
            res = optimize.minimize(self._loss, s, args=(x, log_err, idx), jac=True, method="L-BFGS-B",
                                    bounds=bounds, options={"maxiter": 1000})
            if best is None or res.fun < best.fun:
                best = res
        return self._unpack(best.x, idx)

    @staticmethod
    def _pack(theta, idx):
        p = [math.log(min(max(theta[0], 1e-3), 100.0))]
        for i in idx:
            p += [math.log(min(max(theta[1 + 2 * i], 1e-3), 1e4)), theta[2 + 2 * i]]
        return np.array(p)

    @staticmethod
    def _unpack(p, idx):
        theta = np.zeros(7)
        theta[0] = math.exp(p[0])
        for k, i in enumerate(idx):
            theta[1 + 2 * i], theta[2 + 2 * i] = math.exp(p[1 + 2 * k]), p[2 + 2 * k]
        return theta


FORMS: dict[str, Form] = {
    f.name: f for f in (
        LinearLogForm("log_additive", [(), (0,), (1,), (2,)],
                      "top1 = a + b_n n + c_d d + e_r r,  n = ln(N/1e8), d = ln(D/100h), r = ln(R/224)"),
        LinearLogForm("log_interaction", [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2)],
                      "top1 = a + b_n n + c_d d + e_r r + f_nd n d + g_nr n r + h_dr d r  (n, d, r as above)"),
        SaturatingForm(),
        HuberLogForm(),
    )
}


# ---------------------------------------------------------------------------------------------------
# Fitting, choice, bootstrap
# ---------------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """Point estimate and a central band (``ci``, e.g. 90%) from the bootstrap; arrays or floats."""

    estimate: np.ndarray | float
    lower: np.ndarray | float
    upper: np.ndarray | float
    ci: float = 0.9

    def __iter__(self):
        return iter((self.estimate, self.lower, self.upper))

    def __str__(self):
        e, lo, hi = (np.round(np.asarray(v, float), 2) for v in self)
        return f"{e} [{lo}, {hi}] ({self.ci:.0%} band)"


@dataclass
class FormScore:
    name: str
    n_params: int
    rmse_in_sample: float
    holdout: dict[str, dict]  # split -> {"rmse", "bias", "n_test", "n_left_out", "n_train", "rows", "predicted"}
    theta: np.ndarray
    active: np.ndarray

    @property
    def holdout_rmse(self) -> float:
        vals = [h["rmse"] for h in self.holdout.values() if np.isfinite(h["rmse"])]
        return float(np.mean(vals)) if vals else math.inf


# A factor varies when its log spans more than this (5%): one model's parameter count changing by
# its position embedding across resolutions (0.2% for ViT-H/14) is not a model-size axis.
MIN_LOG_SPAN = 0.05


def _active(x: np.ndarray) -> np.ndarray:
    return np.ptp(x, axis=0) > MIN_LOG_SPAN if len(x) else np.zeros(3, bool)


def _rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def holdout_splits(table: ResultsTable) -> dict[str, np.ndarray]:
    """Boolean masks of held-out rows: the largest data size, and the largest model (by params)."""
    hours = table["hours"]
    splits = {"largest_hours": np.isclose(hours, hours.max(), rtol=1e-9)}
    models = table.model_key()
    size = {m: np.median(table["params"][models == m]) for m in set(models)}
    if len(size) > 1:
        splits["largest_model"] = models == max(size, key=size.get)
    return {k: v for k, v in splits.items() if 0 < v.sum() < len(v)}


def _score_split(form: Form, x, y, test_mask) -> dict:
    train = ~test_mask
    active = _active(x[train])
    # held-out rows at a value of a frozen factor never seen in training cannot be judged
    usable = test_mask.copy()
    for i in np.flatnonzero(~active):
        usable &= np.abs(x[:, i] - x[train][:, i].mean()) <= MIN_LOG_SPAN
    n_train, n_test = int(train.sum()), int(usable.sum())
    out = {"n_train": n_train, "n_test": n_test, "n_left_out": int(test_mask.sum() - n_test), "rmse": math.nan}
    if n_test == 0 or n_train <= form.n_free(active):
        return out
    theta = form.fit(x[train], y[train], active)
    pred = form.predict(theta, x[usable])
    out.update(rmse=_rmse(pred, y[usable]), bias=float(np.mean(pred - y[usable])),
               rows=np.flatnonzero(usable).tolist(), predicted=pred.tolist())
    return out


def _bootstrap_indices(groups: np.ndarray, rng: np.random.Generator, by: str) -> np.ndarray:
    uniq = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in uniq]
    if by == "seeds":  # resample runs within each configuration
        return np.concatenate([rng.choice(m, size=len(m), replace=True) for m in members])
    picked = rng.choice(len(members), size=len(members), replace=True)  # resample whole configurations
    return np.concatenate([members[p] for p in picked])


@dataclass
class ScalingLaw:
    """A fitted, chosen law with its bootstrap; ``predict`` and ``solve`` are the public questions."""

    form: Form
    theta: np.ndarray
    active: np.ndarray
    target: str
    scores: list[FormScore]
    boot_thetas: np.ndarray
    bootstrap_by: str
    ci: float = 0.9
    patch_size: float = 14.0
    data_range: dict = field(default_factory=dict)
    # the calibrated ensemble behind :meth:`project` (see :mod:`.calibration`); None: not calibrated
    calibration: object = None
    data_unit: str = "hours"  # the table's data axis: "hours" of video, or "images"
    protocol: str = ""  # the fitted rows' protocol (see :mod:`.protocol`)

    def project(self, params, hours, img_size):
        """Calibrated projection (:class:`~.calibration.Projection`): the ensemble's estimate, bounds that
        include the error of choosing a form and of extrapolating as far as this, and its ``reach`` (how far
        beyond the largest fitted run each factor goes). Falls back to :meth:`predict` if not calibrated."""
        if self.calibration is None:
            from .calibration import Projection, reach

            p = self.predict(params, hours, img_size)
            largest = {k: self.data_range[k][1] for k in FACTORS}
            return Projection(p.estimate, p.lower, p.upper, p.ci, reach(largest, params, hours, img_size))
        return self.calibration.project(params, hours, img_size)

    @property
    def name(self) -> str:
        return self.form.name

    @property
    def score(self) -> FormScore:
        return next(s for s in self.scores if s.name == self.form.name)

    @property
    def ceiling(self) -> float:
        return min(100.0, self.form.ceiling(self.theta))

    def params_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v, on in zip(self.form.param_names, self.theta, self._param_active()) if on}

    def _param_active(self):
        if isinstance(self.form, SaturatingForm):
            return [True] + [bool(self.active[i]) for i in range(3) for _ in (0, 1)]
        return [all(self.active[i] for i in t) for t in self.form.terms]

    def param_bands(self) -> dict[str, tuple[float, float]]:
        q = [(1 - self.ci) / 2 * 100, (1 + self.ci) / 2 * 100]
        out = {}
        for j, (k, on) in enumerate(zip(self.form.param_names, self._param_active())):
            if on and len(self.boot_thetas):
                lo, hi = np.percentile(self.boot_thetas[:, j], q)
                out[k] = (float(lo), float(hi))
        return out

    def _point(self, x) -> np.ndarray:
        return np.clip(self.form.predict(self.theta, x), 0.0, 100.0)

    def _boot(self, x) -> np.ndarray:
        return np.clip(np.stack([self.form.predict(t, x) for t in self.boot_thetas]), 0.0, 100.0)

    def _warn_if_extrapolating(self, values) -> None:
        dr = self.data_range
        if not all(k in dr for k in FACTORS):
            return
        notes = []
        for i, (k, v) in enumerate(zip(FACTORS, values)):
            v, (lo, hi) = np.asarray(v, float), dr[k]
            if not self.active[i]:
                off = (v > hi * math.exp(MIN_LOG_SPAN)) | (v < lo * math.exp(-MIN_LOG_SPAN))
                if np.any(off):
                    notes.append(f"{k} never varies in the fitted runs ({lo:g}), so the law ignores {k} "
                                 f"{np.ravel(v[off])[0]:g}")
            else:
                f = EXTRAPOLATION_LIMITS[k]
                if np.any(v > hi * f):
                    notes.append(f"{k} {np.max(v):g} is more than {f:g}x outside the fitted {lo:g}..{hi:g}")
                elif np.any(v < lo / f):
                    notes.append(f"{k} {np.min(v):g} is more than {f:g}x outside the fitted {lo:g}..{hi:g}")
        if notes:
            warnings.warn(f"{self.name} law extrapolated far from its data: " + "; ".join(notes)
                          + " (the band covers seed noise only)", ExtrapolationWarning, stacklevel=3)

    def predict(self, params, hours, img_size) -> Prediction:
        """Predicted ``target`` (e.g. top-1 %) with a ``ci`` bootstrap band; broadcasts over its arguments.

        Warns (:class:`ExtrapolationWarning`) far outside the fitted runs (past :data:`EXTRAPOLATION_LIMITS`)
        and at another value of a factor the runs never vary (the law has no term for it)."""
        x = features(params, hours, img_size)
        self._warn_if_extrapolating((params, hours, img_size))
        est = self._point(x)
        if len(self.boot_thetas):
            lo, hi = np.percentile(self._boot(x), [(1 - self.ci) / 2 * 100, (1 + self.ci) / 2 * 100], axis=0)
        else:
            lo = hi = est
        if est.ndim == 0:
            return Prediction(float(est), float(lo), float(hi), self.ci)
        return Prediction(est, lo, hi, self.ci)

    def solve(self, target: float, patch_size: float | None = None,
              bounds: Mapping[str, tuple[float, float]] | None = None, confident: bool = False,
              calibrated: bool = False) -> dict:
        """Cheapest (params, hours, img_size) whose predicted accuracy reaches ``target``.

        Cost is :func:`compute_cost` (N * hours * tokens per image). The search runs over a log grid
        within ``bounds``, refined around the best point. The default bounds stay near what the law
        was fitted on (params from the smallest fitted to 10x the largest, hours to 100x, img_size to
        2x): laws without diminishing returns (the log forms) otherwise put everything on one factor. ``confident=True`` asks the band's lower edge to reach the target.
        ``calibrated=True`` uses :meth:`project` (the calibrated ensemble) instead of the chosen form, and
        the result's ``prediction`` is a calibrated :class:`~.calibration.Projection` with its ``reach``.
        Raises :class:`UnreachableTarget` when the law's ceiling or the bounds forbid it.
        """
        p = float(patch_size or self.patch_size)
        if target >= self.ceiling:
            raise UnreachableTarget(
                f"{self.target} {target:g} is above the {self.name} law's ceiling of {self.ceiling:.2f} "
                f"(the error floor E = {100 - self.ceiling:.2f}); no model, data or resolution reaches it"
            )
        dr = self.data_range
        b = {"params": (dr["params"][0], 10 * dr["params"][1]), "hours": (dr["hours"][0], 100 * dr["hours"][1]),
             "img_size": (dr["img_size"][0], 2 * dr["img_size"][1])}
        b.update(bounds or {})
        lo = np.log([b[k][0] for k in FACTORS])
        hi = np.log([b[k][1] for k in FACTORS])
        best = None
        for _ in range(6):
            axes = [np.linspace(lo[i], hi[i], 41) for i in range(3)]
            grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
            n, d, r = np.exp(grid.T)
            x = features(n, d, r)
            if calibrated and self.calibration is not None:
                proj = self.calibration.project(n, d, r)
                acc = proj.lower if confident else proj.estimate
            elif confident and len(self.boot_thetas):
                acc = np.percentile(self._boot(x), (1 - self.ci) / 2 * 100, axis=0)
            else:
                acc = self._point(x)
            ok = acc >= target
            if not ok.any():
                if best is None:
                    bounds_text = ", ".join(f"{k} {lo_:.3g}..{hi_:.3g}" for k, (lo_, hi_) in b.items())
                    raise UnreachableTarget(
                        f"{self.target} {target:g} is not reached within the search bounds ({bounds_text}; "
                        f"best there {acc.max():.2f}, law ceiling {self.ceiling:.2f}); widen the bounds"
                    )
                break
            logc = grid.sum(1) + grid[:, 2]  # log N + log D + 2 log R (+ const)
            j = np.flatnonzero(ok)[np.argmin(logc[ok])]
            best = grid[j]
            step = (hi - lo) / 40
            lo = np.maximum(best - 3 * step, np.log([b[k][0] for k in FACTORS]))
            hi = np.minimum(best + 3 * step, np.log([b[k][1] for k in FACTORS]))
        n, d, r = np.exp(best)
        return {
            "params": float(n), "hours": float(d), "img_size": float(r), "patch_size": p,
            "compute": float(compute_cost(n, d, r, p)),
            "prediction": self.project(n, d, r) if calibrated and self.calibration is not None
            else self.predict(n, d, r),
            "target": float(target), "confident": confident, "bounds": b,
        }

    def describe(self) -> str:
        pb = self.param_bands()
        parts = []
        for k, v in self.params_dict().items():
            band = f" [{pb[k][0]:.4g}, {pb[k][1]:.4g}]" if k in pb else ""
            # an exponent at its search bound: the data do not pin it down (e.g. a step-like effect)
            at_bound = k in ("alpha", "beta", "gamma") and v >= SaturatingForm.exponent_bounds[1] - 1e-6
            parts.append(f"{k}={v:.4g}{band}" + (" (at its bound)" if at_bound else ""))
        return f"{self.name}: {self.form.formula}\n  " + ", ".join(parts)

    def to_dict(self) -> dict:
        return {
            "form": self.name, "formula": self.form.formula, "target": self.target, "ci": self.ci,
            "params": self.params_dict(), "param_bands": self.param_bands(), "ceiling": self.ceiling,
            "bootstrap": {"n": len(self.boot_thetas), "by": self.bootstrap_by},
            "scores": [
                {"form": s.name, "n_params": s.n_params, "rmse_in_sample": s.rmse_in_sample,
                 "holdout_rmse": s.holdout_rmse, "holdout": s.holdout} for s in self.scores
            ],
            "data_range": self.data_range, "data_unit": self.data_unit, "protocol": self.protocol,
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
        }

    def alternative(self, name: str) -> "ScalingLaw":
        """The same table fitted with another form (point estimate only, no bootstrap)."""
        s = next(s for s in self.scores if s.name == name)
        return dataclasses.replace(self, form=FORMS[name], theta=s.theta, active=s.active,
                                   boot_thetas=np.zeros((0, len(s.theta))), calibration=None)


def fit(table: ResultsTable | str | os.PathLike, target: str = "top1",
        forms: Sequence[str] | None = None, n_boot: int = 200, ci: float = 0.9, seed: int = 0,
        choose: str | None = None, calibrate: bool = True, mixed_protocols: bool = False) -> ScalingLaw:
    """Fit every form, choose the one that extrapolates best to held-out runs, bootstrap it.

    ``table`` is a :class:`ResultsTable` or a path for :func:`load_results`. ``choose`` forces a form
    (it is still scored). ``calibrate`` also fits the calibrated ensemble behind
    :meth:`ScalingLaw.project` (:mod:`.calibration`). Rows of different protocols (:mod:`.protocol`) raise
    :class:`~.protocol.ProtocolMismatch` unless ``mixed_protocols``. Returns a :class:`ScalingLaw`.
    """
    from .protocol import check_protocols

    if not isinstance(table, ResultsTable):
        table = load_results(table, target=target)
    protocol = check_protocols(table, allow_mixed=mixed_protocols)
    with single_threaded_blas():
        law = _fit(table, target, list(forms or FORMS), n_boot, ci, seed, choose)
        law.data_unit = getattr(table, "data_unit", "hours")
        law.protocol = protocol
        if calibrate:
            from .calibration import calibrate as _calibrate

            try:
                law.calibration = _calibrate(table, target=target, ci=ci)
            except ValueError as exc:  # too few runs for the ensemble: projections fall back to predict
                warnings.warn(f"no calibrated projections: {exc}")
        return law


def _fit(table, target, forms, n_boot, ci, seed, choose) -> ScalingLaw:
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        raise ValueError(f"unknown form(s) {unknown}; known: {list(FORMS)}")
    for k in FACTORS + (target,):  # a table built in code skips load_results' checks
        v = np.asarray(table[k], float)
        ok = np.isfinite(v) & ((v > 0) if k in FACTORS else (v >= 0) & (v <= 100))
        if not ok.all():
            rows = np.flatnonzero(~ok)
            raise TableError(f"{table.source}: {k} must be " + ("finite and > 0 (the laws use its log)" if k in FACTORS
                             else "a finite percentage in [0, 100]") + f"; row {rows[0]} has {v[rows[0]]:g}"
                             + (f" ({len(rows)} rows are bad)" if len(rows) > 1 else ""))
    x = features(table["params"], table["hours"], table["img_size"])
    y = np.asarray(table[target], float)
    active = _active(x)
    splits = holdout_splits(table)

    scores = []
    for name in forms:
        form = FORMS[name]
        if len(y) <= form.n_free(active):
            warnings.warn(f"{name}: {len(y)} runs are too few for {form.n_free(active)} parameters; skipped")
            continue
        theta = form.fit(x, y, active)
        scores.append(FormScore(
            name=name, n_params=form.n_free(active), rmse_in_sample=_rmse(form.predict(theta, x), y),
            holdout={s: _score_split(form, x, y, m) for s, m in splits.items()}, theta=theta, active=active,
        ))
    if not scores:
        raise ValueError(f"{table.source}: too few runs ({len(y)}) to fit any form")
    if choose is not None:
        if choose not in {s.name for s in scores}:
            raise ValueError(f"choose={choose!r} is not among the fitted forms {[s.name for s in scores]}")
        chosen = next(s for s in scores if s.name == choose)
    else:  # best extrapolation; ties (within 1%) go to the form with fewer parameters
        ranked = sorted(scores, key=lambda s: (s.holdout_rmse, s.n_params))
        top = ranked[0].holdout_rmse
        chosen = min((s for s in ranked if s.holdout_rmse <= top * 1.01 + 1e-12), key=lambda s: s.n_params) \
            if math.isfinite(top) else min(scores, key=lambda s: s.rmse_in_sample)
    form = FORMS[chosen.name]

    groups = table.group_ids()
    # seeds within configurations when every configuration has several; else whole configurations
    by = "seeds" if np.bincount(groups).min() >= 2 else "configs"
    rng = np.random.default_rng(seed)
    boots = []
    tries = 0
    while len(boots) < n_boot and tries < 5 * n_boot:
        tries += 1
        idx = _bootstrap_indices(groups, rng, by)
        if not np.array_equal(_active(x[idx]), active):
            continue  # a resample that lost a factor's variation cannot estimate its terms
        boots.append(form.fit(x[idx], y[idx], active, start=chosen.theta))
    patch = table["patch_size"] if "patch_size" in table else np.array([14.0])
    patch = patch[np.isfinite(patch)]
    data_range = {k: (float(table[k].min()), float(table[k].max())) for k in FACTORS}
    data_range["runs"] = len(table)
    return ScalingLaw(
        form=form, theta=chosen.theta, active=active, target=target, scores=scores,
        boot_thetas=np.array(boots).reshape(len(boots), len(chosen.theta)), bootstrap_by=by, ci=ci,
        patch_size=float(np.median(patch)) if len(patch) else 14.0, data_range=data_range,
    )
