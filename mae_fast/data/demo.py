"""Built-in demo data: walk-through videos of a procedurally generated world, and labelled object images.

The world is a large wrapping ground texture with flat, textured objects ("decals") of a few classes
(each class a shape family x a texture family, colours random per instance). A camera a little above
the ground walks and turns through it, looking ahead and down at a per-video pitch, and every few seconds
stops to look down at the object nearest its path, as a child looks at things: more hours of video
show more object instances up close, which is what makes pretraining on more video help the labelled
task. Each pixel's ground ray is fixed per camera, so a frame is one rotation + a trilinear (mip-mapped)
lookup: thousands of frames render in seconds. The labelled set shows *new* instances of the same
classes on patches of the same ground, seen from above at a random pitch/yaw/distance: "object images
from the same world".

Everything is drawn from ``numpy.random.default_rng(seed)``; videos are encoded single-threaded with
ffmpeg's mpeg4 encoder (libx264 only if mpeg4 is missing: it is not reproducible), from a numpy
colour conversion, so the decoded frames are identical for a seed.
Generation writes into a temporary folder that is renamed into place when complete.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mae_fast.extras import require

DEMO_VERSION = 4   # the cache folder's version: bumped whenever what is generated changes
RNG_STREAM = 2     # seeds the generator
HORIZON = np.array([0.78, 0.84, 0.88], np.float32)
ZENITH = np.array([0.30, 0.50, 0.85], np.float32)
HILLS = np.array([0.42, 0.50, 0.55], np.float32)
CLASSES = ("disc_spokes", "square_checks", "triangle_stripes", "hexagon_dots",
           "star_rim", "ring_waves", "cross_grid", "ellipse_rings")

DEFAULTS = dict(
    n_videos=6, seconds=60, video_fps=8, video_size=96, look_share=0.5,
    n_train=40, n_val=40, image_size=64,  # 320 val images: one image is 0.31 points of top-1
    world_size=2048, n_objects=1400,
)


@dataclass(frozen=True)
class DemoPaths:
    root: Path        # the versioned folder
    videos: Path      # *.mp4 walk-throughs
    labelled: Path    # train/<class>/*.png, val/<class>/*.png
    manifest: dict

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["labelled"]["classes"])


def default_cache_dir() -> Path:
    env = os.environ.get("MAE_FAST_DATA")
    return Path(env).expanduser() if env else Path("~/.cache/mae_fast/demo").expanduser()


# ---------------------------------------------------------------------------------------------- textures

def value_noise(rng, size: int, cells: int) -> np.ndarray:
    """Smooth tileable noise in [0, 1]: a random ``cells`` x ``cells`` grid, smoothstep-upsampled."""
    grid = rng.random((cells, cells), dtype=np.float32)
    coords = (np.arange(size, dtype=np.float64) + 0.5) * cells / size - 0.5
    i0 = np.floor(coords).astype(np.int64)
    f = (coords - i0).astype(np.float32)
    f = f * f * (3 - 2 * f)  # smoothstep: no visible grid creases
    i0 %= cells
    i1 = (i0 + 1) % cells
    rows = grid[i0] * (1 - f)[:, None] + grid[i1] * f[:, None]
    return np.take(rows, i0, axis=1) * (1 - f)[None, :] + np.take(rows, i1, axis=1) * f[None, :]


def make_ground(rng, size: int) -> np.ndarray:
    """Float32 (size, size, 3) in [0, 1]: grass/earth mottling plus darker trails."""
    n = sum(value_noise(rng, size, c) * w for c, w in ((8, 0.45), (32, 0.3), (128, 0.17), (512, 0.08)))
    grass, earth = np.array([0.28, 0.48, 0.22], np.float32), np.array([0.52, 0.44, 0.30], np.float32)
    t = np.clip((n - 0.35) * 2.2, 0, 1)[..., None]
    ground = grass * (1 - t) + earth * t
    trails = value_noise(rng, size, 16)
    band = np.clip(1 - np.abs(trails - 0.5) * 40, 0, 1)[..., None] * 0.5
    ground = ground * (1 - band) + np.array([0.62, 0.58, 0.50], np.float32) * band
    grain = rng.random((size, size, 1), dtype=np.float32)
    return np.clip(ground * (0.9 + 0.2 * grain), 0, 1)


def _shape_sdf(kind: str, x, y):
    """Approximate signed distance (object radius = 1) of each class's shape."""
    r = np.sqrt(x * x + y * y)
    if kind == "disc":
        return r - 0.95
    if kind == "square":
        return np.maximum(np.abs(x), np.abs(y)) - 0.72
    if kind == "triangle":
        d = None
        for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
            e = x * math.cos(a) + y * math.sin(a)
            d = e if d is None else np.maximum(d, e)
        return d - 0.5
    if kind == "hexagon":
        d = None
        for k in range(6):
            e = x * math.cos(k * math.pi / 3) + y * math.sin(k * math.pi / 3)
            d = e if d is None else np.maximum(d, e)
        return d - 0.82
    if kind == "star":
        theta = np.arctan2(y, x)
        return (r - (0.62 + 0.33 * np.cos(5 * theta))) * 0.7
    if kind == "ring":
        return np.abs(r - 0.68) - 0.27
    if kind == "cross":
        ax, ay = np.abs(x), np.abs(y)
        return np.minimum(np.maximum(ax - 0.3, ay - 0.95), np.maximum(ax - 0.95, ay - 0.3))
    if kind == "ellipse":
        return np.sqrt(x * x + (y / 0.55) ** 2) * 0.75 - 0.72
    raise KeyError(kind)


