"""Data for MAE pretraining and finetuning: long videos sampled at a chosen rate (hours subsets,
recorded exactly), image folders, WebDataset shards, and a built-in procedurally generated demo set.

    paths = ensure_demo_data()                          # .videos, .labelled (train/ val/)
    ds = build_pretrain_dataset(None, img_size=64, hours=0.05, subset="contiguous", seed=0, fps=1.0)
    ds = build_pretrain_dataset("/data/images", images=100_000, subset_strategy="per_source", subset_dir="runs/x")
    image_subset(paths, 1000, seed=0)                   # nested, order-independent n-image subsets
    train_ds, val_ds, classes = build_labelled_datasets(None, img_size=64, fraction=0.1)
"""
from __future__ import annotations

import warnings
from pathlib import Path

from mae_fast.extras import require

from .base import DataError
from .demo import DemoPaths, ensure_demo_data
from .samplers import (SeededItems, StepBatchSampler, StreamBatches, SyntheticImages, collate_images,
                       collate_labelled, epoch_batches, mix_seed)
from .image_subsets import STRATEGIES as SUBSET_STRATEGIES, SubsetError, choose_subset, image_subset, water_fill
from .images import (ImageFileDataset, list_images, per_class_fraction, scan_image_folder, screen_images,
                     split_per_class)
from .label_subsets import LABEL_SAMPLINGS, label_subset, subset_counts
from .subset import SUBSET_MODES, check_fps, make_record, select, selection_from_record
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, as_size, build_transform,
                         denormalize)
from .video import VideoFrameDataset, list_videos, probe_video, resolve_backend

__all__ = [
    "ensure_demo_data", "build_pretrain_dataset", "build_labelled_datasets", "IMAGENET_MEAN", "IMAGENET_STD",
    "DemoPaths", "TrainTransform", "EvalTransform", "build_transform", "denormalize", "VideoFrameDataset",
    "ImageFileDataset", "probe_video", "list_videos", "list_images", "is_shard_source", "DataError",
    "SeededItems", "StepBatchSampler", "StreamBatches", "SyntheticImages", "epoch_batches", "collate_images",
    "collate_labelled", "mix_seed", "image_subset", "choose_subset", "water_fill", "SubsetError", "SUBSET_STRATEGIES",
]


def is_shard_source(source) -> bool:
    """A WebDataset url/pattern: ``.tar`` file(s), a brace pattern, a pipe:/http(s):// url, or a list
    of those, or a folder holding only ``.tar`` shards."""
    if isinstance(source, (list, tuple)):
        return bool(source) and all(is_shard_source(s) for s in source)
    text = str(source)
    if text.startswith(("pipe:", "http://", "https://", "gs://", "s3://")) or ("{" in text and ".." in text):
        return True
    if text.endswith((".tar", ".tar.gz", ".tgz")):
        return True
    path = Path(text)
    if path.is_dir():
        shards = list(path.glob("*.tar"))
        return bool(shards) and not list_videos(path) and not list_images(path)
    return False


def _probe_all(files, backend):
    """{path: VideoInfo} of the readable videos, and [(path, reason)] of the others."""
    infos, skipped = {}, []
    backend = resolve_backend(backend)  # once, not per file (checking torchcodec loads FFmpeg)
    if backend == "pyav":
        require("av", "reading video")  # a missing PyAV is one error, not every file "unreadable"
    for f in files:
        try:
            info = probe_video(f, backend)
            if not info.duration_s > 0:
                raise ValueError("zero duration")
            infos[f] = info
        except Exception as err:  # noqa: BLE001
            reason = f"{type(err).__name__}: {err}"
            skipped.append((f, reason))
            warnings.warn(f"mae_fast.data: skipping unreadable video {f}: {reason}", RuntimeWarning, stacklevel=3)
    return infos, skipped


