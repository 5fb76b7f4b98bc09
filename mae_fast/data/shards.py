"""WebDataset tar shards: an offline writer of sampled frames, and a streaming loader.

Writer: frames of a video subset (``hours``/``subset``/``seed``/``fps`` as for
:func:`mae_fast.data.build_pretrain_dataset`) or the images of a folder go into
``<out>/<prefix>-000000.tar``, ... (each sample ``<key>.jpg`` + ``<key>.json`` with its source file and
time), plus ``index.json`` (shards and counts), ``record.json`` (the exact subset record) and ``manifest.jsonl``
(per shard the keys of its samples and their source names, for image-count subsets: :mod:`.image_subsets`).
Tars are written with fixed metadata and renamed into place when complete.

    python -m mae_fast.data.shards SOURCE OUT [--hours H --subset contiguous|uniform --fps 1 ...]

Loader: :class:`ShardDataset`, an IterableDataset that splits shards across ranks
(torch.distributed, else ``rank``/``world_size`` given) and DataLoader workers, shuffles shard order
per epoch (same order on every rank) and samples through a buffer. When there are fewer shards than
rank x worker consumers it falls back to splitting samples instead (every consumer reads every shard).
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch

from mae_fast.extras import require

from .base import DataError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


# ---------------------------------------------------------------------------------------------- writer

class _TarShardWriter:
    """Rolls over to a new tar after ``maxcount`` samples or ``max_bytes`` bytes."""

    def __init__(self, out_dir: Path, prefix: str, maxcount: int, max_bytes: float):
        self.out_dir, self.prefix, self.maxcount, self.max_bytes = out_dir, prefix, maxcount, max_bytes
        self.shards: list[dict] = []
        self.manifest: list[tuple[list, list]] = []  # per shard: (keys, names)
        self.tar = None

    def _open(self):
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self.tmp = self.out_dir / f".{name}.tmp"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "n_samples": 0, "bytes": 0})
        self.manifest.append(([], []))

    def _close(self):
        if self.tar is not None:
            self.tar.close()
            os.replace(self.tmp, self.out_dir / self.shards[-1]["name"])
            self.tar = None

    def write(self, key: str, members: dict, name: str | None = None) -> None:
        current = self.shards[-1] if self.shards else None
        if self.tar is None or current["n_samples"] >= self.maxcount or current["bytes"] >= self.max_bytes:
            self._close()
            self._open()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self.tar.addfile(info, io.BytesIO(data))
            self.shards[-1]["bytes"] += len(data) + 512
        self.shards[-1]["n_samples"] += 1
        self.manifest[-1][0].append(key)
        self.manifest[-1][1].append(key if name is None else name)

    def close(self) -> list[dict]:
        self._close()
        return self.shards

    def write_manifest(self, path: Path) -> None:
        """``manifest.jsonl``: per shard, the keys of its samples and their names (the image's path under the
        source folder, or ``<video>#<slot>``), which image-count subsets choose from without reading a tar."""
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            for shard, (keys, names) in zip(self.shards, self.manifest):
                entry = {"shard": shard["name"], "keys": keys}
                if names != keys:
                    entry["names"] = names
                f.write(json.dumps(entry) + "\n")
        os.replace(tmp, path)


def _encode(frame: np.ndarray, image_format: str, quality: int, max_side) -> bytes:
    from PIL import Image

    image = Image.fromarray(frame)
    if max_side and max(image.size) > max_side:
        s = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * s)), max(1, round(image.height * s))), Image.BICUBIC)
    buf = io.BytesIO()
    if image_format == "jpg":
        image.save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format=image_format.upper())
    return buf.getvalue()


def _relative(path, src: Path) -> str:
    """``path`` relative to the source folder (a single-file source: its name), with ``/`` separators."""
    path = Path(path)
    return path.name if src.is_file() else Path(os.path.relpath(path, src)).as_posix()


