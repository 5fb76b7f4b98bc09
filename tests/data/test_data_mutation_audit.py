"""Data-pipeline tests from a mutation audit (video sampling, hours subsets, shards, transforms, labelled sets).

Each test checks against an expectation computed here from first principles (a video's known frame count and
rate, PyAV decoding the frames itself, counts written out by hand, set arithmetic on file lists, fixed-seed
statistics with wide but decisive bounds), and kills a mutation of mae_fast.data that the rest of the suite let
survive. Sizes are odd on purpose; everything runs in a few seconds without the demo set.
"""
from __future__ import annotations

import collections
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mae_fast.data import build_labelled_datasets
from mae_fast.data.images import per_class_fraction, split_per_class
from mae_fast.data.shards import ShardDataset, write_shards
from mae_fast.data.subset import Selection, make_record, select, selection_from_record, slots_in
from mae_fast.data.transforms import EvalTransform, Normalize, TrainTransform, center_crop_box, random_resized_crop_box


def write_pngs(folder: Path, n: int, size=(11, 13), seed=0) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------- videos

VIDEO_RATE, VIDEO_FRAMES, VIDEO_HW = 10, 37, (46, 62)  # 3.7 s at 10 fps, 46 high x 62 wide


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 3.7 s, 10 fps, 62x46 clip (every frame different) and all its frames as PyAV decodes them in order."""
    av = pytest.importorskip("av")
    from mae_fast.data import demo

    rng = np.random.default_rng(5)
    frames = [np.clip(rng.integers(0, 255, (*VIDEO_HW, 3)) * 0.4 + 4 * i, 0, 255).astype(np.uint8)
              for i in range(VIDEO_FRAMES)]
    folder = tmp_path_factory.mktemp("clip")
    path = folder / "clip.mp4"
    demo.encode_mp4(frames, path, VIDEO_RATE, demo.pick_codec())
    with av.open(str(path)) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert len(decoded) == VIDEO_FRAMES
    return folder, path, decoded


def test_slots_are_whole_sample_periods_of_the_duration():
    """``floor(D * fps)`` slots: a partial last period has no sample (3.7 s at 1 fps is 3 slots, not 4)."""
    assert slots_in(3.7, 1.0) == 3
    assert slots_in(3.7, 2.5) == 9  # 9.25 periods
    assert slots_in(0.999, 1.0) == 0
    assert slots_in(60.0, 1.0) == 60  # whole periods are all kept
    assert slots_in(4.0, 0.75) == 3


@pytest.mark.parametrize("fps", [1.0, 2.5])
def test_clip_frames_at_fps_are_the_frames_played_then(clip, fps):
    """A 3.7 s clip at ``fps``: floor(3.7 fps) frames at k / fps, each the source frame floor(10 k / fps)."""
    from mae_fast.data import build_pretrain_dataset

    folder, _, decoded = clip
    n = math.floor(VIDEO_FRAMES / VIDEO_RATE * fps + 1e-9)
    ds = build_pretrain_dataset(folder, img_size=16, fps=fps)
    assert ds.record["files"][0]["duration_s"] == pytest.approx(VIDEO_FRAMES / VIDEO_RATE)
    assert len(ds) == n and np.allclose(ds.times, np.arange(n) / fps)
    for i in range(n):
        assert np.array_equal(ds.frame(i), decoded[math.floor(i / fps * VIDEO_RATE + 1e-9)])


def test_time_after_the_last_frame_start_is_still_the_last_frame(clip):
    """The last frame starts at 3.6 s and is shown until 3.7 s: times in between are that frame, not an error."""
    from mae_fast.data.video import RandomAccessReader, read_frames_at

    _, path, decoded = clip
    got = read_frames_at(path, [3.65, 0.35, 3.61], backend="pyav")
    assert np.array_equal(got[0], decoded[36]) and np.array_equal(got[2], decoded[36])
    assert np.array_equal(got[1], decoded[3])
    reader = RandomAccessReader(backend="pyav")
    assert np.array_equal(reader.read(str(path), 3.69), decoded[36])
    reader.close()


def test_shrink_keeps_the_aspect_by_the_longer_side():
    """``max_side`` bounds the longer side: 33 x 75 at max_side 25 becomes 11 x 25 (PIL bicubic)."""
    from PIL import Image

    from mae_fast.data.video import shrink

    frame = np.random.default_rng(0).integers(0, 255, (33, 75, 3), dtype=np.uint8)
    got = shrink(frame, 25)
    assert got.shape == (11, 25, 3)
    assert np.array_equal(got, np.asarray(Image.fromarray(frame).resize((25, 11), Image.BICUBIC)))
    tall = np.ascontiguousarray(frame.transpose(1, 0, 2))
    assert shrink(tall, 25).shape == (25, 11, 3)
    assert shrink(frame, 75) is frame  # already small enough: untouched


def test_ram_limit_counts_the_downscaled_frames(clip):
    """Whether frames stay in RAM is decided on their size after ``max_side``: 37 frames at 2.5 fps -> 9 frames,
    9 x 46 x 62 x 3 = 77004 bytes at full size, 9 x 22 x 30 x 3 = 17820 after max_side=30."""
    from mae_fast.data import build_pretrain_dataset

    folder, _, decoded = clip
    small = build_pretrain_dataset(folder, img_size=16, fps=2.5, max_side=30, ram_limit_bytes=20000)
    assert small.in_memory and len(small) == 9 and small.frame(0).shape == (22, 30, 3)
    full = build_pretrain_dataset(folder, img_size=16, fps=2.5, ram_limit_bytes=20000)
    assert not full.in_memory and np.array_equal(full.frame(3), decoded[12])


# ---------------------------------------------------------------------------------------------- hours subsets

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


# ---------------------------------------------------------------------------------------------- shards

@pytest.fixture(scope="module")
def shards13(tmp_path_factory):
    """13 images in shards of 2: shards 0..5 hold 2 samples, shard 6 holds 1."""
    root = tmp_path_factory.mktemp("shards13")
    write_pngs(root / "imgs", 13)
    index = write_shards(root / "imgs", root / "out", maxcount=2, image_format="png")
    assert [s["n_samples"] for s in index["shards"]] == [2, 2, 2, 2, 2, 2, 1]
    return root / "out"


def test_epoch_samples_split_floor_per_rank_and_remainder_over_workers(shards13):
    """64 samples over 3 ranks is 21 per rank (64 // 3, not 22), 11 + 10 over its 2 workers."""
    for rank in range(3):
        got = [sum(1 for _ in ShardDataset(shards13, rank=rank, world_size=3, worker=(w, 2), epoch_samples=64,
                                           shuffle_buffer=0)) for w in range(2)]
        assert got == [11, 10]


def test_a_subset_of_the_shards_counts_only_its_samples(shards13):
    subset = [str(shards13 / "shard-000001.tar"), str(shards13 / "shard-000006.tar")]
    ds = ShardDataset(subset, shuffle_buffer=0)
    assert ds.num_samples == 3 and sum(1 for _ in ds) == 3
    assert ShardDataset(shards13).num_samples == 13


def test_as_many_shards_as_consumers_are_split_by_shard(tmp_path):
    """7 shards for 7 consumers: each reads one whole shard (no fallback, no warning)."""
    write_pngs(tmp_path / "imgs", 13)
    write_shards(tmp_path / "imgs", tmp_path / "out", maxcount=2)
    seen = collections.Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for rank in range(7):
            metas = [m for _, m in ShardDataset(tmp_path / "out", rank=rank, world_size=7, worker=(0, 1),
                                                return_meta=True, shuffle_buffer=0)]
            assert len({m["__url__"] for m in metas}) == 1
            seen.update(m["__key__"] for m in metas)
    assert len(seen) == 13 and set(seen.values()) == {1}


# ---------------------------------------------------------------------------------------------- transforms

def _boxes(n, *args, seed=0, **kw):
    torch.manual_seed(seed)
    return np.array([random_resized_crop_box(*args, **kw) for _ in range(n)])


def test_random_resized_crop_area_within_scale():
    """Areas uniform in [0.3, 0.5] of 301 x 233: all inside (up to rounding), mean about 0.4."""
    boxes = _boxes(400, 301, 233, scale=(0.3, 0.5))
    frac = boxes[:, 2] * boxes[:, 3] / (301 * 233)
    assert frac.min() > 0.3 * 0.97 and frac.max() < 0.5 * 1.03
    assert 0.38 < frac.mean() < 0.42
    assert (boxes[:, 0] + boxes[:, 2] <= 301).all() and (boxes[:, 1] + boxes[:, 3] <= 233).all()


def test_random_resized_crop_aspect_is_log_uniform_and_width_over_height():
    """ratio (1/4, 4) is log-uniform: w < h about half the time (linear-uniform would give 1/5); ratio (1.5, 2.5)
    keeps every box wider than high within the bounds."""
    boxes = _boxes(400, 1001, 1003, scale=(0.04, 0.06), ratio=(1 / 4, 4))
    assert 0.4 < (boxes[:, 3] < boxes[:, 2]).mean() < 0.6
    boxes = _boxes(300, 1001, 1003, scale=(0.04, 0.06), ratio=(1.5, 2.5))
    aspect = boxes[:, 3] / boxes[:, 2]
    assert aspect.min() > 1.5 * 0.98 and aspect.max() < 2.5 * 1.02


def test_random_resized_crop_position_reaches_every_offset():
    """A fixed 7 x 9 box in 21 x 31: top takes each of 0..14 and left each of 0..22 (the far edge included)."""
    boxes = _boxes(2000, 21, 31, scale=(63 / 651, 63 / 651), ratio=(9 / 7, 9 / 7))
    assert set(boxes[:, 2]) == {7} and set(boxes[:, 3]) == {9}
    tops, lefts = collections.Counter(boxes[:, 0]), collections.Counter(boxes[:, 1])
    assert set(tops) == set(range(15)) and set(lefts) == set(range(23))
    assert min(tops.values()) > 2000 / 15 / 2 and min(lefts.values()) > 2000 / 23 / 2


def test_random_resized_crop_fallback_is_the_centred_box_of_clamped_aspect():
    """With no draw accepted: a 101 x 31 (tall) image keeps 41 x 31 (31 / (3/4) = 41.3), a 31 x 101 (wide) one
    31 x 41 (31 * 4/3), an in-range 40 x 45 one the whole image; all centred."""
    assert random_resized_crop_box(101, 31, attempts=0) == (30, 0, 41, 31)
    assert random_resized_crop_box(31, 101, attempts=0) == (0, 30, 31, 41)
    assert random_resized_crop_box(40, 45, attempts=0) == (0, 0, 40, 45)


def test_centre_crop_box_by_hand():
    """51 x 70 to 32 at crop_pct 0.875: cover 32/0.875 = 36.57 -> scale 32/51/0.875, kept 44.625 -> 45 square,
    top (51-45)//2 = 3, left (70-45)//2 = 12."""
    assert center_crop_box(51, 70, (32, 32), 0.875) == (3, 12, 45, 45)
    assert center_crop_box(70, 51, (32, 32), 0.875) == (12, 3, 45, 45)
    assert center_crop_box(51, 70, (51, 70), 1.0) == (0, 0, 51, 70)


def test_eval_transform_pixels_are_the_centre_crop():
    """EvalTransform(45, crop_pct=45/51) on 51 x 70 keeps image[3:48, 12:57] unresized: compare pixels."""
    image = np.random.default_rng(2).integers(0, 255, (51, 70, 3), dtype=np.uint8)
    got = EvalTransform(45, crop_pct=45 / 51)(image)
    ref = torch.from_numpy(image[3:48, 12:57].astype(np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(got, (ref - mean) / std, atol=1e-5)
    assert torch.allclose(Normalize()(ref), (ref - mean) / std)


def test_flip_probability_is_the_one_given():
    """flip=0.2 over 300 fixed-seed draws flips about 60 times (a ramp reversed); flip=0 never, flip=1 always."""
    ramp = np.tile(np.arange(0, 250, 5, dtype=np.uint8)[None, :, None], (37, 1, 3))  # 37 x 50, brighter to the right

    def flips(p, n):
        torch.manual_seed(0)
        tf = TrainTransform(15, scale=(0.9, 1.0), flip=p)
        return sum(bool(x[0, 7, -1] < x[0, 7, 0]) for x in (tf(ramp) for _ in range(n)))

    assert 30 <= flips(0.2, 300) <= 90
    assert flips(0.0, 40) == 0 and flips(1.0, 40) == 40


# ---------------------------------------------------------------------------------------------- labelled sets

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


def test_val_folder_missing_a_class_keeps_the_train_labels(tmp_path):
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
