"""The settings a finetuning protocol adds to :mod:`mae_fast.training.finetune` beyond MAE's recipe: the head
(``head``, ``head_init_std``), the schedule (``lr_schedule``), weight decay on every parameter (``decay_all``), the
image transforms (``crop_scale``, ``eval_resize_margin``), how the labelled subset is drawn (``label_sampling``) and
which epoch's top-1 a run reports (``report``). The human-like-video protocol sets them all
(``train/recipes/finetune/humanlike_finetune.yaml``; docs/humanlike.md)."""
from __future__ import annotations

import json
import math

from mae_fast.data.label_subsets import LABEL_SAMPLINGS
from mae_fast.training.config import ConfigError, FinetuneConfig

HEADS = ("linear", "bn_linear")
SCHEDULES = ("cosine", "constant")
REPORTS = ("best", "final")


def check_protocol(cfg: FinetuneConfig, world: int = 1) -> None:
    """A ConfigError naming the key for a value the protocol settings do not take."""
    for name, allowed in (("head", HEADS), ("lr_schedule", SCHEDULES), ("label_sampling", LABEL_SAMPLINGS),
                          ("report", REPORTS)):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    scale = cfg.crop_scale
    try:
        lo, hi = (float(v) for v in scale)
        ok = 0 < lo <= hi <= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"crop_scale must be [min, max] with 0 < min <= max <= 1, got {scale!r}")
    if cfg.head_init_std is not None and not (math.isfinite(cfg.head_init_std) and cfg.head_init_std > 0):
        raise ConfigError(f"head_init_std must be a number > 0 (or null), got {cfg.head_init_std!r}")
    if cfg.eval_resize_margin is not None and (isinstance(cfg.eval_resize_margin, bool) or cfg.eval_resize_margin < 0):
        raise ConfigError(f"eval_resize_margin must be a whole number >= 0 (or null), got {cfg.eval_resize_margin!r}")
    rows = cfg.batch_size // (world * cfg.accum_steps)
    if cfg.head == "bn_linear" and cfg.mode == "finetune" and rows < 2:
        raise ConfigError(f"micro-batches of {rows} image: the bn_linear head's BatchNorm takes its statistics over a "
                          "micro-batch; batch_size / (processes x accum_steps) must be >= 2")


def eval_crop_pct(cfg: FinetuneConfig, img_size) -> float:
    """The centre crop's share of the resized validation image: img_size / (img_size + margin), or MAE's 0.875."""
    if cfg.eval_resize_margin is None:
        return 0.875
    side = min(img_size) if isinstance(img_size, (list, tuple)) else int(img_size)
    return side / (side + cfg.eval_resize_margin)


def record_report(cfg: FinetuneConfig, result: dict, history: list, best: dict, results_path, is_main: bool) -> dict:
    """Adds ``reported`` (``cfg.report``) and ``reported_top1`` (the best epoch's or the last epoch's top-1) to a
    finished run's results, and to its results.json on rank 0: the number a sweep's table records."""
    top1 = history[-1]["top1"] if cfg.report == "final" else best["top1"]
    result.update(reported=cfg.report, reported_top1=top1)
    if is_main and results_path.exists():
        from mae_fast.training.checkpoint import atomic_write_bytes

        saved = json.loads(results_path.read_text())
        saved.update(reported=cfg.report, reported_top1=top1)
        atomic_write_bytes(results_path, json.dumps(saved, indent=1).encode())
    return result
