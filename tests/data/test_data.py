"""mae_fast.data: demo generation, hours subsets, corrupt-file handling, shards, labelled sets, transforms."""
from __future__ import annotations

import collections
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from mae_fast.data import (IMAGENET_MEAN, IMAGENET_STD, build_labelled_datasets,  # noqa: E402
                           build_pretrain_dataset, ensure_demo_data)
from mae_fast.data import demo as demo_mod  # noqa: E402
from mae_fast.data.shards import ShardDataset, write_shards  # noqa: E402
from mae_fast.data.transforms import EvalTransform, TrainTransform, crop_resize  # noqa: E402
from mae_fast.data.video import RandomAccessReader, probe_video, read_frames_at  # noqa: E402

SMALL = dict(n_videos=2, seconds=6, video_fps=8, video_size=48, n_train=3, n_val=2, image_size=32,
             world_size=512, n_objects=80)


def all_frames(path) -> np.ndarray:
    """Every frame of a video, decoded sequentially (the reference for time-based reads)."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def png_pixels(folder: Path) -> dict:
    from PIL import Image

    return {str(p.relative_to(folder)): np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.rglob("*.png"))}


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The default demo set, generated once for the session into a temporary cache."""
    return ensure_demo_data(tmp_path_factory.mktemp("demo_cache"), verbose=False)


@pytest.fixture(scope="session")
def frames_by_video(demo):
    return {str(p): all_frames(p) for p in sorted(demo.videos.glob("*.mp4"))}


# ---------------------------------------------------------------------------------------------- demo

def test_demo_generation_is_deterministic(tmp_path):
    a = demo_mod.generate(tmp_path / "a", seed=3, **SMALL)
    b = demo_mod.generate(tmp_path / "b", seed=3, **SMALL)
    c = demo_mod.generate(tmp_path / "c", seed=4, **SMALL)
    assert [v["file"] for v in a["videos"]] == [v["file"] for v in b["videos"]]
    for entry in a["videos"]:
        fa, fb = all_frames(tmp_path / "a/videos" / entry["file"]), all_frames(tmp_path / "b/videos" / entry["file"])
        assert fa.shape == (SMALL["seconds"] * SMALL["video_fps"], 48, 48, 3)
        assert np.array_equal(fa, fb)
        assert fa.std() > 10  # not a blank video
        assert not np.array_equal(fa, all_frames(tmp_path / "c/videos" / entry["file"]))
    pa, pb = png_pixels(tmp_path / "a/labelled"), png_pixels(tmp_path / "b/labelled")
    assert len(pa) == 8 * (3 + 2) and pa.keys() == pb.keys()
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)


def test_demo_default_layout_and_cache(demo, frames_by_video):
    assert demo.root.name.startswith(f"v{demo_mod.DEMO_VERSION}-seed0")
    assert len(frames_by_video) == 6
    for frames in frames_by_video.values():
        assert frames.shape == (480, 96, 96, 3)  # 60 s at 8 fps, 96 x 96
    for split, n in (("train", 40), ("val", 10)):
        classes = sorted(p.name for p in (demo.labelled / split).iterdir())
        assert classes == sorted(demo_mod.CLASSES)
        assert all(len(list((demo.labelled / split / c).glob("*.png"))) == n for c in classes)
    again = ensure_demo_data(demo.root.parent, verbose=False)  # cached: no regeneration
    assert again.root == demo.root and again.manifest == demo.manifest


