"""Scaling sweeps from a grid file: ``python train/scale.py run train/grids/demo.yaml``.

The same as ``mae-fast scale ...`` (see :mod:`mae_fast.scaling.cli`): run, status, fit.
"""
import sys

from mae_fast.scaling.cli import main

if __name__ == "__main__":
    sys.exit(main())
