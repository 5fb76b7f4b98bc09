"""Hours subsets (mae_fast/data/subset.py): how many frames, which spans and chunks, recorded and replayed exactly;
the frames of a subset of the demo videos are the ones played at the recorded times."""
from __future__ import annotations

import collections
import json
import math

import numpy as np
import pytest

from mae_fast.data import build_pretrain_dataset
from mae_fast.data.subset import Selection, make_record, select, selection_from_record, slots_in


@pytest.mark.parametrize("subset,chunk", [("contiguous", None), ("contiguous", 0.5), ("uniform", None)])
@pytest.mark.parametrize("fps", [1.0, 2.0])
def test_hours_subsets_are_exact_and_recorded(demo, frames_by_video, subset, chunk, fps):
    hours = 0.05  # 180 s of the 360 s
    kw = dict(img_size=32, hours=hours, subset=subset, seed=11, fps=fps, chunk_minutes=chunk,
              demo_root=demo.root.parent)
    ds = build_pretrain_dataset(None, **kw)
    rec = json.loads(json.dumps(ds.record))
    assert len(ds) == rec["n_frames"] == round(hours * 3600 * fps)
    assert rec["seconds_selected"] == 180 and rec["hours_requested"] == hours
    assert (rec["subset"], rec["seed"], rec["fps"], rec["chunk_minutes"]) == (subset, 11, fps, chunk)
    spans = [(e["file"], a, b) for e in rec["files"] for a, b in e["spans"]]
    assert math.isclose(sum(b - a for _, a, b in spans), hours * 3600)
    for entry in rec["files"]:
        assert entry["n_frames"] == round(sum(b - a for a, b in entry["spans"]) * fps)
        assert all(0 <= a < b <= entry["duration_s"] + 1e-9 for a, b in entry["spans"])
    if subset == "uniform":
        seconds = [(e["file"], s) for e in rec["files"] for s in e["seconds"]]
        assert len(seconds) == len(set(seconds)) == len(ds)
    elif chunk is None:
        assert all(len(e["spans"]) == 1 for e in rec["files"]) and len(rec["files"]) == 6  # one span per video
    else:
        chunk_s = chunk * 60
        for _, a, b in spans:  # whole aligned chunks, except where consecutive chunks merged or the last one
            assert math.isclose(a / chunk_s, round(a / chunk_s))
    # the frames are the ones played at the recorded times (source is 8 fps: frame index = 8 t): 12 samples spread
    # over the set (a seek and decode each)
    for i in range(0, len(ds), len(ds) // 12):
        src = frames_by_video[ds.files[ds.file_idx[i]]]
        assert np.array_equal(ds.frame(i), src[int(round(ds.times[i] * 8))])
    same = build_pretrain_dataset(None, **kw)
    assert same.record == ds.record
    other = build_pretrain_dataset(None, **dict(kw, seed=12))
    assert other.record["files"] != ds.record["files"]
    replay = build_pretrain_dataset(record=rec, img_size=32)
    assert replay.record["files"] == ds.record["files"] and np.array_equal(replay.times, ds.times)


def test_slots_are_whole_sample_periods_of_the_duration():
    """``floor(D * fps)`` slots: a partial last period has no sample (3.7 s at 1 fps is 3 slots, not 4)."""
    assert slots_in(3.7, 1.0) == 3
    assert slots_in(3.7, 2.5) == 9  # 9.25 periods
    assert slots_in(0.999, 1.0) == 0
    assert slots_in(60.0, 1.0) == 60  # whole periods are all kept
    assert slots_in(4.0, 0.75) == 3


def test_hours_become_the_nearest_whole_number_of_frames():
    """36.7 s at 1 fps is 37 frames (rounded, not truncated); 12.3 s at 3 fps is 37 too (36.9)."""
    durations = {"a": 100.0, "b": 41.0}
    for mode in ("contiguous", "uniform"):
        assert select(durations, 1.0, 36.7 / 3600, mode, seed=3).n_frames == 37
        assert select(durations, 3.0, 12.3 / 3600, mode, seed=3).n_frames == 37
    assert select(durations, 1.0, 36.7 / 3600, "contiguous", seed=3, chunk_minutes=0.25).n_frames == 37


def test_contiguous_spans_split_by_largest_remainder():
    """101 of 100 + 37 + 263 slots: shares 25.25, 9.3425, 66.4075 -> 25, 9, 66 plus the one left over to the
    largest remainder (c): 25, 9, 67, each one contiguous span."""
    durations = {"a": 100.0, "b": 37.0, "c": 263.0}
    for seed in range(3):
        sel = select(durations, 1.0, 101 / 3600, "contiguous", seed=seed)
        assert sel.files == ["a", "b", "c"]
        assert [len(s) for s in sel.slots] == [25, 9, 67]
        for s, n in zip(sel.slots, (100, 37, 263)):
            assert np.array_equal(s, np.arange(s[0], s[0] + len(s))) and 0 <= s[0] and s[-1] < n


def test_contiguous_start_is_uniform_over_every_position():
    """7 of 10 slots: the span starts at 0, 1, 2 or 3 (the last included), each about a quarter of 200 seeds."""
    starts = collections.Counter(int(select({"v": 10.0}, 1.0, 7 / 3600, "contiguous", seed=s).slots[0][0])
                                 for s in range(200))
    assert set(starts) == {0, 1, 2, 3}
    assert all(25 <= c <= 75 for c in starts.values())  # 50 expected each
    whole = select({"v": 10.0, "w": 3.0}, 1.0, 13 / 3600, "contiguous", seed=1)  # everything: one way only
    assert [s.tolist() for s in whole.slots] == [list(range(10)), list(range(3))]


def test_chunks_stop_at_the_video_end_and_land_exactly():
    """Half-minute chunks of 70 s and 45 s videos: [0,30) [30,60) [60,70) and [0,30) [30,45). Asking 77 s takes
    77 distinct in-range slots made of whole chunks except one cut short; asking all 115 s takes every slot."""
    durations = {"a": 70.0, "b": 45.0}
    chunk_bounds = {"a": [(0, 30), (30, 60), (60, 70)], "b": [(0, 30), (30, 45)]}
    for seed in range(8):
        sel = select(durations, 1.0, 77 / 3600, "contiguous", seed=seed, chunk_minutes=0.5)
        assert sel.n_frames == 77
        cut = 0
        for f, s in zip(sel.files, sel.slots):
            assert len(set(s.tolist())) == len(s) and s.min() >= 0 and s.max() < durations[f]
            for lo, hi in chunk_bounds[f]:
                inside = int(((s >= lo) & (s < hi)).sum())
                assert inside in (0, hi - lo) or s[(s >= lo) & (s < hi)].min() == lo
                cut += inside not in (0, hi - lo)
        assert cut <= 1
        full = select(durations, 1.0, 115 / 3600, "contiguous", seed=seed, chunk_minutes=0.5)
        assert [s.tolist() for s in full.slots] == [list(range(70)), list(range(45))]


def test_record_replays_spans_at_a_rate_whose_times_are_inexact():
    """At 7 fps slot 61 is 61/7 s, and 61/7 * 7 is 60.99999...: the replay must round, giving slots 61..70 back."""
    slots = np.arange(61, 71, dtype=np.int64)
    sel = Selection(["v"], [slots], 7.0)
    for subset, hours in (("contiguous", 10 / 7 / 3600), ("uniform", 10 / 7 / 3600), ("contiguous", None)):
        rec = make_record(sel, {"v": 20.0}, "src", hours, subset, 0)
        back = selection_from_record(rec)
        assert back.files == ["v"] and back.slots[0].tolist() == list(range(61, 71))
