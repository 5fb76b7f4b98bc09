"""Human units and real cost: hours of video <-> frames <-> years of waking experience, and GPU-hours.

Conversions:

* ``frames = hours * 3600 * fps`` (the human-like-video table samples frames at :data:`DEFAULT_FPS` = 1/s);
* ``years = hours / (HOURS_AWAKE_PER_DAY * 365.25)``, with :data:`HOURS_AWAKE_PER_DAY` = 12: an assumption of
  this module (a round figure for a child's waking hours; Orhan 2023 was not found saying which figure it uses).

Cost: pretraining a model of ``params`` parameters at ``img_size`` px on ``hours`` of video processes
``frames(hours, fps) * epochs`` images. Its GPU-hours are that number divided by the images/s measured for the
nearest measured (model, resolution) of :data:`THROUGHPUT_FILE` (a table of H100 end-to-end training steps,
regenerated from ``bench/results`` by ``bench/throughput_table.py``), scaled by the ratio of training FLOPs per
image (:func:`mae_fast.models.flops.mae_train_flops`): unmeasured points are assumed to run at the nearest
measured point's FLOP rate. A configuration whose weights and AdamW state (16 bytes a parameter: bf16-autocast
training keeps fp32 weights, gradients and two moments) exceed one GPU's memory is flagged as needing sharding.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np

__all__ = ["HOURS_AWAKE_PER_DAY", "DEFAULT_FPS", "THROUGHPUT_FILE", "hours_to_frames", "frames_to_hours",
           "hours_to_years", "years_to_hours", "throughput_table", "train_flops_per_image", "gpu_hours"]

HOURS_AWAKE_PER_DAY = 12.0
DAYS_PER_YEAR = 365.25
DEFAULT_FPS = 1.0
THROUGHPUT_FILE = Path(__file__).with_name("throughput.json")
STATE_BYTES_PER_PARAM = 16  # fp32 weights + gradients + AdamW's two moments


def hours_to_frames(hours, fps: float = DEFAULT_FPS):
    return np.asarray(hours, float) * 3600.0 * fps


def frames_to_hours(frames, fps: float = DEFAULT_FPS):
    return np.asarray(frames, float) / (3600.0 * fps)


def hours_to_years(hours, hours_per_day: float = HOURS_AWAKE_PER_DAY):
    """Years of waking experience that ``hours`` of video amount to."""
    return np.asarray(hours, float) / (hours_per_day * DAYS_PER_YEAR)


def years_to_hours(years, hours_per_day: float = HOURS_AWAKE_PER_DAY):
    return np.asarray(years, float) * hours_per_day * DAYS_PER_YEAR


@functools.lru_cache(maxsize=None)
def throughput_table(path: str | None = None) -> dict:
    """The measured throughput table: {"device", "memory_gib", "source", "rows": [{model, img_size, params,
    batch, images_per_s, peak_mem_gib, train_flops_per_image}]}."""
    return json.loads(Path(path or THROUGHPUT_FILE).read_text())


@functools.lru_cache(maxsize=None)
def _registry_flops(model: str, img_size: int) -> tuple[float, float]:
    """(train FLOPs per image, encoder parameters) of a registry MAE at ``img_size`` (built on the meta device)."""
    import torch

    from mae_fast.models import create_model
    from mae_fast.models.flops import mae_train_flops

    with torch.device("meta"):
        m = create_model(model, img_size=int(img_size))
    enc = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("decoder") and n != "mask_token")
    return mae_train_flops(m), float(enc)


def train_flops_per_image(params: float, img_size: float, patch_size: int = 14) -> tuple[float, str]:
    """Training FLOPs per image of an MAE with ``params`` encoder parameters at ``img_size`` px: those of the
    registry model of that patch size nearest in parameters, at the resolution rounded to a patch multiple,
    times ``params`` / its parameters (the encoder's FLOPs grow about linearly in its width^2 x depth)."""
    from mae_fast.models.registry import list_models, model_config

    from .grid import vit_param_count

    r = max(patch_size, int(round(img_size / patch_size)) * patch_size)
    best = None
    for name in list_models(f"mae_vit_*_patch{patch_size}"):
        if "demo" in name:
            continue
        c = model_config(name)
        n = vit_param_count(c["embed_dim"], c["depth"], patch_size, 224, 0, mlp_ratio=c.get("mlp_ratio", 4.0))
        gap = abs(math.log(params / n))
        if best is None or gap < best[0]:
            best = (gap, name)
    if best is None:
        raise ValueError(f"no registry model of patch size {patch_size} to count FLOPs with")
    f, n = _registry_flops(best[1], r)
    # the registry model itself (its count at another resolution differs by its position embedding): no scaling
    return (f if abs(math.log(params / n)) < 0.05 else f * params / n), best[1]


def gpu_hours(params: float, data: float, img_size: float, unit: str = "hours", fps: float = DEFAULT_FPS,
              epochs: float = 1.0, patch_size: int = 14, table: dict | None = None) -> dict:
    """GPU-hours to pretrain on ``data`` (hours of video at ``fps``, or a number of images with
    ``unit="images"``) for ``epochs`` passes, priced from the nearest measured (model, resolution) of the
    throughput table and scaled by FLOPs per image."""
    if unit not in ("hours", "images"):
        raise ValueError(f"unit must be 'hours' or 'images', got {unit!r}")
    table = table or throughput_table()
    rows = table["rows"]
    flops, like = train_flops_per_image(params, img_size, patch_size)
    near = min(rows, key=lambda row: (math.log(row["params"] / params)) ** 2
               + (math.log(row["img_size"] / img_size)) ** 2)
    images_per_s = near["images_per_s"] * near["train_flops_per_image"] / flops
    images = (float(hours_to_frames(data, fps)) if unit == "hours" else float(data)) * epochs
    state_gib = STATE_BYTES_PER_PARAM * params * 1.1 / 2 ** 30  # + the decoder (about 10% of a ViT-L/H's)
    measured = abs(math.log(near["params"] / params)) < 0.05 and abs(math.log(near["img_size"] / img_size)) < 0.02
    return {
        "gpu_hours": images / images_per_s / 3600.0, "images": images, "images_per_s": images_per_s,
        "flops_per_image": flops, "shaped_like": like, "device": table["device"],
        "from": f"{near['model']} {near['img_size']} px" + ("" if measured else " (scaled by FLOPs)"),
        "fits_one_gpu": state_gib < 0.9 * table.get("memory_gib", 80.0), "state_gib": state_gib,
        "fps": fps, "epochs": epochs,
    }
