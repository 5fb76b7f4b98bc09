"""Which labelled training images a low-label finetuning run keeps (``fraction`` of them, drawn by ``seed``).

Three ways to draw a fraction ``f`` of the ``N`` training images of ``C`` classes:

* ``per_class``: ``round(f * n_c)`` images of each class ``c`` (at least one), proportional to the class sizes
  (:func:`mae_fast.data.images.per_class_fraction`, mae_fast's default).
* ``balanced``: the same number, ``k = round(f * N / C)``, in every class (all of a class that has fewer). ImageNet's
  1,281,167 training images of 1,000 classes give 26 a class at ``f = 0.02`` (the human-like protocol's
  "permissive" 2%) and 13 a class at ``f = 0.010147`` (its "stringent" condition, 13,000 images).
* ``uniform``: ``int(f * N)`` images drawn from the whole set regardless of class, as the human-like protocol's
  script draws them (a shuffled list of every index, cut; 25,623 ImageNet images at 2%); class counts vary.

``balanced`` and ``uniform`` take a prefix of a seeded permutation of the files sorted by path, so the draw does
not depend on the order the files were listed in, and the subsets are nested: at one seed, every image kept at a
smaller fraction is kept at a larger one. A fraction of 1 keeps every image.
"""
from __future__ import annotations

import zlib

import numpy as np

from .images import per_class_fraction

__all__ = ["LABEL_SAMPLINGS", "label_subset", "subset_counts"]

LABEL_SAMPLINGS = ("per_class", "balanced", "uniform")


def _check(fraction: float, sampling: str) -> None:
    if sampling not in LABEL_SAMPLINGS:
        raise ValueError(f"label_sampling must be one of {', '.join(LABEL_SAMPLINGS)}, got {sampling!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")


def subset_counts(class_sizes, fraction: float, sampling: str) -> list[int] | int:
    """How many images a draw keeps: per class (a list, for ``per_class`` and ``balanced``) or in all (an int, for
    ``uniform``, whose class counts are random) -- without drawing, e.g. for ImageNet's class sizes."""
    _check(fraction, sampling)
    sizes = [int(n) for n in class_sizes]
    if fraction == 1:
        return sum(sizes) if sampling == "uniform" else sizes
    if sampling == "uniform":
        return max(1, int(fraction * sum(sizes)))
    if sampling == "balanced":
        k = max(1, int(round(fraction * sum(sizes) / max(1, len(sizes)))))
        return [min(k, n) for n in sizes]
    return [0 if n == 0 else min(n, max(1, int(round(fraction * n)))) for n in sizes]


def _by_path(files, idx) -> list[int]:
    """``idx`` ordered by file path: the same draw whatever order the files were listed in."""
    idx = list(idx)
    return [idx[j] for j in np.argsort(np.asarray([str(files[i]) for i in idx]), kind="stable")]


def label_subset(files, labels, classes, fraction: float, seed: int, sampling: str = "per_class"):
    """``(files, labels)`` of the kept images, in their original order; see the module docstring."""
    fraction = float(fraction)
    _check(fraction, sampling)
    if sampling == "per_class":
        return per_class_fraction(files, labels, classes, fraction, seed)
    if fraction == 1:
        return list(files), list(labels)
    labels_arr = np.asarray(labels, dtype=np.int64)
    keep: list[int] = []
    if sampling == "uniform":
        order = _by_path(files, range(len(files)))
        perm = np.random.default_rng([int(seed), 2]).permutation(len(order))
        keep = [order[j] for j in perm[:subset_counts([len(files)], fraction, "uniform")]]
    else:
        members = [np.nonzero(labels_arr == label)[0] for label in range(len(classes))]
        counts = subset_counts([len(m) for m in members], fraction, "balanced")
        for name, idx, k in zip(classes, members, counts):
            order = _by_path(files, idx)
            # per-class stream (another than per_class's): a class's pick does not depend on the other classes
            perm = np.random.default_rng([int(seed), zlib.crc32(str(name).encode()), 1]).permutation(len(order))
            keep += [order[j] for j in perm[:k]]
    keep.sort()
    return [files[i] for i in keep], [labels[i] for i in keep]
