"""The built-in demo data (mae_fast/data/demo.py): deterministic generation, the cache (per seed and settings,
redone when damaged, interrupted or forced), and the renderer's parts against hand computations: value noise,
bilinear lookup, BT.601 conversion, mip levels, painting at the edges and the camera walk."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mae_fast.data import demo as demo_mod
from mae_fast.data import ensure_demo_data


# a small set: two 3-second videos at 8 fps, 48 x 48, and 2 + 1 labelled images per class
SMALL = dict(n_videos=2, seconds=3, video_fps=8, video_size=48, n_train=2, n_val=1, image_size=32,
             world_size=512, n_objects=80)


def png_pixels(folder: Path) -> dict:
    from PIL import Image

    return {str(p.relative_to(folder)): np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.rglob("*.png"))}


def test_demo_generation_is_deterministic(all_frames, tmp_path):
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
    assert len(pa) == 8 * (2 + 1) and pa.keys() == pb.keys()
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)


def test_demo_default_layout_and_cache(demo, frames_by_video):
    assert demo.root.name.startswith(f"v{demo_mod.DEMO_VERSION}-seed0")
    assert len(frames_by_video) == 6
    for frames in frames_by_video.values():
        assert frames.shape == (480, 96, 96, 3)  # 60 s at 8 fps, 96 x 96
    for video in demo.manifest["videos"]:  # about half of each minute spent looking at objects, several of them
        assert 0.35 < video["look_frames"] / video["frames"] < 0.65 and video["looks"] >= 8
    for split, n in (("train", 40), ("val", 40)):
        classes = sorted(p.name for p in (demo.labelled / split).iterdir())
        assert classes == sorted(demo_mod.CLASSES)
        assert all(len(list((demo.labelled / split / c).glob("*.png"))) == n for c in classes)
    again = ensure_demo_data(demo.root.parent, verbose=False)  # cached: no regeneration
    assert again.root == demo.root and again.manifest == demo.manifest


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


def test_interrupted_generation_is_redone(tmp_path, monkeypatch):
    """A set without its manifest (killed before the end), beside a temporary folder a killed run left, is made
    again; once complete it is reused. MAE_FAST_DATA names the default cache."""
    calls = []
    monkeypatch.setattr(demo_mod, "generate", _fake_generate(calls))
    root = tmp_path / "cache"
    first = ensure_demo_data(root, verbose=False, **SMALL)
    (root / ".tmp-leftover-of-a-killed-run").mkdir()
    (first.root / "manifest.json").unlink()  # as if killed before the end
    second = ensure_demo_data(root, verbose=False, **SMALL)
    assert len(calls) == 2 and second.root == first.root and (second.root / "manifest.json").is_file()
    assert sorted(p.name for p in second.videos.glob("*.mp4")) == ["walk_000.mp4"]
    ensure_demo_data(root, verbose=False, **SMALL)
    assert len(calls) == 2  # complete now: reused
    monkeypatch.setenv("MAE_FAST_DATA", str(root))
    assert demo_mod.default_cache_dir() == root


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


def test_looks_alternate_with_walks_in_the_share_asked_and_last_one_and_a_half_to_three_seconds():
    fps = 8
    for share in (0.25, 0.5, 0.75):
        schedule = demo_mod.look_schedule(np.random.default_rng(1), 20000, fps, share)
        assert abs((schedule >= 0).mean() - share) < 0.05
        looks = schedule[schedule >= 0]
        assert np.array_equal(np.unique(looks), np.arange(looks.max() + 1))  # numbered in order
        lengths = np.bincount(looks)[:-1]  # the last look may be cut by the end of the video
        assert lengths.min() >= int(1.5 * fps) and lengths.max() <= 3 * fps
        assert np.all(np.diff(looks) >= 0)
    assert (demo_mod.look_schedule(np.random.default_rng(1), 2000, fps, 0.0) == -1).all()


def test_nearest_object_counts_distances_round_the_wrapping_world():
    rng = np.random.default_rng(0)
    size = 512
    objects = [dict(x=float(x), y=float(y)) for x, y in rng.uniform(0, size, (200, 2))]
    for px, py in rng.uniform(0, size, (50, 2)):
        def wrapped(o):
            dx, dy = abs(o["x"] - px), abs(o["y"] - py)
            return min(dx, size - dx) ** 2 + min(dy, size - dy) ** 2
        assert demo_mod.nearest_object(objects, px, py, size) is min(objects, key=wrapped)
    edge = [dict(x=5.0, y=5.0), dict(x=300.0, y=300.0)]
    assert demo_mod.nearest_object(edge, 507.0, 508.0, size) is edge[0]  # 7 px away across the corner


@pytest.mark.parametrize("pitch_deg", [62, 80])
def test_a_look_puts_the_object_in_the_middle_of_the_frame(pitch_deg):
    """One bright spot on a black world: seen by the look camera from ``look_position``, it is mid-frame for
    any heading."""
    world = np.zeros((256, 256, 3), np.float32)
    world[118:138, 58:78] = 255.0  # centre (x, y) = (68, 128): column 68, row 128
    pyramid = demo_mod.mip_pyramid(world)
    pitch, height = math.radians(pitch_deg), 55.0
    camera = demo_mod.GroundCamera((48, 48), pitch, height, hfov=math.radians(60), fog=1e4)
    for yaw in (0.0, 1.0, 2.5, -2.0):
        x, y = demo_mod.look_position(dict(x=68.0, y=128.0), yaw, height / math.tan(pitch))
        frame = camera.render(pyramid, x, y, yaw, wrap=False).mean(-1)
        rows, cols = np.nonzero(frame > 128)
        assert rows.size > 20
        assert abs(rows.mean() - 23.5) < 2.5 and abs(cols.mean() - 23.5) < 2.5