def _texture(kind: str, x, y, freq: float, phase: float):
    """Pattern value in [0, 1] over object-local coordinates."""
    soft = lambda v: np.clip(0.5 + 2.5 * v, 0, 1)  # noqa: E731 (soft-edged square wave)
    if kind == "spokes":
        return soft(np.sin(np.round(freq) * np.arctan2(y, x) + phase))
    if kind == "checks":
        return soft(np.sin(freq * x + phase) * np.sin(freq * y + phase))
    if kind == "stripes":
        return soft(np.sin(freq * (x + 0.4 * y) + phase))
    if kind == "dots":
        gx, gy = (x * freq / 6.283 + phase) % 1 - 0.5, (y * freq / 6.283) % 1 - 0.5
        return soft(0.3 - np.sqrt(gx * gx + gy * gy))
    if kind == "rim":
        return soft(np.sqrt(x * x + y * y) - 0.55)
    if kind == "waves":
        return soft(np.sin(freq * y + 1.5 * np.sin(freq * 0.6 * x + phase)))
    if kind == "grid":
        return soft(np.maximum(np.cos(freq * x + phase), np.cos(freq * y + phase)) - 0.75)
    if kind == "rings":
        return soft(np.sin(freq * 1.3 * np.sqrt(x * x + y * y) + phase))
    raise KeyError(kind)


def _random_colour(rng) -> np.ndarray:
    h, s, v = rng.random(), 0.45 + 0.5 * rng.random(), 0.35 + 0.6 * rng.random()
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


def random_instance(rng, cls: int, x: float, y: float, radius: float) -> dict:
    c1 = _random_colour(rng)
    c2 = _random_colour(rng)
    while np.abs(c1 - c2).sum() < 0.6:  # keep the pattern visible
        c2 = _random_colour(rng)
    return dict(cls=cls, x=x, y=y, radius=radius, angle=rng.uniform(0, 2 * math.pi),
                freq=rng.uniform(7, 11), phase=rng.uniform(0, 2 * math.pi), c1=c1, c2=c2)


