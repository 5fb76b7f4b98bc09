"""Training curves of one or more runs as a PNG: ``python train/curves.py RUN_DIR [RUN_DIR ...]`` (or
``mae-fast plot``). See :mod:`mae_fast.training.curves`."""
import sys

from mae_fast.training.curves import main

if __name__ == "__main__":
    sys.exit(main())
