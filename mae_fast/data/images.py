"""Image folders: unlabelled (recursive) for pretraining, ImageFolder-style for labelled sets."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from .base import SkippingDataset, list_files
from .transforms import to_uint8_hwc

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def list_images(root) -> list[str]:
    """Image files under ``root``, recursive and sorted; hidden files are ignored."""
    return list_files(root, IMAGE_EXTENSIONS)


def load_image(path) -> np.ndarray:
    """Fully decode an image file to HWC uint8 RGB (raises on corrupt or truncated data)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return to_uint8_hwc(im.convert("RGB"))


def check_image(path) -> str | None:
    """Why ``path`` cannot be an image (header check: format and size only), or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
        if w <= 0 or h <= 0:
            return "empty image"
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return None


def screen_images(paths, check: bool = True):
    """(readable paths, [(path, reason)]) using the cheap header check."""
    good, bad = [], []
    for p in paths:
        reason = check_image(p) if check else None
        (bad if reason else good).append((p, reason) if reason else p)
    return good, bad


class ImageFileDataset(SkippingDataset):
    """Images from a list of files; items are ``transform(image)`` or ``(transform(image), label)``."""

    def __init__(self, files, labels=None, transform=None, skipped=(), record=None, classes=None):
        super().__init__()
        self.files = list(map(str, files))
        self.labels = None if labels is None else [int(x) for x in labels]
        if self.labels is not None and len(self.labels) != len(self.files):
            raise ValueError("labels and files differ in length")
        self.transform = transform
        self.classes = classes
        self.record = record if record is not None else {"kind": "images", "n_images": len(self.files)}
        for path, reason in skipped:
            self._skip(path, reason)

    def __len__(self):
        return len(self.files)

    def _path(self, index):
        return self.files[index]

    def _load(self, index):
        image = load_image(self.files[index])
        x = self.transform(image) if self.transform is not None else image
        return x if self.labels is None else (x, self.labels[index])

    @property
    def targets(self):
        return self.labels


def find_classes(folder) -> list[str]:
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_image_folder(folder, classes=None, check: bool = True):
    """(files, labels, classes, skipped) of an ImageFolder-style ``folder/<class>/**/image``."""
    folder = Path(folder)
    classes = find_classes(folder) if classes is None else list(classes)
    if not classes:
        raise FileNotFoundError(f"{folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    files, labels, skipped = [], [], []
    for label, name in enumerate(classes):
        sub = folder / name
        found = list_images(sub) if sub.is_dir() else []
        good, bad = screen_images(found, check)
        files += good
        labels += [label] * len(good)
        skipped += bad
    return files, labels, classes, skipped


def _class_rng(seed: int, name: str):
    # per-class stream: a class's pick does not depend on which other classes exist
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def per_class_fraction(files, labels, classes, fraction: float, seed: int):
    """Keep ``max(1, round(fraction * n_c))`` random images of each class c (the low-label protocol)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels_arr = np.asarray(labels)
    keep = []
    for label, name in enumerate(classes):
        idx = np.nonzero(labels_arr == label)[0]
        if len(idx) == 0:
            continue
        n = max(1, int(round(fraction * len(idx))))
        keep += sorted(_class_rng(seed, name).choice(idx, size=n, replace=False).tolist()) if n < len(idx) \
            else idx.tolist()
    keep.sort()
    return [files[i] for i in keep], [labels[i] for i in keep]


def split_per_class(files, labels, classes, val_fraction: float, seed: int):
    """Deterministic per-class train/val split of a single labelled folder (at least 1 val per class
    with 2+ images)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels_arr = np.asarray(labels)
    train, val = [], []
    for label, name in enumerate(classes):
        idx = np.nonzero(labels_arr == label)[0]
        if len(idx) == 0:
            continue
        n_val = min(len(idx) - 1, max(1, int(round(val_fraction * len(idx))))) if len(idx) > 1 else 0
        perm = _class_rng(seed + 7919, name).permutation(idx)
        val += perm[:n_val].tolist()
        train += perm[n_val:].tolist()
    train.sort()
    val.sort()
    return ([files[i] for i in train], [labels[i] for i in train]), ([files[i] for i in val], [labels[i] for i in val])