def build_pretrain_dataset(source=None, img_size=64, hours=None, subset="contiguous", seed=0, fps=1.0,
                           train=True, *, chunk_minutes=None, record=None, transform=None,
                           ram_limit_bytes=2e9, max_side=None, video_backend="auto", scale=(0.2, 1.0), crop_pct=1.0,
                           shuffle_buffer=1000, epoch_samples=None, check_images=True, demo_root=None,
                           images=None, subset_strategy="random", subset_dir=None, subset_replay=None):
    """Frames for MAE pretraining, as a torch Dataset of normalised float32 (3, H, W) tensors.

    ``source``: None or "demo" (the built-in demo videos), a folder of videos (recursive), a video file, a list
    of those, a folder of images (recursive), or WebDataset shards (see :func:`is_shard_source`; an
    IterableDataset, with the subset chosen when the shards were written; ``epoch_samples`` evens out
    ranks for DDP, see :class:`~mae_fast.data.shards.ShardDataset`). ``hours`` (video only)
    picks a subset per ``subset`` in {"contiguous", "uniform"} (``chunk_minutes`` for chunked
    contiguous draws, see :mod:`mae_fast.data.subset`); ``record`` replays a saved ``ds.record``
    instead. ``train`` selects the MAE augmentation (RandomResizedCrop(scale) + flip) or a plain
    resize + centre crop. Video frames are kept in RAM when they fit in ``ram_limit_bytes`` (after an
    optional ``max_side`` downscale), else decoded per item (seeking; for big data prefer shards).
    The result has ``.record`` (JSON-able) and ``.skipped`` ([(path, reason)]).

    ``images=N`` (image folders and shards) takes an N-image subset by ``subset_strategy`` (random | per_source),
    recorded in, and with ``subset_replay`` replayed from, ``subset_dir``: see
    :func:`~mae_fast.data.image_subsets.choose_subset`.
    """
    fps = check_fps(fps)
    if subset not in SUBSET_MODES:
        raise ValueError(f"subset must be one of {SUBSET_MODES}, got {subset!r}")
    if transform is None:
        transform = build_transform(as_size(img_size), train, scale=scale, crop_pct=crop_pct)
    if record is not None:
        if record.get("kind") != "video" or "files" not in record:
            raise ValueError("only video records (ds.record of a video source) can be replayed")
        source = record.get("source", source)
    if source is None or (isinstance(source, str) and source.strip().lower() in ("", "demo")):
        source = ensure_demo_data(demo_root).videos
    if is_shard_source(source):
        if hours is not None:
            raise ValueError("hours subsets of shards are chosen when writing them (mae_fast.data.shards)")
        from .shards import ShardDataset, expand_urls

        chosen = None if images is None else choose_subset(expand_urls(source), images, seed, subset_strategy,
                                                           subset_dir, subset_replay, shards=True)
        ds = ShardDataset(source, transform=transform, shuffle_buffer=shuffle_buffer if train else 0, seed=seed,
                          epoch_samples=epoch_samples, keep=None if chosen is None else chosen.keep)
        if chosen is not None:
            ds.record = dict(chosen.record, shards_source=str(source), n_shards=len(ds.urls))
        return ds
    sources = [Path(s).expanduser() for s in (source if isinstance(source, (list, tuple)) else [source])]
    for s in sources:
        if not s.exists():
            raise FileNotFoundError(f"data source {str(s)!r} does not exist")
    path = sources[0] if len(sources) == 1 else [str(s) for s in sources]
    if record is not None:
        videos = [e["file"] for e in record["files"]]
    else:
        videos = sorted({v for s in sources for v in list_videos(s)})
    if images is not None and hours is not None:
        raise SubsetError("set hours (video subsets) or images (image-count subsets), not both")
    if videos and images is not None:
        raise SubsetError(f"images applies to image folders and shards; {source} holds videos (use hours)")
    if videos:
        infos, skipped = _probe_all(videos, video_backend)
        if not infos:
            raise DataError(f"none of the {len(videos)} videos under {source} could be read: {skipped[:3]}")
        durations = {f: infos[f].duration_s for f in videos if f in infos}
        if record is not None:
            selection = selection_from_record(record)
            missing = [f for f in selection.files if f not in infos]
            if missing:
                raise RuntimeError(f"cannot replay the record: unreadable videos {missing[:3]}")
            hours, subset, seed = record.get("hours_requested"), record.get("subset"), record.get("seed", seed)
            chunk_minutes = record.get("chunk_minutes")
            fps = selection.fps
        else:
            selection = select(durations, fps, hours, subset, seed, chunk_minutes)
        rec = make_record(selection, durations, path, hours, subset, seed, chunk_minutes, skipped)
        return VideoFrameDataset(selection, transform=transform, record=rec, skipped=skipped, infos=infos,
                                 ram_limit_bytes=ram_limit_bytes, backend=video_backend, max_side=max_side)
    if images is not None:  # streamed from the folder, never listed whole
        if len(sources) != 1:
            raise SubsetError("images subsets take one image folder or WebDataset shards, not a list of sources")
        chosen = choose_subset(sources[0], images, seed, subset_strategy, subset_dir, subset_replay, check_images)
        bad = [tuple(b) for b in chosen.record["skipped"]]
        return ImageFileDataset(chosen.files, transform=transform, skipped=bad, record=chosen.record)
    images = sorted({i for s in sources for i in list_images(s)})
    if images:
        if hours is not None:
            raise ValueError(f"hours applies to video sources; {source} holds images (no videos)")
        good, bad = screen_images(images, check_images)
        if not good:
            raise DataError(f"none of the {len(images)} images under {source} could be read: {bad[:3]}")
        rec = {"kind": "images", "source": str(path), "n_images": len(good), "seed": int(seed),
               "skipped": [[p, r] for p, r in bad]}
        return ImageFileDataset(good, transform=transform, skipped=bad, record=rec)
    raise FileNotFoundError(f"no videos ({', '.join(('.mp4', '.mkv', '.webm', '...'))}), images or .tar shards "
                            f"found under {source}")


