"""Video sources (mae_fast/data/video.py and the video pretraining dataset): the frame played at each sampled time
against PyAV's sequential decode, in memory and decoded lazily, downscaled at decode, across containers and codecs;
the torchcodec backend (real where usable, a stand-in otherwise) against PyAV."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from mae_fast.data import build_pretrain_dataset  # noqa: E402
from mae_fast.data.video import RandomAccessReader, probe_video, read_frames_at  # noqa: E402


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


def test_list_of_video_files_source(demo):
    files = sorted(demo.videos.glob("*.mp4"))[:2]
    ds = build_pretrain_dataset([str(f) for f in files], img_size=32, hours=0.02, subset="uniform", seed=0)
    assert len(ds) == 72 and {Path(e["file"]).name for e in ds.record["files"]} <= {f.name for f in files}


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
def test_containers_durations_and_frames(all_frames, tmp_path, ext, codec, first_pts):
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
def test_real_torchcodec_reads_the_frames_pyav_reads(all_frames, tmp_path, ext, codec, first_pts):
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


def test_torchcodec_adapter_with_a_stand_in(all_frames, demo, monkeypatch):
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
