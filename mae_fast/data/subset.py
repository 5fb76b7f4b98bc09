"""Choosing a subset of a video collection measured in hours, and recording it exactly.

Each video of duration ``D`` is cut into ``floor(D * fps)`` sampling slots of ``1 / fps`` seconds;
slot ``k`` is represented by the frame played at ``k / fps``. An ``hours`` subset is exactly
``round(hours * 3600 * fps)`` slots (at 1 fps: exactly the hours asked, to the second), drawn from
``numpy.random.default_rng(seed)`` in one of three ways:

* ``contiguous`` (default), ``chunk_minutes=None``: one contiguous span per video, the spans'
  lengths proportional to the videos' lengths, each at a random start.
* ``contiguous`` with ``chunk_minutes=N``: videos are cut into aligned N-minute chunks; random chunks
  are taken whole until the total is reached (the last one cut short to land exactly).
* ``uniform``: slots drawn uniformly without replacement from the whole collection.

The record (JSON-able) lists per file the selected spans ``[start_s, end_s)`` (and for ``uniform``
also every selected time), which is enough to rebuild the same frames with :func:`selection_from_record`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SUBSET_MODES = ("contiguous", "uniform")


@dataclass
class Selection:
    """Selected slot indices (sorted int64 arrays) per file, in the order of ``files``."""

    files: list[str]
    slots: list[np.ndarray]
    fps: float

    @property
    def n_frames(self) -> int:
        return int(sum(len(s) for s in self.slots))

    def times(self, i: int) -> np.ndarray:
        return self.slots[i] / self.fps


def check_fps(fps) -> float:
    fps = float(fps)
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number of frames per second, got {fps}")
    return fps


def slots_in(duration_s: float, fps: float) -> int:
    return max(0, int(math.floor(duration_s * fps + 1e-6)))


def _spans(slots: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive slot indices as half-open (start, end) pairs."""
    if len(slots) == 0:
        return []
    breaks = np.nonzero(np.diff(slots) != 1)[0]
    starts = np.concatenate([[slots[0]], slots[breaks + 1]])
    ends = np.concatenate([slots[breaks], [slots[-1]]]) + 1
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


def _proportional(total: int, lengths: np.ndarray) -> np.ndarray:
    """Split ``total`` into integers proportional to ``lengths`` (largest remainder; never above a length)."""
    share = total * lengths / lengths.sum()
    alloc = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - alloc), kind="stable")
    alloc[order[: total - int(alloc.sum())]] += 1
    return np.minimum(alloc, lengths)


def select(durations: dict, fps: float = 1.0, hours=None, subset: str = "contiguous", seed: int = 0,
           chunk_minutes=None) -> Selection:
    """Pick sampling slots from videos ``{path: duration_s}`` (see module docstring)."""
    fps = check_fps(fps)
    if subset not in SUBSET_MODES:
        raise ValueError(f"subset must be one of {SUBSET_MODES}, got {subset!r}")
    files = list(durations)
    lengths = np.array([slots_in(durations[f], fps) for f in files], dtype=np.int64)
    available = int(lengths.sum())
    if available == 0:
        raise ValueError(f"no frames to sample at fps={fps}: the videos are shorter than one sample period "
                         f"({1 / fps:g} s): {', '.join(f'{f} ({durations[f]:.3g} s)' for f in files[:3])}"
                         + (f" and {len(files) - 3} more" if len(files) > 3 else ""))
    if hours is None:  # every slot of every video; one shorter than a sample period has none and is left out
        return Selection([f for f, n in zip(files, lengths) if n], [np.arange(n, dtype=np.int64) for n in lengths
                                                                     if n], fps)
    hours = float(hours)
    if not math.isfinite(hours) or hours <= 0:
        raise ValueError(f"hours must be positive, got {hours}")
    wanted = int(round(hours * 3600 * fps))
    if wanted < 1:
        raise ValueError(f"hours={hours} is less than one frame at fps={fps}")
    if wanted > available:
        raise ValueError(f"hours={hours} asked but the source holds only {available / fps / 3600:.4f} h "
                         f"({available} frames at fps={fps}, {len(files)} readable videos)")
    rng = np.random.default_rng(seed)
    slots = [np.zeros(0, np.int64) for _ in files]
    if subset == "uniform":
        picked = np.sort(rng.choice(available, size=wanted, replace=False))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        owner = np.searchsorted(offsets, picked, side="right") - 1
        for i in np.unique(owner):
            slots[i] = picked[owner == i] - offsets[i]
    elif chunk_minutes is None:
        alloc = _proportional(wanted, lengths)
        for i, (n, take) in enumerate(zip(lengths, alloc)):
            if take:
                start = int(rng.integers(0, n - take + 1))
                slots[i] = np.arange(start, start + take, dtype=np.int64)
    else:
        chunk = int(round(float(chunk_minutes) * 60 * fps))
        if chunk < 1:
            raise ValueError(f"chunk_minutes={chunk_minutes} is less than one frame at fps={fps}")
        chunks = [(i, s, min(chunk, int(n) - s)) for i, n in enumerate(lengths) for s in range(0, int(n), chunk)]
        remaining = wanted
        parts: list[list[np.ndarray]] = [[] for _ in files]
        for k in rng.permutation(len(chunks)):
            if remaining == 0:
                break
            i, s, n = chunks[k]
            take = min(n, remaining)
            parts[i].append(np.arange(s, s + take, dtype=np.int64))
            remaining -= take
        slots = [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]
    keep = [i for i, s in enumerate(slots) if len(s)]
    return Selection([files[i] for i in keep], [slots[i] for i in keep], fps)


def make_record(selection: Selection, durations: dict, source, hours, subset: str, seed: int,
                chunk_minutes=None, skipped=()) -> dict:
    """The JSON-able description of ``selection`` that a training run saves."""
    fps = selection.fps
    available = sum(slots_in(d, fps) for d in durations.values())
    files = []
    for path, slots in zip(selection.files, selection.slots):
        entry = {"file": str(path), "duration_s": round(float(durations[path]), 6), "n_frames": int(len(slots)),
                 "spans": [[a / fps, b / fps] for a, b in _spans(slots)]}
        if subset == "uniform" and hours is not None:
            entry["seconds"] = [float(k / fps) for k in slots]
        files.append(entry)
    return {
        "kind": "video",
        "source": [str(s) for s in source] if isinstance(source, (list, tuple)) else str(source),
        "fps": fps,
        "hours_requested": None if hours is None else float(hours),
        "subset": "all" if hours is None else subset,
        "chunk_minutes": chunk_minutes,
        "seed": int(seed),
        "n_frames": selection.n_frames,
        "seconds_selected": selection.n_frames / fps,
        "hours_selected": selection.n_frames / fps / 3600,
        "hours_available": available / fps / 3600,
        "n_videos_available": len(durations),
        "files": files,
        "skipped": [[str(p), str(r)] for p, r in skipped],
    }


def selection_from_record(record: dict) -> Selection:
    """Rebuild the exact selection saved in ``record`` (by :func:`make_record`)."""
    fps = check_fps(record["fps"])
    files, slots = [], []
    for entry in record["files"]:
        if "seconds" in entry:
            s = np.round(np.asarray(entry["seconds"], dtype=np.float64) * fps).astype(np.int64)
        else:
            s = np.concatenate([np.arange(int(round(a * fps)), int(round(b * fps)), dtype=np.int64)
                                for a, b in entry["spans"]] or [np.zeros(0, np.int64)])
        files.append(entry["file"])
        slots.append(np.sort(s))
    return Selection(files, slots, fps)