def paint(canvas: np.ndarray, obj: dict, wrap: bool = True) -> None:
    """Composite one object (with a soft drop shadow) into a float32 HWC canvas, in place."""
    size_y, size_x = canvas.shape[:2]
    shape, tex = CLASSES[obj["cls"]].split("_")
    rad = obj["radius"]
    half = int(math.ceil(rad * 1.25)) + 3
    cx, cy = int(round(obj["x"])), int(round(obj["y"]))
    ys = np.arange(cy - half, cy + half + 1)
    xs = np.arange(cx - half, cx + half + 1)
    if wrap:
        rows, cols = ys % size_y, xs % size_x
    else:
        keep_y, keep_x = (ys >= 0) & (ys < size_y), (xs >= 0) & (xs < size_x)
        ys, xs = ys[keep_y], xs[keep_x]
        rows, cols = ys, xs
    dx = (xs[None, :] + 0.5 - obj["x"]) / rad
    dy = (ys[:, None] + 0.5 - obj["y"]) / rad
    ca, sa = math.cos(obj["angle"]), math.sin(obj["angle"])
    lx, ly = ca * dx + sa * dy, -sa * dx + ca * dy
    aa = 1.2 / rad  # anti-aliasing width: about one pixel
    region = canvas[np.ix_(rows, cols)]
    shadow = np.clip(0.5 - _shape_sdf(shape, lx - 0.08, ly - 0.1) / (4 * aa), 0, 1)[..., None]
    region *= 1 - 0.35 * shadow
    sdf = _shape_sdf(shape, lx, ly)
    alpha = np.clip(0.5 - sdf / aa, 0, 1)[..., None]
    t = _texture(tex, lx, ly, obj["freq"], obj["phase"])[..., None]
    colour = obj["c1"] * (1 - t) + obj["c2"] * t
    outline = np.clip(1 - np.abs(sdf + 1.5 * aa) / aa, 0, 1)[..., None] * 0.6
    colour = colour * (1 - outline)
    canvas[np.ix_(rows, cols)] = region * (1 - alpha) + colour * alpha


def make_world(rng, size: int, n_objects: int):
    """(ground-only raster, raster with objects, objects): float32 HWC in [0, 1]."""
    ground = make_ground(rng, size)
    world = ground.copy()
    objects = []
    for _ in range(n_objects):
        obj = random_instance(rng, int(rng.integers(len(CLASSES))), rng.uniform(0, size), rng.uniform(0, size),
                              rng.uniform(9, 26))
        paint(world, obj)
        objects.append(obj)
    return ground, world, objects


# ---------------------------------------------------------------------------------------------- camera

def _bilinear(flat: np.ndarray, h: int, w: int, u, v, wrap: bool) -> np.ndarray:
    """Bilinear lookup at continuous pixel coordinates in a raster flattened to (h * w, 3)."""
    u, v = u - 0.5, v - 0.5
    x0f, y0f = np.floor(u), np.floor(v)
    fx, fy = (u - x0f).astype(np.float32)[:, None], (v - y0f).astype(np.float32)[:, None]
    x0, y0 = x0f.astype(np.int64), y0f.astype(np.int64)
    if wrap:
        x0 %= w
        y0 %= h
        x1, y1 = x0 + 1, y0 + 1
        x1[x1 == w] = 0
        y1[y1 == h] = 0
    else:
        x1, y1 = np.clip(x0 + 1, 0, w - 1), np.clip(y0 + 1, 0, h - 1)
        x0, y0 = np.clip(x0, 0, w - 1), np.clip(y0, 0, h - 1)
    y0 *= w
    y1 *= w
    n = u.size
    taps = flat.take(np.concatenate([y0 + x0, y0 + x1, y1 + x0, y1 + x1]), axis=0).astype(np.float32)
    taps = taps.reshape(4, n, 3)
    top = taps[0] + (taps[1] - taps[0]) * fx
    bottom = taps[2] + (taps[3] - taps[2]) * fx
    return top + (bottom - top) * fy


class Pyramid:
    """Mip levels of a float32 HWC raster in [0, 1], stored as flat uint8 (less memory traffic)."""

    def __init__(self, raster: np.ndarray, levels: int = 5):
        self.levels = []
        r = raster.astype(np.float32)
        for k in range(levels):
            if k:
                r = 0.25 * (r[0::2, 0::2] + r[1::2, 0::2] + r[0::2, 1::2] + r[1::2, 1::2])
            self.levels.append((to_uint8(r).reshape(-1, 3), r.shape[0], r.shape[1]))

    def __len__(self):
        return len(self.levels)


def mip_pyramid(raster: np.ndarray, levels: int = 5) -> Pyramid:
    return Pyramid(raster, levels)


