"""Scaling studies: sweep model size x data hours x resolution, then fit and project accuracy.

* :func:`load_results` reads and validates a results table (the runner's or anyone's CSV).
* :func:`fit` fits several laws, chooses by extrapolation to held-out runs, bootstraps bands.
* :mod:`.calibration` makes projections with bounds calibrated for extrapolation (``ScalingLaw.project``);
  :mod:`.protocol` names what produced each row; :mod:`.units` converts hours to frames and years and prices
  runs in GPU-hours.
* ``mae-fast scale run|status|fit`` (:mod:`mae_fast.scaling.cli`) drives sweeps from a grid YAML.
"""
from . import units
from .laws import FORMS, Prediction, ScalingLaw, UnreachableTarget, compute_cost, fit
from .table import RESULT_COLUMNS, ResultsTable, TableError, append_result, load_results

__all__ = [
    "units", "FORMS", "Prediction", "ScalingLaw", "UnreachableTarget", "compute_cost", "fit",
    "RESULT_COLUMNS", "ResultsTable", "TableError", "append_result", "load_results",
]