def write_shards(source, out_dir, fps=1.0, hours=None, subset="contiguous", seed=0, chunk_minutes=None,
                 maxcount=1000, max_bytes=256e6, image_format="jpg", quality=90, max_side=None, prefix="shard",
                 video_backend="auto", overwrite=False, record=None, verbose=False) -> dict:
    """Write frames/images of ``source`` to tar shards in ``out_dir``; returns the index (also saved)."""
    from . import _probe_all, ensure_demo_data
    from .images import list_images, load_image, screen_images
    from .subset import check_fps, make_record, select, selection_from_record
    from .video import iter_frames_at, list_videos

    fps = check_fps(fps)
    if image_format not in ("jpg", "png", "webp"):
        raise ValueError(f"image_format must be jpg, png or webp, got {image_format!r}")
    if maxcount < 1:
        raise ValueError("maxcount must be >= 1")
    out_dir = Path(out_dir)
    if (out_dir / "index.json").exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds shards (index.json); pass overwrite=True")
    if source is None:
        source = ensure_demo_data().videos
    src = Path(source).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"data source {source!r} does not exist")
    videos = list_videos(src) if record is None else [e["file"] for e in record["files"]]
    images = [] if videos else list_images(src)
    if not videos and not images:
        raise FileNotFoundError(f"no videos or images found under {source}")
    if images and hours is not None:
        raise ValueError(f"hours applies to video sources; {source} holds images")
    skipped, lost = [], 0
    if videos:
        infos, skipped = _probe_all(videos, video_backend)
        if not infos:
            raise DataError(f"none of the {len(videos)} videos under {source} could be read: {skipped[:3]}")
        durations = {f: infos[f].duration_s for f in videos if f in infos}
        selection = (selection_from_record(record) if record is not None
                     else select(durations, fps, hours, subset, seed, chunk_minutes))
        rec = make_record(selection, durations, src, hours, subset, seed, chunk_minutes, skipped)
    else:
        good, skipped = screen_images(images)
        if not good:
            raise DataError(f"none of the {len(images)} images under {source} could be read: {skipped[:3]}")
    # only now, with the source checked and its selection made, are the old shards removed
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{prefix}-*.tar"):
        old.unlink()
    writer = _TarShardWriter(out_dir, prefix, maxcount, max_bytes)
    if videos:
        for fi, (path, slots) in enumerate(zip(selection.files, selection.slots)):
            done = 0
            try:
                for t, frame in iter_frames_at(path, (slots / selection.fps).tolist(), video_backend):
                    slot = int(round(t * selection.fps))
                    meta = {"file": str(path), "t": float(t), "slot": slot, "fps": selection.fps}
                    writer.write(f"{fi:06d}_{slot:09d}", {image_format: _encode(frame, image_format, quality, max_side),
                                                          "json": json.dumps(meta).encode()},
                                 name=f"{_relative(path, src)}#{slot}")
                    done += 1
            except Exception as err:  # noqa: BLE001
                reason = f"{type(err).__name__}: {err}"
                warnings.warn(f"mae_fast.data: {path}: stopped after {done} frames: {reason}", RuntimeWarning)
                skipped.append((str(path), reason))
                lost += len(slots) - done
            if verbose:
                print(f"[{fi + 1}/{len(selection.files)}] {path}: {done} frames", flush=True)
    else:
        for i, path in enumerate(good):
            try:
                frame = load_image(path)
            except Exception as err:  # noqa: BLE001
                skipped.append((path, f"{type(err).__name__}: {err}"))
                continue
            meta = {"file": str(path)}
            writer.write(f"{i:09d}", {image_format: _encode(frame, image_format, quality, max_side),
                                      "json": json.dumps(meta).encode()}, name=_relative(path, src))
        rec = {"kind": "images", "source": str(src), "n_images": len(good)}
    shards = writer.close()
    rec["skipped"] = [[str(p), str(r)] for p, r in skipped]
    if lost:
        rec["frames_lost_to_errors"] = lost
    index = {"format": "mae_fast-shards-1", "image_format": image_format,
             "n_samples": sum(s["n_samples"] for s in shards), "shards": shards, "record": rec}
    (out_dir / "record.json").write_text(json.dumps(rec))
    writer.write_manifest(out_dir / "manifest.jsonl")
    tmp = out_dir / ".index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out_dir / "index.json")
    return index


# ---------------------------------------------------------------------------------------------- loader

def expand_urls(source) -> list[str]:
    """Shard urls from a folder, a glob, a brace pattern (``shard-{000000..000009}.tar``) or a list."""
    if isinstance(source, (list, tuple)):
        return [u for s in source for u in expand_urls(s)]
    text = str(source)
    if "{" in text:
        from braceexpand import braceexpand

        return [u for part in braceexpand(text) for u in expand_urls(part)]
    if text.startswith(("pipe:", "http://", "https://", "gs://", "s3://")):
        return [text]
    path = Path(text).expanduser()
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"no .tar shards in {path}")
        return urls
    if any(c in text for c in "*?["):
        urls = sorted(glob.glob(str(path)))
        if not urls:
            raise FileNotFoundError(f"no shards match {text}")
        return urls
    if not path.exists():
        raise FileNotFoundError(f"shard {text} does not exist")
    return [str(path)]