def test_interrupted_generation_is_redone(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    first = ensure_demo_data(root, verbose=False, **SMALL)
    (root / ".tmp-leftover-of-a-killed-run").mkdir()
    (first.root / "manifest.json").unlink()  # as if killed before the end
    calls = []
    real = demo_mod.generate
    monkeypatch.setattr(demo_mod, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = ensure_demo_data(root, verbose=False, **SMALL)
    assert calls == [1] and (second.root / "manifest.json").is_file()
    assert sorted(p.name for p in second.videos.glob("*.mp4")) == ["walk_000.mp4", "walk_001.mp4"]
    ensure_demo_data(root, verbose=False, **SMALL)
    assert calls == [1]  # complete now: reused
    monkeypatch.setenv("MAE_FAST_DATA", str(root))
    assert demo_mod.default_cache_dir() == root


# ---------------------------------------------------------------------------------------------- pretraining data

def test_demo_pretrain_dataset_items(demo):
    ds = build_pretrain_dataset(None, img_size=64, demo_root=demo.root.parent)
    assert len(ds) == 360 and ds.in_memory and ds.skipped == []
    json.dumps(ds.record)
    assert ds.record["n_frames"] == 360 and ds.record["subset"] == "all" and ds.record["fps"] == 1.0
    torch.manual_seed(0)
    x = ds[5]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and torch.isfinite(x).all()
    torch.manual_seed(0)
    assert torch.equal(x, ds[5])  # augmentation follows torch's RNG
    assert not torch.equal(ds[5], ds[5])
    ev = build_pretrain_dataset("demo", img_size=(48, 64), train=False, demo_root=demo.root.parent)
    assert ev[7].shape == (3, 48, 64) and torch.equal(ev[7], ev[7])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True)))
    assert batch.shape == (32, 3, 64, 64)


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
    # the frames are the ones played at the recorded times (source is 8 fps: frame index = 8 t)
    for i in range(0, len(ds), 17):
        src = frames_by_video[ds.files[ds.file_idx[i]]]
        assert np.array_equal(ds.frame(i), src[int(round(ds.times[i] * 8))])
    same = build_pretrain_dataset(None, **kw)
    assert same.record == ds.record
    other = build_pretrain_dataset(None, **dict(kw, seed=12))
    assert other.record["files"] != ds.record["files"]
    replay = build_pretrain_dataset(record=rec, img_size=32)
    assert replay.record["files"] == ds.record["files"] and np.array_equal(replay.times, ds.times)


def test_lazy_decoding_matches_in_memory(demo):
    kw = dict(img_size=32, hours=0.02, subset="uniform", seed=5, demo_root=demo.root.parent)
    ram = build_pretrain_dataset(None, **kw)
    lazy = build_pretrain_dataset(None, ram_limit_bytes=0, **kw)
    assert ram.in_memory and not lazy.in_memory and len(ram) == len(lazy) == 72
    order = np.random.default_rng(0).permutation(len(lazy))  # random access: seeks back and forth
    for i in order[:40]:
        assert np.array_equal(lazy.frame(i), ram.frame(i))


def test_max_side_downscales_at_decode(demo):
    from PIL import Image

    kw = dict(img_size=32, hours=0.01, subset="uniform", seed=4, demo_root=demo.root.parent)
    full = build_pretrain_dataset(None, **kw)
    small = build_pretrain_dataset(None, max_side=40, **kw)
    lazy = build_pretrain_dataset(None, max_side=40, ram_limit_bytes=0, **kw)
    for i in range(0, len(full), 5):
        ref = np.asarray(Image.fromarray(full.frame(i)).resize((40, 40), Image.BICUBIC))
        assert small.frame(i).shape == (40, 40, 3)
        assert np.array_equal(small.frame(i), ref) and np.array_equal(lazy.frame(i), ref)


def test_read_frames_between_source_frames(demo, frames_by_video):
    path = sorted(frames_by_video)[1]
    src = frames_by_video[path]
    times = [59.99, 0.0, 0.06, 0.125, 13.3, 30.0, 7.5]
    got = read_frames_at(path, times, backend="pyav")
    for t, frame in zip(times, got):
        assert np.array_equal(frame, src[int(math.floor(t * 8 + 1e-9))])  # the frame on screen at t


def test_image_folder_source(demo, tmp_path):
    shutil.copytree(demo.labelled / "val", tmp_path / "imgs")
    ds = build_pretrain_dataset(tmp_path / "imgs", img_size=32)
    assert len(ds) == 80 and ds[0].shape == (3, 32, 32) and ds.record["kind"] == "images"


