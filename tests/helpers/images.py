"""Random RGB PNG files for data and training tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_pngs(folder: Path, n: int, size=(11, 13), seed=0, name: str = "{i:03d}.png") -> list[Path]:
    """``n`` random RGB PNGs of ``size`` (h, w) in ``folder``, named by ``name.format(i=...)``, pixels from ``seed``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / name.format(i=i)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths
