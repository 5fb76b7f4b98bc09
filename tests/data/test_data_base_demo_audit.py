"""Tests from a mutation audit of the MAE model, the built-in demo data and the distributed helpers.

Covers mae_fast/models/mae.py (the whole forward against an fp64 re-implementation of the official MAE
formulas written here, on a non-square image with 2 channels; masking semantics; initialisation; input
checks), mae_fast/data/base.py (item substitution, skip bookkeeping, file listing), mae_fast/data/demo.py
(value noise, bilinear lookup, BT.601 conversion, mip levels, cache folder handling, the camera walk) and
train/distributed.py (device and strategy choice, wrapping, the collective helpers over two gloo processes,
whole state dicts). Each test kills a mutation that the rest of the suite let survive; expectations are
computed independently (hand-computed values, fp64 formulas, small loops), on random inputs of odd sizes.
"""
from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mae_fast
from mae_fast.data import base as base_mod
from mae_fast.data import demo as demo_mod
from mae_fast.training import distributed as dist_mod


# ============================================================================================ base.py

class _Items(base_mod.SkippingDataset):
    """Items 0..n-1; those in ``bad`` fail to load. Counts loads per item."""

    def __init__(self, n, bad=()):
        super().__init__()
        self.n, self.bad, self.loads = n, set(bad), []

    def __len__(self):
        return self.n

    def _path(self, i):
        return f"item{i}"

    def _load(self, i):
        self.loads.append(i)
        if i in self.bad:
            raise OSError(f"cannot read {i}")
        return i


def test_item_indices_are_python_sequence_indices():
    """-n .. n-1 are items (-n is item 0); n and -n-1 are IndexErrors."""
    ds = _Items(7)
    assert [ds[i] for i in (0, 6, -1, -7)] == [0, 6, 6, 0]
    for i in (7, -8):
        with pytest.raises(IndexError):
            ds[i]


def test_unreadable_item_is_replaced_by_the_next_readable_one_wrapping_round():
    """A bad item gives the next readable item (wrapping past the end); each bad file is logged and warned
    about once and never decoded again."""
    ds = _Items(7, bad={3, 4, 6})
    with pytest.warns(RuntimeWarning) as rec:
        assert ds[3] == 5 and ds[6] == 0
    assert len(rec) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[4] == 5 and ds[3] == 5 and ds[-1] == 0
    assert [p for p, _ in ds.skipped] == ["item3", "item4", "item6"] and ds.num_skipped == 3
    assert sorted(ds.loads).count(3) == 1 and ds.loads.count(4) == 1 and ds.loads.count(6) == 1
    assert "OSError: cannot read 3" in ds.skipped[0][1]


def test_a_file_reported_bad_twice_is_logged_and_warned_about_once():
    """Subclasses report files found bad while indexing or streaming (a bad shard, each epoch) straight to
    ``_skip``: a second report of the same file adds no entry and no warning."""
    ds = _Items(3)
    with pytest.warns(RuntimeWarning) as rec:
        ds._skip("shard-7.tar", "OSError: truncated")
        ds._skip("shard-7.tar", "OSError: truncated")
        ds._skip("shard-8.tar", "OSError: truncated")
    assert len(rec) == 2 and ds.skipped == [("shard-7.tar", "OSError: truncated"), ("shard-8.tar", "OSError: truncated")]


def test_max_substitutes_counts_the_item_itself():
    """With max_substitutes = 5, four bad items in a row are passed over, five are a DataError."""
    ds = _Items(9, bad={1, 2, 3, 4})
    ds.max_substitutes = 5
    with pytest.warns(RuntimeWarning):
        assert ds[1] == 5
    ds = _Items(9, bad={1, 2, 3, 4, 5})
    ds.max_substitutes = 5
    with pytest.warns(RuntimeWarning), pytest.raises(base_mod.DataError, match="5 consecutive unreadable"):
        ds[1]


