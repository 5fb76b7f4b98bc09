"""What the training tests share (imported as ``helpers.train``; pyproject puts tests/ on pytest's path): the
tiny MAE and its synthetic-data config, readers of a run's files, MAE's learning-rate formulas, a labelled
stand-in dataset and a virtual clock. The fixtures built on them are in tests/train/conftest.py."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

import mae_fast

from . import images

# FSDP2's peak at the tests' small sizes: above one unsharded device with torch 2.11 (so was its own FSDPMemTracker,
# which test_memory's estimate matches exactly), below it with torch 2.14. Tests assert the saving only there.
FSDP2_PEAKS_BELOW_UNSHARDED = torch.__version__ >= (2, 14)  # TorchVersion compares with tuples

TINY_MODEL = dict(embed_dim=48, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def tiny(tmp_path, **kw) -> dict:
    """A small, fast pretraining config on the synthetic source: 8 steps of 8 images at 32 px, no reconstruction
    picture, and a given MFU peak (measuring the CPU's takes longer than these runs' steps)."""
    cfg = dict(recipe="demo", name="t", output_dir=str(tmp_path), data_source="synthetic", synthetic_size=48,
               img_size=32, model_kwargs=dict(TINY_MODEL), batch_size=8, steps=8, warmup_steps=2,
               lr=2e-3, checkpoint_every=3, log_every=1, vis_every=0, vis_images=0, progress=False, peak_flops=1e12)
    cfg.update(kw)
    return cfg


def rows_of(res) -> list[dict]:
    """A run's metrics.jsonl rows."""
    return [json.loads(line) for line in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def params(path) -> dict:
    return ckpt(path)["model"]


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def assert_same_optimizer(a: dict, b: dict):
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, va in a["state"][k].items():
            vb = b["state"][k][name]
            assert torch.equal(torch.as_tensor(va), torch.as_tensor(vb)), f"optimizer {k}.{name} differs"


def mae_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """MAE's util/lr_sched.adjust_learning_rate at a fractional epoch (called with step / steps_per_epoch)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def expected_lr(step, peak, total, warmup, schedule, min_lr):
    """MAE's schedule (util/lr_sched.py), per step: linear warmup from 0, then a half-cosine to min_lr."""
    if step < warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def mae_param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float) -> dict:
    """MAE's util/lr_decay.py (param_groups_lrd + get_layer_id_for_vit), per parameter name: (lr_scale, wd).
    The encoder's names are MAE's model's with an ``encoder.`` prefix; the head (and fc_norm) are top-level there."""
    no_weight_decay_list = {"pos_embed", "cls_token", "dist_token"}  # timm / MAE VisionTransformer.no_weight_decay()
    num_layers = len(model.encoder.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mae_name = n[len("encoder."):] if n.startswith("encoder.") else n
        this_decay = 0.0 if (p.ndim == 1 or mae_name in no_weight_decay_list) else weight_decay
        if mae_name in ("cls_token", "pos_embed") or mae_name.startswith("patch_embed"):
            layer_id = 0
        elif mae_name.startswith("blocks"):
            layer_id = int(mae_name.split(".")[1]) + 1
        else:
            layer_id = num_layers
        out[n] = (layer_scales[layer_id], this_decay)
    return out


def write_pngs(folder: Path, n: int, size=(20, 24)) -> list[Path]:
    return images.write_pngs(folder, n, size, seed=len(str(folder)), name="{i}.png")


def counted_train_flops_per_image(model_kwargs: dict, img_size: int, mask_ratio: float) -> float:
    """3 x the forward matmul FLOPs per image that torch's FlopCounterMode counts on a real forward of the model
    (torch backend: plain matmuls): the model-FLOPs convention of MFU (backward = 2 x forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    old = os.environ.get("MAE_FAST_BACKEND")
    os.environ["MAE_FAST_BACKEND"] = "torch"
    try:
        m = mae_fast.create_model("mae_vit_demo_patch8", img_size=img_size, **model_kwargs)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(torch.randn(2, 3, img_size, img_size), mask_ratio)
    finally:
        if old is None:
            os.environ.pop("MAE_FAST_BACKEND")
        else:
            os.environ["MAE_FAST_BACKEND"] = old
    return 3 * fc.get_total_flops() / 2


class Shapes(torch.utils.data.Dataset):
    """Labelled stand-in: class c is a bright square in quadrant c, on noise."""

    def __init__(self, n, size=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g) * 0.3
        self.y = torch.arange(n) % 4
        h = size // 2
        for i in range(n):
            r, c = divmod(int(self.y[i]), 2)
            self.x[i, :, r * h:(r + 1) * h, c * h:(c + 1) * h] += 1.5

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


# finetuning runs on Shapes with a small encoder (the demo model made narrow and shallow: fast on the CPU)
FT_BASE = dict(mode="finetune", epochs=3, batch_size=8, warmup_epochs=1, lr=3e-3, drop_path=0.1, progress=False,
               pool="mean", checkpoint=None, img_size=32, model_kwargs=dict(embed_dim=32, depth=2, num_heads=2))


class VirtualClock:
    """Stands in for the time module inside the trainer: perf_counter only moves when something sleeps (the step's
    debug sleep, the data loader, a checkpoint write), so every window's length is known exactly."""

    def __init__(self):
        import time

        self._time, self.now = time, 1000.0

    def __getattr__(self, name):
        return getattr(self._time, name)

    def perf_counter(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


STEP_S, ITEM_S, FIRST_ITEM_S, CKPT_S = 0.25, 0.01, 0.4, 1.0


def clocked(tmp_path, **kw):
    # peak_flops given: the CPU peak is otherwise measured with perf_counter
    return tiny(tmp_path, **{**dict(steps=6, log_every=2, checkpoint_every=3, debug_step_sleep_s=STEP_S,
                                    peak_flops=1e9), **kw})
