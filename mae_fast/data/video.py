"""Reading frames of long video files at chosen times, with PyAV (or torchcodec when installed).

Times are seconds from the start of the video stream. A request for time ``t`` returns the frame
*played at* ``t``: the last frame whose presentation time is <= t (the same rule as torchcodec's
``get_frames_played_at``), so both backends agree.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mae_fast.extras import require

from .base import SkippingDataset, list_files

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")

# Past this gap between wanted times a seek beats decoding straight through.
SEEK_GAP_S = 4.0
_EPS = 1e-6


@dataclass(frozen=True)
class VideoInfo:
    path: str
    duration_s: float
    avg_fps: float
    width: int
    height: int


def list_videos(root) -> list[str]:
    """Video files under ``root`` (recursive, sorted); a single video file is a list of one."""
    return list_files(root, VIDEO_EXTENSIONS)


def torchcodec_unusable_reason() -> str | None:
    """Why torchcodec cannot decode video here, or None when it can.

    Importing torchcodec succeeds without FFmpeg (it does not bundle it): the FFmpeg-linked core loads at the
    first decode. So load it now, where this torchcodec exposes its loader, and let ``auto`` fall back to PyAV
    rather than fail on every file."""
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception as e:
        return f"torchcodec is not installed ({type(e).__name__}: {e})"
    try:
        from torchcodec._internally_replaced_utils import load_core_libraries
    except ImportError:  # a torchcodec without this loader: a decode error will say what is missing
        return None
    try:
        load_core_libraries()
    except Exception as e:
        return (f"torchcodec is installed but cannot load FFmpeg's libraries (install FFmpeg's shared libraries, "
                f"or use video_backend=pyav): {str(e).splitlines()[0][:200]}")
    return None


def torchcodec_available() -> bool:
    return torchcodec_unusable_reason() is None


def resolve_backend(backend: str = "auto") -> str:
    if backend not in ("auto", "pyav", "torchcodec"):
        raise ValueError(f"video backend must be 'auto', 'pyav' or 'torchcodec', got {backend!r}")
    if backend == "pyav":
        return backend
    why_not = torchcodec_unusable_reason()
    if backend == "auto":
        return "pyav" if why_not else "torchcodec"
    if why_not:
        raise ImportError(f"video backend 'torchcodec' requested, but {why_not}")
    return backend


# ---------------------------------------------------------------------------------------------- PyAV

def _open_pyav(path):
    av = require("av", "reading video")

    container = av.open(str(path))
    if not container.streams.video:
        container.close()
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _stream_start(stream) -> float:
    if stream.start_time is not None and stream.time_base is not None:
        return float(stream.start_time * stream.time_base)
    return 0.0


def _measured_end(container, stream, guess_s: float, rate: float):
    """End of the stream's last frame in seconds from its start, read from the packets after a seek
    to the last keyframe (headers disagree: mkv counts from 0, mp4 from the first frame; truncated
    files claim their full length)."""
    start = _stream_start(stream)
    tb = stream.time_base
    frame_len = int(round(1 / (rate * tb))) if rate else 0
    container.seek(max(0, int((start + guess_s) / tb)) + 1, stream=stream, backward=True)
    end = None
    for packet in container.demux(stream):
        if packet.pts is None:
            continue
        e = packet.pts + (packet.duration or frame_len)
        end = e if end is None else max(end, e)
    return None if end is None else float(end * tb) - start


def probe_pyav(path) -> VideoInfo:
    container, stream = _open_pyav(path)
    try:
        guess = None
        if stream.duration is not None and stream.time_base is not None:
            guess = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            guess = container.duration / 1e6
        rate = float(stream.average_rate) if stream.average_rate else 0.0
        duration = None
        if guess is not None and stream.time_base is not None:
            try:
                duration = _measured_end(container, stream, guess, rate)
            except Exception:  # noqa: BLE001 (unseekable: trust the header)
                duration = guess
        if duration is None or duration <= 0:  # no usable header or packets: decode and count (rare)
            container.seek(0)
            last = None
            for frame in container.decode(stream):
                last = frame.time
            if last is None:
                raise ValueError("no decodable frames")
            duration = last - _stream_start(stream) + (1.0 / rate if rate else 0.0)
        return VideoInfo(str(path), duration, rate, stream.codec_context.width, stream.codec_context.height)
    finally:
        container.close()


class _Rgb:
    """A decoded frame whose rgb conversion happens once, only when some wanted time uses it."""

    __slots__ = ("frame", "array")

    def __init__(self, frame):
        self.frame, self.array = frame, None

    def rgb(self) -> np.ndarray:
        if self.array is None:
            self.array = self.frame.to_ndarray(format="rgb24")
        return self.array


def _played_at_pyav(container, stream, times: Sequence[float], seek_first: bool):
    """Yield (t, HWC uint8) for ascending ``times``: decode forward, seek across gaps > SEEK_GAP_S.

    After a seek, frames before the first keyframe are dropped (some containers, e.g. MPEG-TS, land
    mid-GOP, where they decode to garbage); a keyframe past the wanted time means seeking further back.
    """
    start = _stream_start(stream)
    rate = float(stream.average_rate) if stream.average_rate else 1.0
    hold_s = max(2.0 / rate, 1.0)  # how long past the last frame a time still counts as 'played'
    i, n, need_seek, back = 0, len(times), seek_first, 0.0
    while i < n:
        synced = not need_seek
        if need_seek:
            target = times[i] + start - back
            container.seek(max(0, int(target / stream.time_base)), stream=stream, backward=True)
        need_seek = False
        prev = None
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            ft = frame.time - start
            if not synced:
                if not frame.key_frame:
                    continue
                if ft > times[i] + _EPS and times[i] - back > 0:
                    back = max(2 * back, 1.0)
                    need_seek = True
                    break
                synced = True
            current = _Rgb(frame)
            while i < n and times[i] < ft - _EPS:
                # prev is None only when even the start of the file is after the target: take this frame
                yield times[i], (prev or current).rgb()
                i += 1
            if i >= n:
                return
            prev = current
            if times[i] - ft > SEEK_GAP_S:
                need_seek, back = True, 0.0
                break
        else:  # end of stream: the last frame stays on screen for a little while
            if prev is None:
                raise EOFError(f"no frame decodable at or after t={times[i]:.3f}s")
            last = prev.frame.time - start
            while i < n:
                if times[i] > last + hold_s:
                    raise EOFError(f"stream ends at {last:.3f}s, before t={times[i]:.3f}s")
                yield times[i], prev.rgb()
                i += 1


# ---------------------------------------------------------------------------------------------- torchcodec

def _torchcodec_decoder(path):
    from torchcodec.decoders import VideoDecoder

    return VideoDecoder(str(path), dimension_order="NHWC", seek_mode="exact")


def probe_torchcodec(path) -> VideoInfo:
    md = _torchcodec_decoder(path).metadata
    return VideoInfo(str(path), float(md.duration_seconds), float(md.average_fps or 0.0), int(md.width),
                     int(md.height))


def _played_at_torchcodec(decoder, times: Sequence[float], batch: int = 64):
    begin = float(getattr(decoder.metadata, "begin_stream_seconds", 0.0) or 0.0)
    for lo in range(0, len(times), batch):
        chunk = [float(t) + begin for t in times[lo:lo + batch]]
        data = decoder.get_frames_played_at(seconds=chunk).data.numpy()
        for t, frame in zip(times[lo:lo + batch], data):
            yield t, np.ascontiguousarray(frame)


# ---------------------------------------------------------------------------------------------- public

def probe_video(path, backend: str = "auto") -> VideoInfo:
    """Duration, average frame rate and size; raises on files that cannot be opened."""
    if resolve_backend(backend) == "torchcodec":
        return probe_torchcodec(path)
    return probe_pyav(path)


def iter_frames_at(path, times: Iterable[float], backend: str = "auto"):
    """Yield ``(t, frame)`` (HWC uint8 RGB) for each time in ``times`` (seconds), in ascending order.

    Each file is opened once and decoded forward, so asking for many times of one video costs about
    one pass over the stretches that hold them. Raises (after yielding what it could) on corrupt data.
    """
    times = sorted(float(t) for t in times)
    if not times:
        return
    if resolve_backend(backend) == "torchcodec":
        yield from _played_at_torchcodec(_torchcodec_decoder(path), times)
        return
    container, stream = _open_pyav(path)
    try:
        yield from _played_at_pyav(container, stream, times, seek_first=times[0] > SEEK_GAP_S)
    finally:
        container.close()


def read_frames_at(path, times: Sequence[float], backend: str = "auto") -> np.ndarray:
    """All frames at ``times`` (any order) as an (N, H, W, 3) uint8 array in the order given."""
    order = np.argsort(np.asarray(times, dtype=np.float64), kind="stable")
    got = [frame for _, frame in iter_frames_at(path, [times[k] for k in order], backend)]
    if len(got) != len(times):
        raise EOFError(f"{path}: decoded {len(got)} of {len(times)} frames")
    out = np.empty((len(times),) + got[0].shape, dtype=np.uint8)
    for dst, frame in zip(order, got):
        out[dst] = frame
    return out


class RandomAccessReader:
    """Reads single frames at arbitrary times, keeping a few containers open (one cache per process).

    Pickles without its open files, so each DataLoader worker opens its own.
    """

    def __init__(self, backend: str = "auto", max_open: int = 4):
        self.backend = resolve_backend(backend)
        self.max_open = max_open
        self._open: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state

    def _handle(self, path):
        if self._pid != os.getpid():  # forked: handles belong to the parent
            self._open, self._pid = OrderedDict(), os.getpid()
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        handle = _torchcodec_decoder(path) if self.backend == "torchcodec" else _open_pyav(path)
        self._open[path] = handle
        while len(self._open) > self.max_open:
            self._close(self._open.popitem(last=False)[1])
        return handle

    def _close(self, handle):
        if isinstance(handle, tuple):
            handle[0].close()

    def drop(self, path):
        handle = self._open.pop(path, None)
        if handle is not None:
            self._close(handle)

    def read(self, path, t: float) -> np.ndarray:
        handle = self._handle(path)
        try:
            if self.backend == "torchcodec":
                return next(_played_at_torchcodec(handle, [t]))[1]
            container, stream = handle
            return next(_played_at_pyav(container, stream, [t], seek_first=True))[1]
        except BaseException:
            self.drop(path)
            raise

    def close(self):
        while self._open:
            self._close(self._open.popitem()[1])


# ---------------------------------------------------------------------------------------------- dataset

class VideoFrameDataset(SkippingDataset):
    """Frames at selected times of video files, indexed up front (map-style).

    When the frames fit in ``ram_limit_bytes`` they are decoded once, in one forward pass per file,
    and kept as uint8 in RAM (shared copy-on-write with forked DataLoader workers); otherwise each
    item seeks and decodes its frame on demand. ``max_side`` downscales frames (longer side, PIL
    bicubic) as they are decoded, so more fit in RAM. Items are ``transform(frame)``.
    """

    def __init__(self, selection, transform=None, record=None, skipped=(), infos=None,
                 ram_limit_bytes: float = 2e9, backend: str = "auto", max_side=None):
        super().__init__()
        self.transform, self.backend = transform, resolve_backend(backend)
        self.max_side = None if max_side is None else int(max_side)
        self.record = dict(record or {})
        for path, reason in skipped:
            self._skip(path, reason)
        self.fps = selection.fps
        nbytes = _frames_nbytes(infos, selection, self.max_side) if infos else None
        self.in_memory = nbytes is not None and nbytes <= ram_limit_bytes
        self.files, file_idx, times, frames, lost = [], [], [], [], 0
        for path, slots in zip(map(str, selection.files), selection.slots):
            t = slots / selection.fps
            if self.in_memory:
                try:
                    block = read_frames_at(path, t.tolist(), self.backend)
                    frames.append(np.stack([shrink(f, self.max_side) for f in block]) if self.max_side else block)
                except Exception as err:  # noqa: BLE001
                    self._skip(path, f"{type(err).__name__}: {err}")
                    lost += len(t)
                    continue
            file_idx.append(np.full(len(t), len(self.files), np.int64))
            self.files.append(path)
            times.append(t)
        self.file_idx = np.concatenate(file_idx) if file_idx else np.zeros(0, np.int64)
        self.times = np.concatenate(times) if times else np.zeros(0, np.float64)
        self.local_idx = np.concatenate([np.arange(len(t)) for t in times]) if times else np.zeros(0, np.int64)
        self.frames = frames
        self.reader = None if self.in_memory else RandomAccessReader(self.backend)
        if lost:
            self.record["frames_lost_to_errors"] = lost
        self.record["skipped"] = [[p, r] for p, r in self.skipped]
        self.record["in_memory"] = self.in_memory
        self.record["max_side"] = self.max_side

    def __len__(self):
        return len(self.times)

    def _path(self, index):
        return self.files[self.file_idx[index]]

    def frame(self, index) -> np.ndarray:
        """The raw HWC uint8 frame of item ``index`` (no transform, no skipping)."""
        if self.in_memory:
            return self.frames[self.file_idx[index]][self.local_idx[index]]
        return shrink(self.reader.read(self._path(index), float(self.times[index])), self.max_side)

    def _load(self, index):
        image = self.frame(index)
        return self.transform(image) if self.transform is not None else image


def _shrunk_size(height: int, width: int, max_side):
    if not max_side or max(height, width) <= max_side:
        return height, width
    s = max_side / max(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def shrink(frame: np.ndarray, max_side) -> np.ndarray:
    """Downscale (PIL bicubic, aspect kept) so the longer side is at most ``max_side``; else as is."""
    h, w = _shrunk_size(frame.shape[0], frame.shape[1], max_side)
    if (h, w) == frame.shape[:2]:
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((w, h), Image.BICUBIC)).copy()


def _frames_nbytes(infos, selection, max_side=None) -> int:
    total = 0
    for f, slots in zip(selection.files, selection.slots):
        h, w = _shrunk_size(infos[f].height, infos[f].width, max_side)
        total += h * w * 3 * len(slots)
    return total