def test_list_files_sorted_any_case_hidden_only_below_the_root(tmp_path):
    """Files whose names end in the extensions, any letter case, sorted; hidden files and folders below the
    root are left out, but a root inside a hidden folder (like ~/.cache) still lists; a single file is
    listed only if it matches."""
    root = tmp_path / ".cache" / "imgs"
    for rel in ("z.png", "sub/y.PNG", "a.Png", "b.txt", ".hidden.png", ".dot/c.png", "sub/.d/e.png", "m.jpeg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    got = base_mod.list_files(root, (".png", ".jpeg"))
    assert got == [str(root / r) for r in ("a.Png", "m.jpeg", "sub/y.PNG", "z.png")]
    assert base_mod.list_files(root / "b.txt", (".png",)) == []
    assert base_mod.list_files(root / "a.Png", (".png",)) == [str(root / "a.Png")]


def test_a_dataset_without_transform_draws_from_torch_only():
    """No transform (or one of mae_fast's transforms): only torch's generator needs seeding per item; a
    foreign transform may draw from numpy or Python too."""
    from mae_fast.data.transforms import Normalize

    ds = _Items(3)
    assert ds.draws_only_torch_rng
    ds.transform = Normalize()
    assert ds.draws_only_torch_rng
    ds.transform = lambda x: x
    assert not ds.draws_only_torch_rng


# ============================================================================================ demo.py

def test_value_noise_is_smoothstep_interpolation_between_cell_values_at_pixel_centres():
    """value_noise(size, cells): pixel i samples at (i + 0.5) * cells / size - 0.5 cell units, between the
    cell values around it (wrapping), with smoothstep weights on both axes."""
    size, cells = 14, 4
    got = demo_mod.value_noise(np.random.default_rng(7), size, cells)
    grid = np.random.default_rng(7).random((cells, cells), dtype=np.float32).astype(np.float64)

    def weights(i):
        c = (i + 0.5) * cells / size - 0.5
        i0 = math.floor(c)
        f = c - i0
        return i0 % cells, (i0 + 1) % cells, f * f * (3 - 2 * f)

    want = np.empty((size, size))
    for r in range(size):
        r0, r1, fr = weights(r)
        for c in range(size):
            c0, c1, fc = weights(c)
            top = grid[r0, c0] * (1 - fc) + grid[r0, c1] * fc
            bottom = grid[r1, c0] * (1 - fc) + grid[r1, c1] * fc
            want[r, c] = top * (1 - fr) + bottom * fr
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def _bilinear_by_hand(raster, u, v, wrap):
    """Bilinear at continuous coordinates whose pixel centres are at k + 0.5; wrap or clamp at the edges."""
    h, w, _ = raster.shape
    out = []
    for uu, vv in zip(u, v):
        x, y = uu - 0.5, vv - 0.5
        x0, y0 = math.floor(x), math.floor(y)
        fx, fy = x - x0, y - y0

        def px(r, c):
            if wrap:
                return raster[r % h, c % w]
            return raster[min(max(r, 0), h - 1), min(max(c, 0), w - 1)]

        top = px(y0, x0) * (1 - fx) + px(y0, x0 + 1) * fx
        bottom = px(y0 + 1, x0) * (1 - fx) + px(y0 + 1, x0 + 1) * fx
        out.append(top * (1 - fy) + bottom * fy)
    return np.array(out)


@pytest.mark.parametrize("wrap", [True, False])
def test_bilinear_lookup_by_hand_on_a_non_square_raster(wrap):
    """Pixel centres return the pixel; points between them mix the four neighbours; past an edge the lookup
    wraps round (ground) or clamps (object patches), on a 5 x 7 raster, at points on and near every edge."""
    rng = np.random.default_rng(3)
    raster = rng.random((5, 7, 3)).astype(np.float32)
    u = np.array([0.5, 6.5, 3.2, 6.9, 7.0, 0.1, 0.0, 4.75, 6.99, 2.5])
    v = np.array([0.5, 4.5, 2.7, 4.9, 5.0, 0.2, 2.2, 0.01, 3.3, 4.99])
    got = demo_mod._bilinear(raster.reshape(-1, 3), 5, 7, u, v, wrap)
    np.testing.assert_allclose(got, _bilinear_by_hand(raster.astype(np.float64), u, v, wrap), rtol=0, atol=1e-5)


def test_bt601_conversion_by_hand():
    """Limited-range BT.601 of known colours (white 235/128/128, black 16/128/128, red 81/90/240, blue
    41/240/110), chroma as the mean of each 2 x 2 block, planes Y, Cb, Cr in that order."""
    red, blue, white, black = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
    frame = np.zeros((2, 6, 3), np.uint8)
    frame[:, 0:2] = white
    frame[:, 2:4] = red
    frame[:, 4] = red  # a block half red, half blue: chroma of the mean
    frame[:, 5] = blue
    frame[1, 0] = black  # luma per pixel, chroma of the block mean
    out = demo_mod.rgb_to_yuv420p(frame)
    assert out.shape == (3, 6) and out.dtype == np.uint8
    assert out[:2].tolist() == [[235, 235, 81, 81, 81, 41], [16, 235, 81, 81, 81, 41]]
    cb_white_black = 128  # both neutral
    cr_mixed = round(128 + (112.0 * 255 / 2 - 18.214 * 255 / 2) / 255)
    cb_mixed = round(128 + (-37.797 * 255 / 2 + 112.0 * 255 / 2) / 255)
    assert out[2, :3].tolist() == [cb_white_black, 90, cb_mixed]  # Cb plane: 3 values
    assert out[2, 3:].tolist() == [128, 240, cr_mixed]             # Cr plane: 3 values


def test_video_frames_need_even_sides():
    with pytest.raises(ValueError, match="even sides"):
        demo_mod.encode_mp4([np.zeros((4, 5, 3), np.uint8)], "unused.mp4", 8, "mpeg4")
    with pytest.raises(ValueError, match="even sides"):
        demo_mod.encode_mp4([np.zeros((5, 4, 3), np.uint8)], "unused.mp4", 8, "mpeg4")


def test_to_uint8_rounds_to_nearest_and_clips():
    got = demo_mod.to_uint8(np.array([-0.2, 0.0, 0.3 / 255, 0.6 / 255, 127.5 / 255, 0.999, 1.0, 1.7]))
    assert got.tolist() == [0, 0, 0, 1, 128, 255, 255, 255]
    assert demo_mod.to_uint8(np.array([0.49, 0.5, 254.6]), 1.0).tolist() == [0, 1, 255]


def test_mip_levels_are_two_by_two_means():
    """Level k + 1 is the mean of each 2 x 2 block of level k (stored rounded to uint8)."""
    raster = np.random.default_rng(5).random((12, 20, 3)).astype(np.float32)
    pyr = demo_mod.mip_pyramid(raster, 3)
    means = raster.reshape(6, 2, 10, 2, 3).mean(axis=(1, 3))
    flat, h, w = pyr.levels[1]
    assert (h, w) == (6, 10)
    np.testing.assert_array_equal(flat, np.clip(np.floor(means * 255 + 0.5), 0, 255).astype(np.uint8).reshape(-1, 3))
    flat2, h2, w2 = pyr.levels[2]
    means2 = means.reshape(3, 2, 5, 2, 3).mean(axis=(1, 3))
    assert (h2, w2) == (3, 5)
    assert np.abs(flat2.astype(int) - np.floor(means2 * 255 + 0.5).reshape(-1, 3)).max() <= 1


def test_painting_near_the_edge_without_wrap_stays_inside_and_with_wrap_comes_round():
    """An object at a corner of a non-square canvas: without wrap it is clipped at the edges (nothing
    drawn on the far side); with wrap its parts past the edges appear on the far sides."""
    canvas = np.full((20, 30, 3), 0.5, np.float32)
    obj = demo_mod.random_instance(np.random.default_rng(1), 2, 28.6, 1.3, 5.0)
    flat = canvas.copy()
    demo_mod.paint(flat, obj, wrap=False)
    assert not np.array_equal(flat[:8, 22:], canvas[:8, 22:])
    assert np.array_equal(flat[:, :15], canvas[:, :15]) and np.array_equal(flat[12:], canvas[12:])
    wrapped = canvas.copy()
    demo_mod.paint(wrapped, obj, wrap=True)
    assert not np.array_equal(wrapped[:8, :4], canvas[:8, :4]) and not np.array_equal(wrapped[16:], canvas[16:])
    np.testing.assert_array_equal(wrapped[:8, 22:], flat[:8, 22:])  # same pixels where both draw


def test_camera_walks_along_its_heading_for_the_whole_duration():
    """seconds x fps frames (rounded, not truncated: 0.29 s at 100 fps is 29); each step moves along the
    heading the renderer looks at (yaw 0 looks along +y; +x is to the left of it at yaw pi/2)."""
    x, y, yaw, bob = demo_mod.camera_path(np.random.default_rng(4), 0.29, 100, 512)
    assert len(x) == len(y) == len(yaw) == len(bob) == 29
    x, y, yaw, _ = demo_mod.camera_path(np.random.default_rng(4), 30, 8, 512)
    dx, dy = np.diff(x), np.diff(y)
    step = np.hypot(dx, dy)
    moving = step > 1e-9
    assert moving.sum() > 100
    head_x, head_y = -np.sin(yaw[1:]), np.cos(yaw[1:])
    np.testing.assert_allclose((dx * head_x + dy * head_y)[moving], step[moving], rtol=1e-9)


def _fake_generate(calls):
    """Writes a minimal complete demo set (one 7-byte video, train and val folders) instead of rendering."""

    def fake(out_dir, seed=0, **overrides):
        calls.append((seed, overrides))
        (out_dir / "videos").mkdir(parents=True)
        (out_dir / "videos" / "walk_000.mp4").write_bytes(b"1234567")
        for split in ("train", "val"):
            (out_dir / "labelled" / split).mkdir(parents=True)
        manifest = dict(version=demo_mod.DEMO_VERSION, seed=seed, config=dict(demo_mod.DEFAULTS, **overrides),
                        videos=[dict(file="walk_000.mp4", bytes=7)], labelled=dict(classes=[]),
                        generation_s=0.0, n=len(calls))
        (out_dir / "manifest.json").write_text(json.dumps(manifest))
        return manifest

    return fake


def test_demo_cache_folder_is_per_seed_and_settings(tmp_path, monkeypatch):
    """Each seed and each setting value has its own cached set; asking again reuses it."""
    calls = []
    monkeypatch.setattr(demo_mod, "generate", _fake_generate(calls))
    kw = dict(verbose=False)
    a = demo_mod.ensure_demo_data(tmp_path, seed=1, **kw)
    b = demo_mod.ensure_demo_data(tmp_path, seed=2, **kw)
    c = demo_mod.ensure_demo_data(tmp_path, seed=1, n_videos=2, **kw)
    d = demo_mod.ensure_demo_data(tmp_path, seed=1, n_videos=3, **kw)
    assert len({a.root, b.root, c.root, d.root}) == 4 and len(calls) == 4
    assert (a.manifest["seed"], b.manifest["seed"]) == (1, 2)
    assert demo_mod.ensure_demo_data(tmp_path, seed=2, **kw).root == b.root and len(calls) == 4


@pytest.mark.parametrize("damage", ["old_version", "short_video", "no_val", "force"])
def test_an_unusable_or_forced_cache_is_generated_again(tmp_path, monkeypatch, damage):
    """A cached set of another version, with a video of the wrong size or without a val folder is made
    again, as is any set when forced."""
    calls = []
    monkeypatch.setattr(demo_mod, "generate", _fake_generate(calls))
    first = demo_mod.ensure_demo_data(tmp_path, seed=5, verbose=False)
    force = False
    if damage == "old_version":
        m = json.loads((first.root / "manifest.json").read_text())
        m["version"] = demo_mod.DEMO_VERSION - 1
        (first.root / "manifest.json").write_text(json.dumps(m))
    elif damage == "short_video":
        (first.videos / "walk_000.mp4").write_bytes(b"123")
    elif damage == "no_val":
        (first.labelled / "val").rmdir()
    else:
        force = True
    again = demo_mod.ensure_demo_data(tmp_path, seed=5, verbose=False, force=force)
    assert len(calls) == 2 and again.root == first.root and again.manifest["n"] == 2
    assert (again.labelled / "val").is_dir() and (again.videos / "walk_000.mp4").stat().st_size == 7


def test_unknown_demo_setting_is_refused_before_any_work(tmp_path, monkeypatch):
    def no_work():
        raise AssertionError("started generating")

    monkeypatch.setattr(demo_mod, "pick_codec", no_work)
    with pytest.raises(TypeError, match="unknown demo settings: \\['n_vidoes'\\]"):
        demo_mod.generate(tmp_path / "out", n_vidoes=2)


