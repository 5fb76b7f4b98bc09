"""How fast one process reads pretraining frames, for each way mae_fast can read them.

    python bench/bench_data.py                         # 480p H.264, 120 s at 30 fps, keyframe every 2 s
    python bench/bench_data.py --width 1280 --height 720 --out bench/results/data-<machine>-<date>.json
    python bench/bench_data.py --smoke                 # tiny video, seconds (what the test runs)

Long-video pretraining samples frames at ``fps`` (1 by default) from hours of footage. A GPU step of ViT-H/14 at
476 px takes about 24 frames per 0.1 s, so each GPU needs a few hundred frames a second; this measures what one
data-loader process delivers, to size ``num_workers`` or to decide to write shards first
(``python -m mae_fast.data.shards``). Rows, each in frames per second of one process:

- ``sampled``: every frame at 1 fps of the video, decoded in one forward pass (``iter_frames_at``; how a dataset
  that fits the RAM limit is loaded), per backend (PyAV, and torchcodec where it can decode);
- ``random``: single frames at random times (``RandomAccessReader``; how frames are read when they do not fit
  in RAM): one seek and a decode from the previous keyframe each;
- ``shards``: the same 1-fps frames written as JPEG tar shards, streamed back (``ShardDataset``);
- ``transform``: the MAE train augmentation (RandomResizedCrop, flip, normalise) to ``--img-size``, on decoded frames.

Correctness first: torchcodec must return PyAV's frames, random access the sequential pass's frames, and the
shards within JPEG error of them, before anything is timed. Each rate is the median of ``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from mae_fast.data.shards import ShardDataset, write_shards
from mae_fast.data.transforms import TrainTransform
from mae_fast.data.video import RandomAccessReader, iter_frames_at, probe_video, torchcodec_unusable_reason


def make_video(path: Path, width: int, height: int, seconds: float, rate: int, gop: int) -> Path:
    """A synthetic clip that does not compress to nothing: drifting colour bands plus per-frame noise."""
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, rate)
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": "23"}
        for i in range(int(seconds * rate)):
            base = np.stack([np.sin((xx + 3 * i) / 40), np.cos((yy - 2 * i) / 30), np.sin((xx + yy + i) / 50)], -1)
            img = (127 + 100 * base + rng.normal(0, 12, (height, width, 3))).clip(0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _frames_by_index(path, indices) -> dict:
    """Frames at these positions of a plain sequential decode (kept alone: the whole clip would not fit in RAM)."""
    import av

    wanted, out = set(indices), {}
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")
            if len(out) == len(wanted):
                break
    return out


def _rate(fn, n_frames: int, repeats: int) -> dict:
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t)
    med = statistics.median(seconds)
    return dict(frames=n_frames, seconds_median=med, seconds_all=seconds, frames_per_s=n_frames / med)


def run(width=854, height=480, seconds=120.0, rate=30, gop=60, sample_fps=1.0, n_random=40, img_size=224,
        repeats=3, workdir=None) -> dict:
    work = Path(workdir or tempfile.mkdtemp(prefix="mae_fast_bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    video = make_video(work / f"clip_{width}x{height}.mp4", width, height, seconds, rate, gop)
    info = probe_video(video, "pyav")
    times = [k / sample_fps for k in range(int(info.duration_s * sample_fps))]
    rng = np.random.default_rng(1)
    random_times = sorted(rng.uniform(0, info.duration_s - 1.0 / rate, n_random).tolist())
    rng.shuffle(random_times)

    torchcodec_why_not = torchcodec_unusable_reason()  # loads FFmpeg's libraries: once
    backends = ["pyav"] + (["torchcodec"] if torchcodec_why_not is None else [])
    # ---- correctness before timing
    sampled = {b: np.stack([f for _, f in iter_frames_at(video, times, b)]) for b in backends}
    assert sampled["pyav"].shape == (len(times), height, width, 3)
    for b in backends[1:]:
        assert np.array_equal(sampled[b], sampled["pyav"]), f"{b} frames differ from PyAV's"
    checked = random_times[:8]
    by_index = _frames_by_index(video, {int(np.floor(t * rate + 1e-6)) for t in checked})
    for b in backends:
        reader = RandomAccessReader(backend=b)
        for t in checked:
            assert np.array_equal(reader.read(str(video), t), by_index[int(np.floor(t * rate + 1e-6))]), (b, t)
    shard_dir = work / "shards"
    write_shards(str(video), shard_dir, fps=sample_fps, maxcount=200, quality=90, video_backend="pyav",
                 overwrite=True)
    def read_shards():  # in order, untransformed
        return list(ShardDataset(str(shard_dir), transform=None, shuffle_buffer=0, shardshuffle=False))

    shard_frames = [np.asarray(x) for x in read_shards()]
    assert len(shard_frames) == len(times)
    jpeg_err = max(float(np.abs(a.astype(np.float32) - b).mean()) for a, b in zip(shard_frames, sampled["pyav"]))
    assert jpeg_err < 8.0, f"shard frames differ from the video's by {jpeg_err:.1f} grey levels on average"

    # ---- timing
    rows = []
    for b in backends:
        rows.append(dict(mode="sampled", backend=b, **_rate(
            lambda b=b: [f for _, f in iter_frames_at(video, times, b)], len(times), repeats)))

        def random_reads(b=b):
            reader = RandomAccessReader(backend=b)  # a fresh reader: every read seeks, as in a shuffled epoch
            for t in random_times:
                reader.read(str(video), t)
        rows.append(dict(mode="random", backend=b, **_rate(random_reads, len(random_times), repeats)))
    rows.append(dict(mode="shards", backend="jpeg", **_rate(read_shards, len(times), repeats)))
    transform = TrainTransform(img_size)
    frames = sampled["pyav"][: min(len(times), 60)]
    rows.append(dict(mode="transform", backend=f"train {img_size}px", **_rate(
        lambda: [transform(f) for f in frames], len(frames), repeats)))
    return dict(date=time.strftime("%Y-%m-%d"), machine=platform.processor() or platform.machine(),
                torch_threads=torch.get_num_threads(),
                video=dict(width=width, height=height, seconds=seconds, rate=rate, gop=gop,
                           codec=_codec(video), bytes=video.stat().st_size),
                sample_fps=sample_fps, n_random=n_random, repeats=repeats, jpeg_mean_abs_err=jpeg_err,
                torchcodec=torchcodec_why_not or "usable", rows=rows)


def _codec(path) -> str:
    import av

    with av.open(str(path)) as c:
        return c.streams.video[0].codec_context.name


def table(result) -> str:
    v = result["video"]
    lines = [f"{v['width']}x{v['height']} {v['codec']}, {v['seconds']:g} s at {v['rate']} fps, keyframe every "
             f"{v['gop']} frames; frames sampled at {result['sample_fps']:g} fps; one process",
             "", "| mode | backend | frames | frames/s (median) |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['backend']} | {r['frames']} | {r['frames_per_s']:.1f} |")
    if result["torchcodec"] != "usable":
        lines.append(f"\ntorchcodec not timed: {result['torchcodec']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a 64x48, 6 s video (seconds to run)")
    ap.add_argument("--width", type=int, default=854)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--rate", type=int, default=30, help="the video's frame rate")
    ap.add_argument("--gop", type=int, default=60, help="frames between keyframes")
    ap.add_argument("--sample-fps", type=float, default=1.0)
    ap.add_argument("--random", type=int, default=40, help="random-access reads per repeat")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", help="keep the video and shards here (default: a temporary folder)")
    ap.add_argument("--out", help="write JSON here (and the table next to it as .md)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.width, args.height, args.seconds, args.rate, args.gop, args.random, args.img_size, args.repeats = (
            64, 48, 6.0, 10, 10, 6, 32, 1)
    if min(args.width, args.height) < 16 or args.width % 2 or args.height % 2:
        ap.error("width and height must be even and at least 16 (yuv420p)")
    if args.seconds * args.sample_fps < 2:
        ap.error("the video must hold at least two sampled frames")
    result = run(args.width, args.height, args.seconds, args.rate, args.gop, args.sample_fps, args.random,
                 args.img_size, args.repeats, args.workdir)
    text = table(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(f"# Data loading, {result['date']}\n\n`python bench/bench_data.py "
                                          f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