class GroundCamera:
    """A pinhole camera at height ``height`` above the ground, pitched down by ``pitch`` radians.

    The ground offset of each pixel's ray, in the camera's heading frame, is fixed; rendering moves
    and turns those offsets, and samples the mip level matching each pixel's ground footprint.
    Output is in [0, 255] float32.
    """

    def __init__(self, out_hw, pitch: float, height: float, hfov: float = math.radians(70), fog: float = 300.0,
                 levels: int = 5):
        rows, cols = out_hw
        self.out_hw, self.height, self.fog = out_hw, height, fog
        tan_h = math.tan(hfov / 2)
        tan_v = tan_h * rows / cols
        xn = ((np.arange(cols) + 0.5) / cols * 2 - 1) * tan_h
        yn = ((np.arange(rows) + 0.5) / rows * 2 - 1) * tan_v
        xn, yn = np.meshgrid(xn, yn)  # yn grows downwards
        cp, sp = math.cos(pitch), math.sin(pitch)
        forward = cp - yn * sp  # horizontal component along the heading
        down = sp + yn * cp     # downward component
        self.ground = (down > 1e-3).reshape(-1)
        self.ground_idx = np.nonzero(self.ground)[0]
        self.sky_idx = np.nonzero(~self.ground)[0]
        dist = height / np.maximum(down, 1e-3)
        self.side = (xn * dist).reshape(-1)[self.ground]
        self.ahead = (forward * dist).reshape(-1)[self.ground]
        norm = np.sqrt(xn * xn + forward * forward + down * down)
        ray_len = dist * norm
        footprint = ray_len * (2 * tan_h / cols) / np.maximum(down / norm, 0.05)
        level = np.log2(np.maximum(footprint.reshape(-1)[self.ground], 1.0))
        level = np.clip(np.floor(level + 0.5), 0, levels - 1).astype(np.int64)  # nearest mip level
        self.groups = [(int(k), np.nonzero(level == k)[0]) for k in np.unique(level)]
        self.fog_t = (1 - np.exp(-ray_len.reshape(-1)[self.ground] / fog))[:, None].astype(np.float32)
        # sky: elevation of each sky ray above the horizon and its azimuth relative to the heading
        self.elevation = np.arctan2(-down, np.sqrt(xn * xn + forward * forward)).reshape(-1)[self.sky_idx]
        self.azimuth = np.arctan2(xn, forward).reshape(-1)[self.sky_idx]
        t = np.clip(self.elevation / 0.6, 0, 1)[:, None]
        self.sky_base = (HORIZON * (1 - t) + ZENITH * t).astype(np.float32)

    def render(self, pyramid: Pyramid, x: float, y: float, yaw: float, sky=None, height_scale: float = 1.0,
               wrap=True) -> np.ndarray:
        """(H, W, 3) float32 frame in [0, 255]; yaw 0 looks along +y (raster rows)."""
        cy, sy = math.cos(yaw), math.sin(yaw)
        side, ahead = self.side * height_scale, self.ahead * height_scale
        u = x - ahead * sy + side * cy
        v = y + ahead * cy + side * sy
        colour = np.empty((u.size, 3), np.float32)
        for k, sel in self.groups:
            k = min(k, len(pyramid) - 1)
            flat, h, w = pyramid.levels[k]
            colour[sel] = _bilinear(flat, h, w, u[sel] / 2 ** k, v[sel] / 2 ** k, wrap)
        frame = np.empty((self.ground.size, 3), np.float32)
        frame[self.ground_idx] = colour + (HORIZON * 255 - colour) * self.fog_t
        if self.sky_idx.size:
            frame[self.sky_idx] = self.sky_colour(yaw, sky) * 255
        return frame.reshape(*self.out_hw, 3)

    def sky_colour(self, yaw: float, sky) -> np.ndarray:
        rgb = self.sky_base.copy()
        if sky:
            az = self.azimuth + yaw
            ridge = 0.02 + sum(a * np.sin(k * az + p) for k, a, p in sky)  # far hills turn with the camera
            hills = self.elevation < ridge
            rgb[hills] = HILLS * (0.9 + 0.1 * np.sin(7 * az[hills]))[:, None]
        return rgb


# ---------------------------------------------------------------------------------------------- videos

