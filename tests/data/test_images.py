"""Image folders and labelled sets (mae_fast/data/images.py): the per-class fraction and split counted by hand,
labels that follow the train classes, a single folder split, an image folder as a pretraining source, augmented
items seeded per item."""
from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from mae_fast.data import build_labelled_datasets, build_pretrain_dataset
from mae_fast.data import demo as demo_mod
from mae_fast.data.images import per_class_fraction, split_per_class


def test_labelled_fraction_per_class(demo):
    root = demo.root.parent
    train, val, classes = build_labelled_datasets(None, img_size=32, demo_root=root)
    n_val = len(demo_mod.CLASSES) * demo_mod.DEFAULTS["n_val"]
    assert classes == sorted(demo_mod.CLASSES) and len(train) == 320 and len(val) == n_val
    for fraction, per_class in ((0.1, 4), (0.02, 1), (0.5, 20)):
        tr, va, _ = build_labelled_datasets(None, img_size=32, fraction=fraction, seed=3, demo_root=root)
        assert collections.Counter(tr.labels) == {c: per_class for c in range(8)}
        assert len(va) == n_val
        assert all(Path(f).parent.name == classes[y] for f, y in zip(tr.files, tr.labels))
        json.dumps(tr.record)
    a = build_labelled_datasets(None, fraction=0.1, seed=3, demo_root=root)[0].files
    b = build_labelled_datasets(None, fraction=0.1, seed=3, demo_root=root)[0].files
    c = build_labelled_datasets(None, fraction=0.1, seed=4, demo_root=root)[0].files
    assert a == b and a != c
    x, y = train[0]
    assert x.shape == (3, 32, 32) and isinstance(y, int)
    xv, _ = val[0]
    assert torch.equal(xv, val[0][0])


def test_labelled_single_folder_split(demo, tmp_path):
    shutil.copytree(demo.labelled / "train", tmp_path / "all")
    tr, va, classes = build_labelled_datasets(tmp_path / "all", img_size=32, seed=0)
    assert len(classes) == 8 and len(tr) + len(va) == 320
    assert collections.Counter(va.labels) == {c: 8 for c in range(8)}
    assert not set(tr.files) & set(va.files)
    tr2, va2, _ = build_labelled_datasets(tmp_path / "all", img_size=32, seed=0)
    assert tr2.files == tr.files and va2.files == va.files


def test_image_folder_source(demo, tmp_path):
    shutil.copytree(demo.labelled / "val", tmp_path / "imgs")
    ds = build_pretrain_dataset(tmp_path / "imgs", img_size=32)
    assert len(ds) == len(demo_mod.CLASSES) * demo_mod.DEFAULTS["n_val"] and ds[0].shape == (3, 32, 32) and ds.record["kind"] == "images"


def test_augmented_labelled_items_are_seeded_per_item(demo):
    """With timm's augmentations (Python's and numpy's generators) the trainer seeds all three generators per item:
    an item is the same every time it is drawn, whatever ran before, and differs across epochs."""
    import random

    from mae_fast.data.samplers import SeededItems

    train, val, _ = build_labelled_datasets(demo.labelled, img_size=24, auto_augment="rand-m9-mstd0.5-inc1",
                                            re_prob=0.25)
    assert not train.draws_only_torch_rng and val.draws_only_torch_rng
    items = SeededItems(train, seed=5)
    first = items[(0, 3)][0]
    random.random(), np.random.rand(), torch.rand(3)  # other draws in between change nothing
    assert torch.equal(items[(0, 3)][0], first) and not torch.equal(items[(1, 3)][0], first)


def test_per_class_fraction_counts_by_hand():
    """Classes of 7, 3, 1, 5 at fraction 0.3: round(2.1)=2, round(0.9)=1, max(1, round(0.3))=1, round(1.5)=2; each
    pick a subset of its own class, seeded."""
    sizes = (7, 3, 1, 5)
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    files = [f"{c}/{i}.png" for c, n in enumerate(sizes) for i in range(n)]
    classes = ["w", "x", "y", "z"]
    kept, kept_labels = per_class_fraction(files, labels, classes, 0.3, seed=4)
    assert collections.Counter(kept_labels) == {0: 2, 1: 1, 2: 1, 3: 2}
    assert all(f.startswith(f"{y}/") for f, y in zip(kept, kept_labels)) and len(set(kept)) == len(kept)
    picks = {tuple(per_class_fraction(files, labels, classes, 0.3, seed=s)[0]) for s in range(6)}
    assert len(picks) > 1  # the seed chooses which images


def test_split_per_class_small_classes_by_hand():
    """val_fraction 0.9 of classes of 1, 2, 3, 9: val 0, 1, 2, 8 (a singleton stays in train; every class keeps one
    train image); train and val partition the files."""
    sizes = (1, 2, 3, 9)
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    files = [f"{c}/{i}.png" for c, n in enumerate(sizes) for i in range(n)]
    (tr, tr_y), (va, va_y) = split_per_class(files, labels, ["a", "b", "c", "d"], 0.9, seed=2)
    assert collections.Counter(va_y) == {1: 1, 2: 2, 3: 8}
    assert collections.Counter(tr_y) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert not set(tr) & set(va) and set(tr) | set(va) == set(files)


def test_val_folder_missing_a_class_keeps_the_train_labels(write_pngs, tmp_path):
    """train/ has a, b, c; val/ only a and c: val images of c are label 2 (the train classes), not 1. The record
    counts kept train images per class (fraction 0.5 of 3, 5, 1: 2, 2, 1)."""
    for c, n in (("a", 3), ("b", 5), ("c", 1)):
        write_pngs(tmp_path / "train" / c, n, seed=n)
    for c, n in (("a", 2), ("c", 3)):
        write_pngs(tmp_path / "val" / c, n, seed=10 + n)
    tr, va, classes = build_labelled_datasets(tmp_path, img_size=9, fraction=0.5, seed=1)
    assert classes == ["a", "b", "c"]
    assert sorted(zip((Path(f).parent.name for f in va.files), va.labels)) == [("a", 0)] * 2 + [("c", 2)] * 3
    assert all(classes[y] == Path(f).parent.name for f, y in zip(tr.files, tr.labels))
    assert tr.record["train_per_class"] == {"a": 2, "b": 2, "c": 1} and tr.record["n_train"] == 5