# ---------------------------------------------------------------------------------------------- corrupt input

def test_corrupt_files_are_skipped_and_counted(demo, tmp_path):
    vids = tmp_path / "videos"
    vids.mkdir()
    good = sorted(demo.videos.glob("*.mp4"))[:2]
    for p in good:
        shutil.copy(p, vids / p.name)
    data = good[0].read_bytes()
    (vids / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (vids / "garbage.mkv").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.warns(RuntimeWarning, match="skipping"):
        ds = build_pretrain_dataset(vids, img_size=32)
    assert len(ds) == 120  # the two readable minutes at 1 fps
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["garbage.mkv", "truncated.mp4"]
    assert all(reason for _, reason in ds.skipped) and len(ds.record["skipped"]) == 2
    for i in range(len(ds)):
        ds[i]

    imgs = tmp_path / "images"
    shutil.copytree(demo.labelled / "val" / "disc_spokes", imgs)
    (imgs / "garbage.jpg").write_bytes(b"not a jpeg at all" * 50)
    png = sorted(imgs.glob("*.png"))[0].read_bytes()
    (imgs / "truncated.png").write_bytes(png[: len(png) // 2])  # header fine, data cut: fails only on decode
    with pytest.warns(RuntimeWarning):
        ds = build_pretrain_dataset(imgs, img_size=32)
        assert [Path(p).name for p, _ in ds.skipped] == ["garbage.jpg"]
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == len(ds) == 11 and all(x.shape == (3, 32, 32) for x in items)
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["garbage.jpg", "truncated.png"]


# ---------------------------------------------------------------------------------------------- shards

def test_shards_roundtrip_every_frame_once(demo, tmp_path):
    out = tmp_path / "shards"
    index = write_shards(demo.videos, out, hours=0.02, subset="uniform", seed=2, maxcount=10,
                         image_format="png")
    assert index["n_samples"] == 72 and len(index["shards"]) == 8
    rec = json.loads((out / "record.json").read_text())
    ref = build_pretrain_dataset(demo.videos, img_size=32, hours=0.02, subset="uniform", seed=2)
    assert rec["files"] == ref.record["files"]
    expected = {(ref.files[ref.file_idx[i]], float(ref.times[i])): ref.frame(i) for i in range(len(ref))}

    seen = collections.Counter()
    for rank in range(2):
        for worker in range(2):
            ds = ShardDataset(out, rank=rank, world_size=2, worker=(worker, 2), return_meta=True, shuffle_buffer=16)
            for image, meta in ds:
                seen[(meta["file"], meta["t"])] += 1
                assert np.array_equal(image, expected[(meta["file"], meta["t"])])  # png: lossless
    assert set(seen) == set(expected) and set(seen.values()) == {1}

    # fewer shards than consumers: split by sample instead, still exactly once
    few = tmp_path / "few"
    write_shards(demo.videos, few, hours=0.01, seed=2, maxcount=1000)
    seen = collections.Counter()
    with pytest.warns(RuntimeWarning, match="splitting by sample"):
        for rank in range(2):
            for worker in range(2):
                for _, meta in ShardDataset(few, rank=rank, world_size=2, worker=(worker, 2), return_meta=True):
                    seen[meta["__key__"]] += 1
    assert len(seen) == 36 and set(seen.values()) == {1}

    ds = build_pretrain_dataset(str(out / "shard-{000000..000007}.tar"), img_size=32, seed=1)
    assert isinstance(ds, torch.utils.data.IterableDataset) and ds.num_samples == 72
    assert ds.record["hours_selected"] == 0.02
    first = [m["__key__"] for _, m in ShardDataset(out, return_meta=True, seed=1)]
    again = ShardDataset(out, return_meta=True, seed=1)
    assert [m["__key__"] for _, m in again] == first  # reproducible
    assert [m["__key__"] for _, m in again] != first  # next pass: new order
    wds = pytest.importorskip("webdataset")  # the shards are plain WebDataset: its own reader agrees
    plain = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False, empty_check=False))
    assert sorted(s["__key__"] for s in plain) == sorted(s["__key__"] for s in
                                                         map(lambda m: m[1], ShardDataset(out, return_meta=True)))
    assert all(set(s) >= {"png", "json"} for s in plain)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    batches = list(loader)
    assert sum(b.shape[0] for b in batches) == 72 and batches[0].shape[1:] == (3, 32, 32)


def test_corrupt_shard_is_skipped(demo, tmp_path):
    out = tmp_path / "shards"
    write_shards(demo.videos, out, hours=0.01, seed=0, maxcount=12)
    victim = out / "shard-000001.tar"
    victim.write_bytes(victim.read_bytes()[:3000])
    ds = ShardDataset(out, shuffle_buffer=0)
    with pytest.warns(RuntimeWarning):
        n = sum(1 for _ in ds)
    assert 24 <= n < 36 and ds.skipped


# ---------------------------------------------------------------------------------------------- labelled

def test_labelled_fraction_per_class(demo):
    root = demo.root.parent
    train, val, classes = build_labelled_datasets(None, img_size=32, demo_root=root)
    assert classes == sorted(demo_mod.CLASSES) and len(train) == 320 and len(val) == 80
    for fraction, per_class in ((0.1, 4), (0.02, 1), (0.5, 20)):
        tr, va, _ = build_labelled_datasets(None, img_size=32, fraction=fraction, seed=3, demo_root=root)
        assert collections.Counter(tr.labels) == {c: per_class for c in range(8)}
        assert len(va) == 80
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


# ---------------------------------------------------------------------------------------------- errors

def test_bad_inputs_raise_clear_errors(demo, tmp_path):
    root = demo.root.parent
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_pretrain_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no videos"):
        build_pretrain_dataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="only 0.1000 h"):
        build_pretrain_dataset(None, hours=0.2, demo_root=root)
    for fps in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="fps must be a positive number"):
            build_pretrain_dataset(None, fps=fps, demo_root=root)
    with pytest.raises(ValueError, match="hours must be positive"):
        build_pretrain_dataset(None, hours=0, demo_root=root)
    with pytest.raises(ValueError, match="subset must be one of"):
        build_pretrain_dataset(None, hours=0.01, subset="random", demo_root=root)
    with pytest.raises(ValueError, match="img_size"):
        build_pretrain_dataset(None, img_size=0, demo_root=root)
    with pytest.raises(ValueError, match="hours applies to video"):
        build_pretrain_dataset(demo.labelled / "val", hours=0.01)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_labelled_datasets(tmp_path / "nope")
    with pytest.raises(ValueError, match="fraction"):
        build_labelled_datasets(None, fraction=0, demo_root=root)
    with pytest.raises(FileNotFoundError, match="class sub-folders"):
        build_labelled_datasets(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- transforms

def test_resize_matches_pil_bicubic():
    from PIL import Image

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (12, 15, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    image = np.clip(smooth.astype(int) + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
    box = (5, 9, 77, 91)
    ours = crop_resize(image, box, (37, 45)).permute(1, 2, 0).numpy() * 255
    crop = Image.fromarray(image[5:82, 9:100])
    ref = np.asarray(crop.resize((45, 37), Image.BICUBIC), dtype=np.float64)
    assert np.abs(ours - ref).mean() < 1.0 and np.abs(ours - ref).max() < 12


def test_transforms_normalise_and_crop():
    image = np.full((50, 70, 3), (124, 116, 104), np.uint8)  # ~ the ImageNet mean
    ev = EvalTransform(32)(image)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(ev, (torch.tensor([124, 116, 104]).view(3, 1, 1) / 255 - mean) / std, atol=1e-6)
    grad = np.tile(np.arange(100, dtype=np.uint8)[None, :, None], (100, 1, 3))
    torch.manual_seed(1)
    crops = [TrainTransform(16, scale=(0.2, 1.0))(grad) for _ in range(20)]
    assert all(c.shape == (3, 16, 16) for c in crops)
    flipped = [bool((c[0, 0, -1] < c[0, 0, 0]).item()) for c in crops]  # horizontal flips reverse the ramp
    assert 3 <= sum(flipped) <= 17
    torch.manual_seed(1)
    assert all(torch.equal(a, TrainTransform(16)(grad)) for a in crops[:3])


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original"])
def test_finetuning_augmentation_is_timms_in_maes_order(policy):
    """auto_augment and re_prob: crop and flip (as without them), then timm's policy on the uint8 PIL crop, normalise,
    then timm's RandomErasing, draw for draw; rebuilt here from timm's pieces on the plain transform's output."""
    import random

    from PIL import Image
    from timm.data import auto_augment as aa
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import str_to_pil_interp

    from mae_fast.data.transforms import Normalize, denormalize

    image = np.random.default_rng(3).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    size = (24, 40)
    tf = TrainTransform(size, auto_augment=policy, re_prob=1.0)
    assert not tf.draws_only_torch_rng and TrainTransform(size).draws_only_torch_rng
    assert policy in repr(tf) and "re_prob=1.0" in repr(tf)
    hp = {"translate_const": int(24 * 0.45), "img_mean": (124, 116, 104), "interpolation": str_to_pil_interp("bicubic")}
    for seed in range(4):
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        got = tf(image)
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        crop = denormalize(TrainTransform(size)(image))  # the same torch draws: box and flip
        pil = Image.fromarray(crop.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
        if policy.startswith("rand"):
            policy_tf = aa.rand_augment_transform(policy, dict(hp))
        elif policy.startswith("augmix"):
            policy_tf = aa.augment_and_mix_transform(policy, dict(hp, translate_pct=0.3))
        else:
            policy_tf = aa.auto_augment_transform(policy, dict(hp))
        out = torch.from_numpy(np.array(policy_tf(pil), dtype=np.uint8)).permute(2, 0, 1).float() / 255
        want = RandomErasing(probability=1.0, mode="pixel", device="cpu")(Normalize()(out))
        assert got.shape == (3, *size) and torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(got, TrainTransform(size)(image))
    with pytest.raises(ValueError, match="auto_augment 'rand-q9' is not a policy timm knows"):
        TrainTransform(16, auto_augment="rand-q9")
    with pytest.raises(ValueError, match=r"re_prob must be in \[0, 1\]"):
        TrainTransform(16, re_prob=1.5)


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


def test_shards_equal_share_per_rank_with_epoch_samples(demo, tmp_path):
    out = tmp_path / "shards"
    write_shards(demo.videos, out, hours=0.01, seed=1, maxcount=5, image_format="png")  # 36 frames, 8 shards
    counts, seen = {}, collections.Counter()
    for rank in range(3):
        for worker in range(2):
            ds = ShardDataset(out, rank=rank, world_size=3, worker=(worker, 2), epoch_samples=60, return_meta=True)
            keys = [m["__key__"] for _, m in ds]
            counts[rank, worker] = len(keys)
            seen.update(keys)
    assert [counts[r, 0] + counts[r, 1] for r in range(3)] == [20, 20, 20]  # 60 // 3 per rank, cycling
    assert len(seen) == 36  # every frame reached


def test_list_of_video_files_source(demo):
    files = sorted(demo.videos.glob("*.mp4"))[:2]
    ds = build_pretrain_dataset([str(f) for f in files], img_size=32, hours=0.02, subset="uniform", seed=0)
    assert len(ds) == 72 and {Path(e["file"]).name for e in ds.record["files"]} <= {f.name for f in files}


# ---------------------------------------------------------------------------------------------- containers, backends

def _write_video(path, frames, codec, rate=10, first_pts=0):
    from fractions import Fraction

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height = frames[0].shape[1], frames[0].shape[0]
        s.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        s.codec_context.time_base = Fraction(1, rate)
        s.codec_context.gop_size = rate
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = i + first_pts, Fraction(1, rate)
            for pk in s.encode(vf):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)


@pytest.mark.parametrize("ext,codec,first_pts", [("mkv", "mpeg4", 0), ("mkv", "mpeg4", 14), ("webm", "libvpx-vp9", 0),
                                                 ("mp4", "mpeg4", 14), ("ts", "mpeg4", 14), ("avi", "mjpeg", 0)])
def test_containers_durations_and_frames(tmp_path, ext, codec, first_pts):
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} not in this ffmpeg")
    rng = np.random.default_rng(1)
    frames = [np.clip(rng.integers(0, 255, (48, 64, 3)) * 0.3 + 5 * i, 0, 255).astype(np.uint8) for i in range(40)]
    path = tmp_path / f"clip.{ext}"
    _write_video(path, frames, codec, first_pts=first_pts)  # 4 s at 10 fps, maybe starting at 1.4 s
    ref = all_frames(path)
    ds = build_pretrain_dataset(tmp_path, img_size=32, fps=2.0)
    assert len(ds) == 8 and ds.record["files"][0]["duration_s"] == pytest.approx(4.0)
    lazy = build_pretrain_dataset(tmp_path, img_size=32, fps=2.0, ram_limit_bytes=0)
    for i in [7, 0, 5, 2, 6]:
        assert np.array_equal(ds.frame(i), ref[int(round(ds.times[i] * 10))])
        assert np.array_equal(lazy.frame(i), ds.frame(i))


def test_torchcodec_without_ffmpeg_falls_back_to_pyav(demo, monkeypatch):
    """pip's torchcodec imports without FFmpeg and fails at the first decode: auto must pick PyAV then, and an
    explicit request must say why it cannot."""
    import sys
    import types

    from mae_fast.data import video

    def load_core_libraries():
        raise RuntimeError("Could not load libtorchcodec. Likely causes:\n  1. FFmpeg is not properly installed")

    package, decoders, utils = (types.ModuleType(n) for n in
                                ("torchcodec", "torchcodec.decoders", "torchcodec._internally_replaced_utils"))
    decoders.VideoDecoder = lambda *a, **k: pytest.fail("auto must not decode with an unusable torchcodec")
    utils.load_core_libraries = load_core_libraries
    package.decoders, package._internally_replaced_utils = decoders, utils
    for name, mod in (("torchcodec", package), ("torchcodec.decoders", decoders),
                      ("torchcodec._internally_replaced_utils", utils)):
        monkeypatch.setitem(sys.modules, name, mod)
    assert video.resolve_backend("auto") == "pyav"
    reason = video.torchcodec_unusable_reason()
    assert "cannot load FFmpeg's libraries" in reason and "Could not load libtorchcodec" in reason
    with pytest.raises(ImportError, match="'torchcodec' requested, but torchcodec is installed but cannot load"):
        video.resolve_backend("torchcodec")
    ds = build_pretrain_dataset(None, video_backend="auto", img_size=32, hours=0.01, subset="uniform", seed=3,
                                demo_root=demo.root.parent)
    assert ds.backend == "pyav" and len(ds) > 0 and ds.frame(0).shape[-1] == 3


def _real_torchcodec_or_skip(path):
    """torchcodec when it is installed and can load FFmpeg here (it does not bundle it), else skip."""
    pytest.importorskip("torchcodec.decoders")
    try:
        probe_video(path, backend="torchcodec")
    except (OSError, RuntimeError, ImportError) as e:
        pytest.skip(f"torchcodec installed but cannot decode here: {str(e).splitlines()[0][:120]}")


@pytest.mark.parametrize("ext,codec,first_pts", [("mkv", "mpeg4", 14), ("webm", "libvpx-vp9", 0),
                                                 ("ts", "mpeg4", 14), ("avi", "mjpeg", 0)])
def test_real_torchcodec_reads_the_frames_pyav_reads(tmp_path, ext, codec, first_pts):
    """Where torchcodec is installed (auto then prefers it), it must give the same frames at the same times as
    PyAV: the frame played at t, streams that start late, seeks backwards, and times past the end."""
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} not in this ffmpeg")
    rng = np.random.default_rng(2)
    frames = [np.clip(rng.integers(0, 255, (48, 64, 3)) * 0.3 + 5 * i, 0, 255).astype(np.uint8) for i in range(40)]
    path = tmp_path / f"clip.{ext}"
    _write_video(path, frames, codec, first_pts=first_pts)
    _real_torchcodec_or_skip(path)
    assert probe_video(path, "torchcodec").duration_s == pytest.approx(probe_video(path, "pyav").duration_s, abs=0.11)
    times = [3.95, 0.0, 0.05, 0.1, 1.37, 2.0, 0.99, 3.9]  # unsorted: read_frames_at keeps the given order
    tc, pa = read_frames_at(path, times, "torchcodec"), read_frames_at(path, times, "pyav")
    assert tc.shape == pa.shape == (len(times), 48, 64, 3) and np.array_equal(tc, pa)
    ref = all_frames(path)
    assert np.array_equal(tc[3], ref[1]) and np.array_equal(tc[5], ref[20])  # 10 fps from the stream start
    reader = RandomAccessReader(backend="torchcodec")
    assert all(np.array_equal(reader.read(str(path), t), pa[i]) for i, t in enumerate(times))


def test_real_torchcodec_and_pyav_build_the_same_demo_dataset(demo):
    _real_torchcodec_or_skip(next(iter(sorted(demo.videos.glob("*.mp4")))))
    kw = dict(img_size=32, hours=0.02, subset="uniform", seed=9, demo_root=demo.root.parent)
    tc = build_pretrain_dataset(None, video_backend="torchcodec", **kw)
    pa = build_pretrain_dataset(None, video_backend="pyav", **kw)
    assert tc.backend == "torchcodec" and tc.record == pa.record and len(tc) > 50
    assert all(np.array_equal(tc.frame(i), pa.frame(i)) for i in range(len(tc)))


def test_torchcodec_adapter_with_a_stand_in(demo, monkeypatch):
    """The torchcodec path (not installed here) against a stand-in with its documented interface."""
    import sys
    import types

    decoded = {}

    class FakeDecoder:
        def __init__(self, source, dimension_order="NCHW", seek_mode="exact"):
            assert dimension_order == "NHWC"
            if str(source) not in decoded:
                decoded[str(source)] = all_frames(source)
            self.frames = decoded[str(source)]
            self.metadata = types.SimpleNamespace(duration_seconds=len(self.frames) / 8, average_fps=8.0,
                                                  width=96, height=96, begin_stream_seconds=0.0)

        def get_frames_played_at(self, seconds):
            idx = [int(math.floor(t * 8 + 1e-9)) for t in seconds]
            return types.SimpleNamespace(data=torch.from_numpy(self.frames[idx]))

    decoders = types.ModuleType("torchcodec.decoders")
    decoders.VideoDecoder = FakeDecoder
    utils = types.ModuleType("torchcodec._internally_replaced_utils")
    utils.load_core_libraries = lambda: (7, "libtorchcodec_core7.so")  # FFmpeg found
    package = types.ModuleType("torchcodec")
    package.decoders, package._internally_replaced_utils = decoders, utils
    monkeypatch.setitem(sys.modules, "torchcodec", package)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", decoders)
    monkeypatch.setitem(sys.modules, "torchcodec._internally_replaced_utils", utils)
    kw = dict(img_size=32, hours=0.02, subset="uniform", seed=9, demo_root=demo.root.parent)
    tc = build_pretrain_dataset(None, video_backend="auto", **kw)
    pa = build_pretrain_dataset(None, video_backend="pyav", **kw)
    assert tc.backend == "torchcodec" and pa.backend == "pyav" and tc.record == pa.record
    assert all(np.array_equal(tc.frame(i), pa.frame(i)) for i in range(len(tc)))
    lazy = build_pretrain_dataset(None, video_backend="torchcodec", ram_limit_bytes=0, **kw)
    assert all(np.array_equal(lazy.frame(i), pa.frame(i)) for i in range(0, len(pa), 9))