def build_labelled_datasets(root=None, img_size=64, fraction=1.0, seed=0, train_augment=True, *,
                            val_fraction=0.2, train_scale=(0.2, 1.0), eval_crop_pct=0.875, check_images=True,
                            demo_root=None, auto_augment: str | None = None, re_prob: float = 0.0,
                            label_sampling: str = "per_class"):
    """``(train_ds, val_ds, classes)`` of an ImageFolder-style labelled set; items ``(image, label)``.

    ``root``: None or "demo" (the demo set), a folder with ``train/<class>/`` and ``val/<class>/`` (``val`` may be
    named ``validation``), or a single ``<class>/`` folder split per class, deterministically by
    ``seed``, into ``1 - val_fraction`` / ``val_fraction``. ``fraction`` keeps that fraction of the
    train images of each class (at least one per class; the low-label protocol), chosen by ``seed``; with
    ``label_sampling`` ``balanced`` the same number in every class, with ``uniform`` that fraction of the whole set
    (:func:`mae_fast.data.label_subsets.label_subset`).
    Train items get RandomResizedCrop(train_scale) + flip when ``train_augment`` (then also timm's
    ``auto_augment`` policy and RandomErasing with probability ``re_prob``, as MAE's finetuning), else the eval
    transform (resize to ``size / eval_crop_pct``, centre crop).
    """
    size = as_size(img_size)
    if not 0 < float(fraction) <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if root is None or (isinstance(root, str) and root.strip().lower() in ("", "demo")):
        root = ensure_demo_data(demo_root).labelled
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"labelled data folder {root} does not exist")
    val_dir = next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)
    if (root / "train").is_dir():
        if val_dir is None:
            raise FileNotFoundError(f"{root} has train/ but no val/ folder")
        files, labels, classes, bad_train = scan_image_folder(root / "train", check=check_images)
        val_files, val_labels, _, bad_val = scan_image_folder(val_dir, classes=classes, check=check_images)
        layout = "train/val"
    else:
        all_files, all_labels, classes, bad_train = scan_image_folder(root, check=check_images)
        (files, labels), (val_files, val_labels) = split_per_class(all_files, all_labels, classes, val_fraction, seed)
        bad_val, layout = [], f"single folder split val_fraction={val_fraction}"
    if not files:
        raise DataError(f"no readable training images under {root}")
    if not val_files:  # evaluating on nothing would divide by zero after the first epoch of training
        if val_dir is not None and (root / "train").is_dir():
            raise FileNotFoundError(f"no readable validation images under {val_dir} (expected "
                                    f"{val_dir}/<class>/<image> for the classes of {root / 'train'}: "
                                    f"{', '.join(classes)})")
        raise FileNotFoundError(f"no validation images can be held out of {root}: every class has fewer than 2 "
                                f"images (give classes 2 or more, or use {root}/train/ and {root}/val/ folders)")
    n_before = len(files)
    files, labels = label_subset(files, labels, classes, float(fraction), seed, label_sampling)
    per_class = {c: 0 for c in classes}
    for y in labels:
        per_class[classes[y]] += 1
    record = {"kind": "labelled", "root": str(root), "layout": layout, "classes": classes,
              "fraction": float(fraction), "label_sampling": label_sampling, "seed": int(seed),
              "n_train_available": n_before,
              "n_train": len(files), "n_val": len(val_files), "train_per_class": per_class,
              "train_files": [str(Path(f).relative_to(root)) for f in files],
              "skipped": [[p, r] for p, r in bad_train + bad_val]}
    train_tf = (TrainTransform(size, scale=train_scale, auto_augment=auto_augment, re_prob=re_prob) if train_augment
                else EvalTransform(size, crop_pct=eval_crop_pct))
    train_ds = ImageFileDataset(files, labels, train_tf, skipped=bad_train, record=record, classes=classes)
    val_ds = ImageFileDataset(val_files, val_labels, EvalTransform(size, crop_pct=eval_crop_pct), skipped=bad_val,
                              record=dict(record, split="val"), classes=classes)
    return train_ds, val_ds, classes