def camera_path(rng, seconds: float, fps: int, world_size: int):
    """Smooth walk: heading driven by a few random sinusoids, speed and bobbing height vary."""
    n = int(round(seconds * fps))
    t = np.arange(n) / fps
    turn = sum(rng.uniform(0.15, 0.45) * np.sin(2 * math.pi * rng.uniform(0.01, 0.12) * t + rng.uniform(0, 6.3))
               for _ in range(3))
    yaw = rng.uniform(0, 2 * math.pi) + np.cumsum(turn) / fps
    speed = rng.uniform(18, 30) * (1 + 0.35 * np.sin(2 * math.pi * rng.uniform(0.02, 0.08) * t + rng.uniform(0, 6.3)))
    speed = np.where(np.sin(2 * math.pi * 0.03 * t + rng.uniform(0, 6.3)) > 0.85, 0.0, speed)  # pauses to look round
    x = rng.uniform(0, world_size) + np.cumsum(-np.sin(yaw) * speed) / fps
    y = rng.uniform(0, world_size) + np.cumsum(np.cos(yaw) * speed) / fps
    bob = 1 + 0.04 * np.sin(2 * math.pi * 1.7 * t)
    return x, y, yaw, bob


def pick_codec() -> str:
    av = require("av", "generating the demo videos")

    # mpeg4 first: ffmpeg's own encoder gives identical bytes run to run; libx264 (as bundled with
    # PyAV) can give different bytes for identical runs even single-threaded, which breaks determinism.
    for name in ("mpeg4", "libx264"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    raise RuntimeError("PyAV's ffmpeg has neither a libx264 nor an mpeg4 encoder")


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """BT.601 limited-range planar 4:2:0 (what decoders assume for untagged yuv420p), done in numpy:
    ffmpeg's implicit conversion inside the encoder was seen to differ run to run."""
    rgb = frame.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    pool = lambda c: 0.25 * (c[0::2, 0::2] + c[1::2, 0::2] + c[0::2, 1::2] + c[1::2, 1::2])  # noqa: E731
    h, w = y.shape
    planes = [np.clip(np.round(p), 0, 255).astype(np.uint8).reshape(-1) for p in (y, pool(cb), pool(cr))]
    return np.concatenate(planes).reshape(h * 3 // 2, w)


def encode_mp4(frames, path, fps: int, codec: str) -> None:
    """Encode uint8 HWC frames (even sides); single-threaded with fixed options, so reproducible."""
    av = require("av", "writing video")

    h, w = frames[0].shape[:2]
    if h % 2 or w % 2:
        raise ValueError(f"video frames need even sides for 4:2:0, got {w}x{h}")
    with av.open(str(path), "w", format="mp4") as container:
        options = {"crf": "18", "preset": "veryfast", "threads": "1"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = 2 * fps  # a keyframe every 2 s: cheap seeks for lazy decoding
        stream.codec_context.thread_count = 1
        if codec != "libx264":
            stream.codec_context.qscale = 3
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def to_uint8(image: np.ndarray, scale: float = 255.0) -> np.ndarray:
    return np.clip(image * scale + 0.5, 0, 255).astype(np.uint8)


def look_schedule(rng, n_frames: int, fps: int, look_share: float) -> np.ndarray:
    """Per frame: -1 while walking, else the number of the look it belongs to. Walks of 2-5 s alternate with
    looks of 1.5-3 s, scaled so that about ``look_share`` of the frames are looks."""
    schedule = np.full(n_frames, -1, np.int64)
    walk_s = (2.0, 5.0) if look_share < 1 else (0.0, 0.0)
    scale = (1 - look_share) / max(look_share, 1e-6) * (2.25 / 3.5)  # mean look 2.25 s, mean walk 3.5 s
    i, looks = 0, 0
    while i < n_frames:
        i += int(rng.uniform(*walk_s) * scale * fps)
        n = int(rng.uniform(1.5, 3.0) * fps)
        schedule[i:i + n] = looks
        i, looks = i + n, looks + 1
    return schedule


def nearest_object(objects: list[dict], x: float, y: float, world_size: int) -> dict:
    """The object whose centre is nearest (x, y) on the wrapping world."""
    centres = np.array([(o["x"], o["y"]) for o in objects])
    d = np.abs(centres - (x, y)) % world_size
    d = np.minimum(d, world_size - d)
    return objects[int(np.argmin((d * d).sum(1)))]


def look_position(obj: dict, yaw: float, back: float) -> tuple[float, float]:
    """Where a camera heading ``yaw`` stands so that its central ray, meeting the ground ``back`` ahead,
    lands on the object's centre."""
    return obj["x"] + back * math.sin(yaw), obj["y"] - back * math.cos(yaw)


def render_videos(rng, world_pyramid, objects: list[dict], out_dir: Path, cfg: dict, codec: str) -> list[dict]:
    entries = []
    size, fps = cfg["video_size"], cfg["video_fps"]
    for k in range(cfg["n_videos"]):
        pitch = math.radians(rng.uniform(28, 42))
        camera = GroundCamera((size, size), pitch, height=rng.uniform(28, 40))
        # looking down at an object: the labelled images' view (steep pitch, 60 degree field, no haze)
        look_pitch, look_height = math.radians(rng.uniform(62, 80)), rng.uniform(48, 62)
        look_camera = GroundCamera((size, size), look_pitch, look_height, hfov=math.radians(60), fog=1e4)
        look_back = look_height / math.tan(look_pitch)
        sky = [(m, rng.uniform(0.01, 0.04), rng.uniform(0, 6.3)) for m in (2, 3, 5, 9)]
        schedule = look_schedule(rng, int(round(cfg["seconds"] * fps)), fps, cfg["look_share"])
        walking = schedule < 0
        x, y, yaw, bob = camera_path(rng, max(walking.sum(), 1) / fps, fps, cfg["world_size"])
        frames, step, look = [], 0, None
        for look_id in schedule:
            j = min(step, len(x) - 1)  # the walker's place: where it stands while it looks
            if look_id < 0:
                frames.append(camera.render(world_pyramid, x[j], y[j], yaw[j], sky, bob[j]))
                step += 1
                continue
            if look is None or look["id"] != look_id:  # a new look: the object just ahead of the walker
                ahead_x, ahead_y = x[j] - 40 * math.sin(yaw[j]), y[j] + 40 * math.cos(yaw[j])
                look = dict(id=look_id, obj=nearest_object(objects, ahead_x, ahead_y, cfg["world_size"]),
                            yaw=yaw[j], turn=rng.uniform(-0.6, 0.6) / fps)
            look["yaw"] += look["turn"]
            cam_x, cam_y = look_position(look["obj"], look["yaw"], look_back)
            frames.append(look_camera.render(world_pyramid, cam_x, cam_y, look["yaw"], sky, bob[j]))
        frames = [to_uint8(f, 1.0) for f in frames]
        name = f"walk_{k:03d}.mp4"
        encode_mp4(frames, out_dir / name, fps, codec)
        entries.append(dict(file=name, seconds=cfg["seconds"], fps=fps, frames=len(frames),
                            pitch_deg=round(math.degrees(pitch), 3), looks=int(schedule.max() + 1),
                            look_frames=int((~walking).sum())))
    return entries


# ---------------------------------------------------------------------------------------------- labelled

def render_object_image(rng, ground_pyramid_src: np.ndarray, cls: int, size: int) -> np.ndarray:
    """A new instance of ``cls`` on a random ground patch, seen from above at a random angle."""
    patch_size = 192
    gy, gx = rng.integers(0, ground_pyramid_src.shape[0] - patch_size, size=2)
    patch = ground_pyramid_src[gy:gy + patch_size, gx:gx + patch_size].copy()
    centre = patch_size / 2 + rng.uniform(-3, 3, size=2)
    obj = random_instance(rng, cls, centre[0], centre[1], rng.uniform(18, 26))
    paint(patch, obj, wrap=False)
    pitch = math.radians(rng.uniform(60, 90))
    height = rng.uniform(45, 70)
    camera = GroundCamera((size, size), pitch, height, hfov=math.radians(60), fog=1e4)
    yaw = rng.uniform(0, 2 * math.pi)
    back = height / math.tan(pitch) if pitch < math.radians(89.9) else 0.0  # put the object mid-frame
    cam_x, cam_y = look_position(obj, yaw, back)
    image = camera.render(mip_pyramid(patch, 4), cam_x, cam_y, yaw, sky=None, wrap=False)
    return to_uint8(image, 1.0)


def render_labelled(rng, ground: np.ndarray, out_dir: Path, cfg: dict) -> dict:
    from PIL import Image

    counts = {"train": cfg["n_train"], "val": cfg["n_val"]}
    for split, n in counts.items():
        for cls, name in enumerate(CLASSES):
            folder = out_dir / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                image = render_object_image(rng, ground, cls, cfg["image_size"])
                Image.fromarray(image).save(folder / f"{name}_{i:04d}.png", optimize=False)
    return dict(classes=list(CLASSES), n_train_per_class=cfg["n_train"], n_val_per_class=cfg["n_val"],
                image_size=cfg["image_size"])


# ---------------------------------------------------------------------------------------------- cache

def generate(out_dir, seed: int = 0, **overrides) -> dict:
    """Write the demo set into ``out_dir`` (must not exist); returns the manifest (also written)."""
    cfg = dict(DEFAULTS, **overrides)
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown demo settings: {sorted(unknown)}")
    out_dir = Path(out_dir)
    start = time.perf_counter()
    codec = pick_codec()
    rng = np.random.default_rng([seed, RNG_STREAM])
    ground, world, objects = make_world(rng, cfg["world_size"], cfg["n_objects"])
    (out_dir / "videos").mkdir(parents=True)
    videos = render_videos(rng, mip_pyramid(world), objects, out_dir / "videos", cfg, codec)
    labelled = render_labelled(rng, ground, out_dir / "labelled", cfg)
    for entry in videos:
        entry["sha256"] = hashlib.sha256((out_dir / "videos" / entry["file"]).read_bytes()).hexdigest()
        entry["bytes"] = (out_dir / "videos" / entry["file"]).stat().st_size
    manifest = dict(version=DEMO_VERSION, seed=seed, config=cfg, codec=codec, videos=videos, labelled=labelled,
                    generation_s=round(time.perf_counter() - start, 3))
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _complete(folder: Path):
    """The manifest when ``folder`` holds a finished demo set of this version, else None."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != DEMO_VERSION:
        return None
    for entry in manifest.get("videos", []):
        video = folder / "videos" / entry["file"]
        if not video.is_file() or video.stat().st_size != entry["bytes"]:
            return None
    if not (folder / "labelled" / "train").is_dir() or not (folder / "labelled" / "val").is_dir():
        return None
    return manifest


def ensure_demo_data(root=None, seed: int = 0, force: bool = False, verbose: bool = True, **overrides) -> DemoPaths:
    """The demo data set, generated on first use under ``root`` (default ``$MAE_FAST_DATA`` or
    ``~/.cache/mae_fast/demo``) in a folder named after the version and settings.

    Safe against interruption and concurrent callers (e.g. several ranks): each generates into a
    private temporary folder and renames it into place; a loser of the race uses the winner's copy.
    """
    base = Path(root).expanduser() if root is not None else default_cache_dir()
    cfg = dict(DEFAULTS, **overrides)
    tag = f"v{DEMO_VERSION}-seed{seed}"
    if cfg != DEFAULTS:
        tag += "-" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
    final = base / tag
    manifest = None if force else _complete(final)
    if manifest is None:
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{tag}-", dir=base))
        try:
            if verbose:
                print(f"mae_fast: generating demo data in {final} (once) ...", flush=True)
            generate(tmp / "data", seed=seed, **overrides)
            if final.exists() and (force or _complete(final) is None):
                stale = Path(tempfile.mkdtemp(prefix=f".stale-{tag}-", dir=base))
                os.replace(final, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.replace(tmp / "data", final)
            except OSError:
                if _complete(final) is None:  # someone else's folder appeared but is unusable
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        manifest = _complete(final)
        if manifest is None:
            raise RuntimeError(f"demo data generation in {final} did not complete")
        if verbose:
            print(f"mae_fast: demo data ready ({manifest['generation_s']:.1f} s)", flush=True)
    return DemoPaths(root=final, videos=final / "videos", labelled=final / "labelled", manifest=manifest)



if __name__ == "__main__":  # python -m mae_fast.data.demo [ROOT]: generate (or find) the demo set
    import sys

    found = ensure_demo_data(sys.argv[1] if len(sys.argv) > 1 else None)
    print(f"videos:   {found.videos}\nlabelled: {found.labelled}")