def _open_url(url: str):
    if url.startswith(("pipe:", "http://", "https://", "gs://", "s3://")):
        gopen = require("webdataset.gopen", "reading remote shards").gopen
        return gopen(url, "rb")
    return open(url, "rb")


def iter_tar_samples(url: str):
    """Yield ``{"__key__": key, ext: bytes, ...}`` for consecutive members sharing a key."""
    with _open_url(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        sample = None
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            key = member.name[: len(member.name) - len(base)] + base.split(".", 1)[0]
            ext = base.split(".", 1)[1].lower()
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            sample[ext] = tar.extractfile(member).read()
        if sample is not None:
            yield sample


def _dist_rank_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    from .transforms import to_uint8_hwc

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return to_uint8_hwc(im.convert("RGB"))


class ShardDataset(torch.utils.data.IterableDataset):
    """Streams decoded, transformed images from tar shards; see the module docstring.

    ``rank``/``world_size`` default to torch.distributed's (or 0/1); ``worker`` = (id, count)
    overrides the DataLoader worker info (for tests). Each pass over the data uses a new shard order
    and buffer stream (epoch counter, or the epoch given to :meth:`set_epoch`). ``return_meta``
    yields ``(image, meta)`` with the sample's key and json. ``skipped`` lists unreadable shards and
    samples of this process.

    Ranks usually get unequal shares (shards differ in size), which stalls DDP at the end of a pass;
    ``epoch_samples=N`` makes every pass yield exactly ``N // world_size`` samples per rank (split over
    its workers), cycling through the rank's shards again (in a new order) if they run out.

    ``keep`` ({shard file name: set of sample keys}, from :func:`~mae_fast.data.image_subsets.choose_subset`)
    reads only those samples: shards without any are left out, the others filtered by key.
    """

    def __init__(self, source, transform=None, shuffle_buffer: int = 1000, seed: int = 0, shardshuffle: bool = True,
                 rank=None, world_size=None, worker=None, return_meta: bool = False, epoch_samples=None,
                 keep=None):
        super().__init__()
        self.urls = expand_urls(source)
        self.keep = None if keep is None else {k: set(v) for k, v in keep.items()}
        if self.keep is not None:
            self.urls = [u for u in self.urls if self.keep.get(Path(u).name)]
        self.source = source
        self.transform, self.shuffle_buffer, self.seed = transform, int(shuffle_buffer), int(seed)
        self.shardshuffle, self.rank, self.world_size, self.worker = shardshuffle, rank, world_size, worker
        self.return_meta = return_meta
        self.epoch_samples = None if epoch_samples is None else int(epoch_samples)
        self.epoch = None
        self._passes = 0
        self.skipped: list[tuple[str, str]] = []
        self.index = self._read_index()
        self.num_samples = self.index.get("n_samples") if self.index else None
        if self.keep is not None:
            self.num_samples = sum(len(v) for v in self.keep.values())
        self.record = dict(self.index.get("record", {})) if self.index else {"kind": "shards"}
        self.record.update(shards_source=str(source), n_shards=len(self.urls))

    def _read_index(self):
        first = Path(self.urls[0])
        for candidate in (first.parent / "index.json",):
            try:
                index = json.loads(candidate.read_text())
            except (OSError, ValueError):
                return None
            names = {s["name"] for s in index.get("shards", [])}
            if all(Path(u).name in names and Path(u).parent == first.parent for u in self.urls):
                if len(names) != len(self.urls):  # a subset of the shards: count only those
                    index["n_samples"] = sum(s["n_samples"] for s in index["shards"]
                                             if s["name"] in {Path(u).name for u in self.urls})
                return index
        return None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _skip(self, what, reason):
        self.skipped.append((str(what), str(reason)))
        warnings.warn(f"mae_fast.data: skipping {what}: {reason}", RuntimeWarning, stacklevel=2)

    def _consumer(self):
        rank, world = _dist_rank_world()
        rank = rank if self.rank is None else int(self.rank)
        world = world if self.world_size is None else int(self.world_size)
        if self.worker is not None:
            wid, nw = self.worker
        else:
            info = torch.utils.data.get_worker_info()
            wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def __iter__(self):
        epoch = self.epoch if self.epoch is not None else self._passes
        self._passes += 1
        me, consumers = self._consumer()
        if self.epoch_samples is None:
            yield from self._one_pass(epoch, 0, me, consumers)
            return
        world = self._world()
        workers = consumers // world
        per_rank = self.epoch_samples // world
        quota = per_rank // workers + (1 if me % workers < per_rank % workers else 0)
        cycle = 0
        while quota > 0:
            produced = 0
            for item in self._one_pass(epoch, cycle, me, consumers):
                yield item
                produced += 1
                quota -= 1
                if quota == 0:
                    return
            if produced == 0:
                raise DataError(f"consumer {me} of {consumers} has no readable samples in {self.source}")
            cycle += 1

    def _world(self) -> int:
        return int(self.world_size) if self.world_size is not None else _dist_rank_world()[1]

    def _one_pass(self, epoch: int, cycle: int, me: int, consumers: int):
        order = np.arange(len(self.urls))
        if self.shardshuffle:
            order = np.random.default_rng([self.seed, epoch, cycle]).permutation(len(self.urls))
        by_shard = len(self.urls) >= consumers
        if not by_shard and me == 0 and cycle == 0:
            warnings.warn(f"{len(self.urls)} shards for {consumers} rank x worker consumers: splitting by sample "
                          f"(every consumer reads every shard); write more shards", RuntimeWarning, stacklevel=2)
        mine = order[me::consumers] if by_shard else order
        rng = np.random.default_rng([self.seed, epoch, cycle, me, 1])
        buffer = []
        for item in self._samples([self.urls[i] for i in mine], None if by_shard else (me, consumers)):
            if self.shuffle_buffer <= 1:
                yield item
                continue
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            k = int(rng.integers(len(buffer)))
            buffer[k], item = item, buffer[k]
            yield item
        rng.shuffle(buffer)
        yield from buffer

    def _samples(self, urls, modulo):
        count = 0
        for url in urls:
            wanted = None if self.keep is None else self.keep.get(Path(url).name, ())
            try:
                for sample in iter_tar_samples(url):
                    if wanted is not None and sample["__key__"] not in wanted:
                        continue
                    if modulo is not None:
                        count += 1
                        if (count - 1) % modulo[1] != modulo[0]:
                            continue
                    item = self._decode(sample)
                    if item is not None:
                        yield item
            except (tarfile.TarError, OSError, EOFError) as err:
                self._skip(url, f"{type(err).__name__}: {err} (rest of shard)")

    def _decode(self, sample):
        ext = next((e for e in IMAGE_KEYS if e in sample), None)
        if ext is None:
            self._skip(sample["__key__"], "no image member")
            return None
        try:
            image = _decode_image(sample[ext])
        except Exception as err:  # noqa: BLE001
            self._skip(f"{sample['__url__']}:{sample['__key__']}", f"{type(err).__name__}: {err}")
            return None
        x = self.transform(image) if self.transform is not None else image
        if not self.return_meta:
            return x
        meta = {"__key__": sample["__key__"], "__url__": sample["__url__"]}
        if "json" in sample:
            try:
                meta.update(json.loads(sample["json"]))
            except ValueError:
                pass
        return x, meta


# ---------------------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mae_fast.data.shards",
                                description="Write sampled video frames (or an image folder) to WebDataset tar shards.")
    p.add_argument("source", nargs="?", default=None, help="folder of videos or images (default: the demo videos)")
    p.add_argument("out", help="output folder for the shards, index.json and record.json")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video (default 1)")
    p.add_argument("--hours", type=float, default=None, help="hours of video to take (default: all)")
    p.add_argument("--subset", choices=("contiguous", "uniform"), default="contiguous")
    p.add_argument("--chunk-minutes", type=float, default=None, help="contiguous draws in chunks of N minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", default=None, help="replay the selection of a saved record.json")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    p.add_argument("--max-mb", type=float, default=256, help="rough shard size cap in MB")
    p.add_argument("--format", choices=("jpg", "png", "webp"), default="jpg")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--max-side", type=int, default=None, help="downscale frames so the longer side is at most this")
    p.add_argument("--prefix", default="shard")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        record = json.loads(Path(args.record).read_text()) if args.record else None
        index = write_shards(args.source, args.out, fps=args.fps, hours=args.hours, subset=args.subset,
                             seed=args.seed, chunk_minutes=args.chunk_minutes, maxcount=args.maxcount,
                             max_bytes=args.max_mb * 1e6, image_format=args.format, quality=args.quality,
                             max_side=args.max_side, prefix=args.prefix, overwrite=args.overwrite, record=record,
                             verbose=True)
    except (FileNotFoundError, FileExistsError, ValueError, DataError) as e:  # the user's input: no traceback
        print(f"{p.prog}: {e}", file=sys.stderr)
        return 2
    rec = index["record"]
    print(f"wrote {index['n_samples']} samples in {len(index['shards'])} shards to {args.out}"
          + (f" ({rec['hours_selected']:.4f} h at {rec['fps']} fps)" if rec.get("kind") == "video" else "")
          + (f"; skipped {len(rec['skipped'])} unreadable files" if rec["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
