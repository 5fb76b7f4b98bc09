"""What every map-style data set here shares: unreadable items are skipped, counted and reported."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch


class DataError(RuntimeError):
    """The data cannot be used: none of its files could be read, or too many in a row are unreadable. A
    RuntimeError (what these were before) that the command-line tools report in one line."""


class SkippingDataset(torch.utils.data.Dataset):
    """Subclasses implement ``_load(index)`` and ``_path(index)``; a failing item is logged in
    ``self.skipped`` (list of (path, reason)), warned about once per file, and replaced by the next
    readable item, so a long run never stops on one bad file.

    With DataLoader workers each worker logs its own skips (``skipped`` of the main-process copy
    holds the files found bad while indexing); the warnings reach the console from every worker.
    """

    max_substitutes = 32

    def __init__(self):
        self.skipped: list[tuple[str, str]] = []
        self._bad: set[str] = set()

    @property
    def draws_only_torch_rng(self) -> bool:
        """Whether an item's random draws come from torch's global generator alone (no transform, or one of
        :mod:`mae_fast.data.transforms`): the trainer then seeds only that one per item, not numpy's and
        Python's too (saving and restoring numpy's costs ~70 µs an item)."""
        t = getattr(self, "transform", None)
        return t is None or (type(t).__module__ == "mae_fast.data.transforms"
                             and getattr(t, "draws_only_torch_rng", True))

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def _skip(self, path, reason) -> None:
        path = str(path)
        if path in self._bad:
            return
        self._bad.add(path)
        self.skipped.append((path, str(reason)))
        warnings.warn(f"mae_fast.data: skipping unreadable {path}: {reason}", RuntimeWarning, stacklevel=3)

    def __getitem__(self, index):
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        for attempt in range(self.max_substitutes):
            i = (index + attempt) % n
            path = self._path(i)
            if str(path) in self._bad:
                continue
            try:
                return self._load(i)
            except Exception as err:  # noqa: BLE001 (any decoder error means: unreadable)
                self._skip(path, f"{type(err).__name__}: {err}")
        raise DataError(f"{self.max_substitutes} consecutive unreadable items from index {index}; "
                           f"skipped so far: {self.skipped[-5:]}")

    def _path(self, index):  # pragma: no cover - abstract
        raise NotImplementedError

    def _load(self, index):  # pragma: no cover - abstract
        raise NotImplementedError


def list_files(root, extensions: tuple[str, ...]) -> list[str]:
    """Files under ``root`` ending in one of ``extensions`` (recursive, sorted; hidden files and folders
    ignored); a single matching file is a list of one."""
    root = Path(root)
    def wanted(p: Path) -> bool:
        return str(p).lower().endswith(extensions)
    if root.is_file():
        return [str(root)] if wanted(root) else []
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and wanted(p)
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))
