"""Evaluating a pretrained encoder: ``mae-fast finetune`` and ``mae-fast linprobe``.

* finetune: the whole encoder plus a linear head, AdamW with layer-wise lr decay, warmup + cosine,
  label smoothing, stochastic depth (the low-label protocol: ``fraction=0.02 epochs=50``).
* linprobe: the encoder frozen; BatchNorm without affine parameters + a linear head on the cls token
  or the mean-pooled patch tokens, trained with momentum SGD, or with LARS as MAE's linear probe
  (``linprobe_optimizer=lars``, meant for MAE's batch of 16384).

Encoder weights come from a mae_fast run directory or checkpoint, an official MAE ``.pth``
(``{"model": state}``) or a timm export, through ``mae_fast.load_pretrained(encoder_only=True)``;
the classifier is timm's ``VisionTransformer`` (``mae_fast.create_timm_encoder``) plus a head.
Reports the best top-1 and top-5 over epochs and writes them to ``<output_dir>/<name>/results.json``, next to
``config.yaml`` (every setting) and ``data_record.json`` (which labelled images were used).
Ctrl-C or SIGTERM stops training at the end of the step under way, with a checkpoint of that step that
``resume=auto`` continues from (``TrainingInterrupted``, exit code 130 / 143), as in pretraining.

Under ``torchrun`` (or a SLURM job of several tasks) the ranks share each global batch (DDP, gradients
averaged as one batch of ``batch_size``), the linear probe's BatchNorm takes its statistics over every
rank's rows, and the validation set is split across ranks: the same numbers as one process, N times the
throughput. Rank 0 prints and writes the results.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from mae_fast.data.base import DataError
from mae_fast.models.checkpoint import CheckpointError
from mae_fast.train import checkpoint_io, config as config_mod, curves
from mae_fast.train import distributed as dist_mod
from mae_fast.train.pretrain import (NO_DECAY_NAMES, SeededItems, TrainingInterrupted, _check_choices, _mix,
                                     autocast_dtype, rng_state, set_rng_state, stop_requests)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class FeatureBatchNorm(nn.BatchNorm1d):
    """The linear probe's affine-free BatchNorm, its batch statistics taken over every rank's rows (the
    global batch), as one process would. The features come from the frozen encoder without gradient, so the
    statistics are constants: two all-reduces (mean, then centred squares), no backward through them.
    (``nn.SyncBatchNorm`` does the same only on GPUs.) One process: plain BatchNorm1d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _world() > 1):
            return super().forward(x)
        if x.requires_grad:
            raise RuntimeError("FeatureBatchNorm syncs statistics of features without gradient only")
        count = torch.tensor([float(x.shape[0])], device=x.device)
        total = torch.cat([x.sum(0), count])
        dist.all_reduce(total)
        n = total[-1]
        mean = total[:-1] / n
        sq = ((x - mean) ** 2).sum(0)
        dist.all_reduce(sq)
        var = sq / n
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))  # unbiased, as BatchNorm1d keeps it
            self.num_batches_tracked.add_(1)
        return (x - mean) * torch.rsqrt(var + self.eps)


POOLS = ("cls", "mean", "mean_fc_norm")


def _check_pool(pool: str, linprobe: bool) -> None:
    if pool not in POOLS:
        raise config_mod.ConfigError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if pool == "mean_fc_norm" and linprobe:
        raise config_mod.ConfigError("pool=mean_fc_norm trains a new LayerNorm, which a linear probe does not: "
                                     "use cls or mean")


class Classifier(nn.Module):
    """timm ViT encoder -> pooled feature -> [BatchNorm (linprobe)] -> linear head. ``pool``: the final-normed cls
    token, the mean of the final-normed patch tokens, or ``mean_fc_norm``, MAE's finetuning ``global_pool``: the
    mean of the patch tokens before the final norm, through a new LayerNorm (``fc_norm``, timm's name) in its
    place."""

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "cls", linprobe: bool = False):
        super().__init__()
        _check_pool(pool, linprobe)
        self.encoder, self.pool, self.linprobe = encoder, pool, linprobe
        dim = encoder.embed_dim
        if pool == "mean_fc_norm":
            encoder.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.bn = FeatureBatchNorm(dim, affine=False, eps=1e-6) if linprobe else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01 if linprobe else 2e-5)
        nn.init.zeros_(self.head.bias)
        if linprobe:
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(x)
        if self.pool == "cls":
            return tokens[:, 0]
        pooled = tokens[:, getattr(self.encoder, "num_prefix_tokens", 1):].mean(dim=1)
        return self.fc_norm(pooled) if self.pool == "mean_fc_norm" else pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linprobe:
            with torch.no_grad():
                f = self.features(x)
            return self.head(self.bn(f.float()))
        return self.head(self.features(x))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.linprobe:
            self.encoder.eval()  # frozen: no stochastic depth, no statistics updates
        return self


def layer_decay_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """Param groups with ``lr_scale = layer_decay ** (depth + 1 - layer)`` (embeddings layer 0, block i
    layer i + 1, norm and head last); no weight decay on 1-D params, tokens and position embeddings."""
    depth = len(model.encoder.blocks)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        sub = name[len("encoder."):] if name.startswith("encoder.") else None
        if sub is None:
            layer = depth + 1
        elif sub.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token")):
            layer = 0
        elif sub.startswith("blocks."):
            layer = int(sub.split(".")[1]) + 1
        else:
            layer = depth + 1
        no_wd = p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES
        key = (layer, no_wd)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                           "lr_scale": layer_decay ** (depth + 1 - layer)}
        groups[key]["params"].append(p)
    return list(groups.values())


def resolve_checkpoint(cfg: dict):
    """A checkpoint file from ``cfg['checkpoint']`` (file, or run dir -> its newest valid checkpoint);
    with null the newest checkpoint of ``<output_dir>/demo``, else None (random init, with a warning)."""
    ref = cfg["checkpoint"]
    if ref is None:
        found = checkpoint_io.latest_valid_checkpoint(Path(cfg["output_dir"]) / "demo")
        if found is None:
            warnings.warn("no checkpoint given and none in runs/demo: the encoder starts from random "
                          "weights", RuntimeWarning, stacklevel=2)
            return None
        return found[0]
    path = Path(ref)
    if path.is_dir():
        found = checkpoint_io.latest_valid_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no valid checkpoint in run directory {path}")
        return found[0]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def _peek_pretrain_config(path) -> dict | None:
    """The pretraining config stored in a mae_fast checkpoint, if it is one."""
    if path is None or str(path).endswith(".safetensors"):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        return None
    cfg = state.get("config") if isinstance(state, dict) else None
    return cfg if isinstance(cfg, dict) and "model" in cfg else None


def encoder_spec(cfg: dict) -> tuple:
    """(checkpoint path or None, model name, create_model kwargs) for the configured encoder."""
    ckpt = resolve_checkpoint(cfg)
    model_name, kw = cfg["model"], dict(cfg["model_kwargs"] or {})
    pre = _peek_pretrain_config(ckpt)
    if pre is not None and model_name == config_mod.FINETUNE_KEYS["model"][0] and not kw:
        # a mae_fast checkpoint: build what it was trained as unless told otherwise
        model_name, kw = pre["model"], dict(pre.get("model_kwargs") or {})
        if cfg["img_size"] is None and pre.get("img_size") is not None:
            kw["img_size"] = pre["img_size"]
    if cfg["img_size"] is not None:
        kw["img_size"] = cfg["img_size"]
    return ckpt, model_name, kw


def build_classifier(cfg: dict, num_classes: int, linprobe: bool, spec: tuple | None = None):
    from mae_fast import create_model, load_pretrained
    from mae_fast.models import create_timm_encoder, export_timm, timm_model_kwargs

    ckpt, model_name, kw = spec or encoder_spec(cfg)
    try:
        mae = create_model(model_name, **kw)
    except (ValueError, TypeError) as e:  # unknown model, img_size not a multiple of the patch, bad model_kwargs
        raise config_mod.ConfigError(f"model {model_name!r}: {e}") from e
    if ckpt is not None:
        load_pretrained(mae, ckpt, encoder_only=True)
    if linprobe or not cfg["drop_path"]:
        encoder = create_timm_encoder(mae)
    else:
        from timm.models.vision_transformer import VisionTransformer

        encoder = VisionTransformer(**timm_model_kwargs(mae), drop_path_rate=cfg["drop_path"])
        encoder.load_state_dict(export_timm(mae), strict=True)
    return Classifier(encoder, num_classes, cfg["pool"], linprobe), mae.img_size, ckpt, model_name


# the settings that decide a run's numbers: a checkpoint made under other ones is not resumed
RUN_IDENTITY = ("mode", "model", "model_kwargs", "img_size", "data_root", "fraction", "epochs", "batch_size", "base_lr",
                "lr", "min_lr", "warmup_epochs", "weight_decay", "linprobe_optimizer", "layer_decay", "drop_path",
                "label_smoothing", "pool", "precision", "seed")


# keys added later, in the identity only away from their defaults, so that older checkpoints still resume;
# accum_steps is not there: a run may resume with more micro-steps to fit a smaller GPU (the same gradient)
LATER_IDENTITY = {"auto_augment": None, "reprob": 0.0, "mixup": 0.0, "cutmix": 0.0}


def run_identity(cfg: dict, encoder_checkpoint) -> dict:
    return {**{k: cfg[k] for k in RUN_IDENTITY}, **{k: cfg[k] for k, d in LATER_IDENTITY.items() if cfg[k] != d},
            "encoder": str(encoder_checkpoint) if encoder_checkpoint else None}


class BatchMixer:
    """timm's Mixup / CutMix (MAE's finetuning: ``mixup=0.8 cutmix=1.0``, one of the two per batch at random) with
    soft, label-smoothed targets. Its draws come from (seed, step), not from the global numpy generator, so a
    resumed run mixes as the uninterrupted one did and every rank draws the same. timm pairs image i with image
    n-1-i and needs n even: in an odd batch the last image stays unmixed (its target only smoothed). Under
    torchrun each rank pairs within its own share of the batch."""

    def __init__(self, mixup: float, cutmix: float, label_smoothing: float, num_classes: int, seed: int):
        from timm.data import Mixup

        self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                         num_classes=num_classes)
        self.smoothing, self.num_classes, self.seed = label_smoothing, num_classes, seed

    def __call__(self, imgs: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.data.mixup import mixup_target

        even = len(imgs) - len(imgs) % 2
        state = np.random.get_state()
        np.random.seed(_mix(self.seed, 2654435761, step) % 2**32)
        try:
            _, soft = self.mix(imgs[:even], labels[:even])  # mixes in place, through the view
        finally:
            np.random.set_state(state)
        if even < len(imgs):
            soft = torch.cat([soft, mixup_target(labels[even:], self.num_classes, 1.0, self.smoothing)])
        return imgs, soft


def _check_augment(cfg: dict) -> None:
    if not 0.0 <= cfg["reprob"] <= 1.0 or cfg["mixup"] < 0 or cfg["cutmix"] < 0:
        raise config_mod.ConfigError(f"reprob must be in [0, 1] and mixup, cutmix >= 0; got reprob={cfg['reprob']}, "
                                     f"mixup={cfg['mixup']}, cutmix={cfg['cutmix']}")
    if cfg["auto_augment"]:
        from mae_fast.data.transforms import auto_augment_transform

        try:
            auto_augment_transform(cfg["auto_augment"], 224)
        except ValueError as e:
            raise config_mod.ConfigError(str(e)) from None


def _resume_state(cfg: dict, run_dir: Path, identity: dict) -> dict | None:
    """The newest checkpoint of an interrupted run with the same settings, else None (a checkpoint of
    other settings is named in a warning and will be replaced)."""
    if cfg["resume"] not in ("auto", None):
        raise config_mod.ConfigError(f"resume must be auto or null, got {cfg['resume']!r}")
    found = checkpoint_io.latest_valid_checkpoint(run_dir) if cfg["resume"] == "auto" else None
    if found is None:
        return None
    path, state = found
    if state.get("identity") != identity:
        old = state.get("identity") or {}
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        warnings.warn(f"{path} was made with other settings ({', '.join(diff)}): starting over", RuntimeWarning,
                      stacklevel=3)
        return None
    return state


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int, world: int = 1,
                   rank: int = 0) -> list[list[tuple[int, int]]]:
    """Shuffled (epoch, index) batches covering every item, the same global batches on every rank, each
    rank taking every ``world``-th item of each. A last batch too small to give every rank one item
    (and BatchNorm two in all) joins the previous one."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, 31, epoch))).tolist()
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < max(2, world):
        batches[-2].extend(batches.pop())
    return [[(epoch, j) for j in b[rank::world]] for b in batches]


def _collate(batch):
    imgs = torch.stack([b[0] for b in batch])
    labels = torch.as_tensor([int(b[1]) for b in batch], dtype=torch.long)
    return imgs, labels


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp_dtype, num_classes: int) -> tuple[float, float, float]:
    """(top-1 %, top-5 %, mean loss) over the loader (over every rank's loader when distributed)."""
    model.eval()
    k = min(5, num_classes)
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for imgs, labels in loader:
        imgs, labels = imgs.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            logits = model(imgs)
        logits = logits.float()
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(k, dim=1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(dim=1).sum())
        total += labels.numel()
    if _world() > 1:
        sums = torch.tensor([correct1, correct5, total, loss_sum], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        correct1, correct5, total, loss_sum = sums.tolist()
    return 100.0 * correct1 / total, 100.0 * correct5 / total, loss_sum / total


def fit_memory_budget(cfg: dict, spec: tuple, num_classes: int, linprobe: bool, batch: int, device,
                      amp_dtype) -> dict | None:
    """Estimate a finetuning step's peak (``mae_fast.memory``: fake tensors, random weights of the same shape)
    and say whether it fits ``memory_budget_gib``; when it does not, checkpointing every encoder block is the
    plan (timm's gradient checkpointing: same numbers, about a third more encoder FLOPs)."""
    from mae_fast.memory import GiB, estimate_train_step

    budget = cfg["memory_budget_gib"]
    if budget is None or (budget == "auto" and device.type != "cuda"):
        return None
    limit = int(0.9 * torch.cuda.get_device_properties(device).total_memory if budget == "auto" else budget * GiB)
    size = None

    def build(checkpointing):
        nonlocal size
        # the model is built on the meta device, where timm's drop-path rates (a tensor turned into floats)
        # cannot be read: that one helper runs on the CPU
        import timm.models.vision_transformer as vit

        rates = vit.calculate_drop_path_rates

        def real_rates(*args, **kwargs):
            with torch.device("cpu"):
                return rates(*args, **kwargs)

        with mock.patch.object(vit, "calculate_drop_path_rates", real_rates):
            model, size, _, _ = build_classifier(cfg, num_classes, linprobe, (None, *spec[1:]))
        model.encoder.set_grad_checkpointing(checkpointing)
        return model

    def peak(checkpointing):
        trainable = (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)) if linprobe else None
        return estimate_train_step(
            lambda: build(checkpointing), lambda: (torch.randn(batch, 3, *size), torch.randint(num_classes, (batch,))),
            lambda m, x, y: nn.functional.cross_entropy(m(x).float(), y), amp_dtype=amp_dtype,
            make_optimizer=trainable).peak

    try:
        configured = peak(bool(cfg["grad_checkpointing"]))
        if configured <= limit or cfg["grad_checkpointing"] or linprobe:
            plan, est = bool(cfg["grad_checkpointing"]), configured
        else:
            plan, est = True, peak(True)
    except Exception as e:  # noqa: BLE001 - a planning aid must not stop a run it cannot model
        print(f"memory: could not estimate the step ({type(e).__name__}: {e}); memory_budget_gib not checked")
        return None
    if est > limit:
        raise config_mod.ConfigError(f"a batch of {batch} needs about {est / GiB:.1f} GiB even with gradient "
                                     f"checkpointing, over the {limit / GiB:.1f} GiB budget: raise accum_steps (the "
                                     f"same step in smaller micro-batches) or lower batch_size")
    changed = plan != bool(cfg["grad_checkpointing"])
    print(f"memory: estimated peak {configured / GiB:.1f} GiB" + (
        f" is over the {limit / GiB:.1f} GiB budget; checkpointing every encoder block (estimated {est / GiB:.1f} GiB)"
        if changed else f", within the {limit / GiB:.1f} GiB budget"), flush=True)
    return dict(budget_gib=round(limit / GiB, 3), estimated_peak_gib=round(est / GiB, 3), estimated_peak_bytes=est,
                grad_checkpointing=plan, changed=changed)


def finetune(config: dict | None = None, *, datasets=None) -> dict:
    """Finetune or linearly probe an encoder (``config['mode']``). Returns top1, top5 (best over
    epochs, %), best_epoch, top5_at_best, history, results (path), checkpoint (the encoder source).
    ``datasets`` = (train_ds, val_ds, classes) replaces the configured labelled data."""
    cfg = config_mod.build_config(config, config_mod.FINETUNE_KEYS, default_recipe=None)
    _check_choices(cfg, keys=("device",))
    with dist_mod.process_group(cfg["device"]) as info:
        return _finetune(cfg, info, datasets)


def _finetune(cfg: dict, info: dist_mod.DistInfo, datasets) -> dict:
    mode = cfg["mode"]
    if mode not in ("finetune", "linprobe"):
        raise config_mod.ConfigError(f"mode must be finetune or linprobe, got {mode!r}")
    linprobe = mode == "linprobe"
    if not 0.0 < cfg["fraction"] <= 1.0:
        raise config_mod.ConfigError(f"fraction must be in (0, 1], got {cfg['fraction']}")
    if cfg["epochs"] < 1 or cfg["batch_size"] < 2 or cfg["checkpoint_every"] < 0 or cfg["accum_steps"] < 1:
        raise config_mod.ConfigError("epochs must be >= 1, batch_size >= 2, checkpoint_every >= 0 and accum_steps >= 1")
    world, rank, device = info.world_size, info.rank, info.device
    A = cfg["accum_steps"]
    if cfg["batch_size"] % (world * A):
        raise config_mod.ConfigError(f"batch_size {cfg['batch_size']} must be a multiple of the {world} processes x "
                                     f"{A} accumulation steps")
    mixing = cfg["mixup"] > 0 or cfg["cutmix"] > 0
    if cfg["batch_size"] // (world * A) < 2 and (mixing or (linprobe and world == 1)):
        raise config_mod.ConfigError(
            f"micro-batches of {cfg['batch_size'] // (world * A)} image: "
            + ("mixup / cutmix pair the images of a micro-batch" if mixing else "the linear probe's BatchNorm takes "
               "its statistics over a micro-batch") + "; batch_size / (processes x accum_steps) must be >= 2")
    _check_augment(cfg)
    _check_pool(cfg["pool"], linprobe)  # before the data is scanned (e.g. linprobe --config mae_official_finetune)
    amp_dtype = autocast_dtype(cfg["precision"], device)
    torch.manual_seed(cfg["seed"])

    # the encoder's image size decides the data's
    spec = encoder_spec(cfg)
    if datasets is None:
        from mae_fast.data import build_labelled_datasets
        from mae_fast.models import model_config

        try:
            size = model_config(spec[1], **spec[2]).get("img_size", 224)
        except (ValueError, TypeError) as e:
            raise config_mod.ConfigError(f"model {spec[1]!r}: {e}") from e
        train_ds, val_ds, classes = build_labelled_datasets(root=cfg["data_root"], img_size=size,
                                                            fraction=cfg["fraction"], seed=cfg["seed"],
                                                            auto_augment=cfg["auto_augment"], re_prob=cfg["reprob"])
    else:
        train_ds, val_ds, classes = datasets
        if cfg["auto_augment"] or cfg["reprob"]:
            warnings.warn("auto_augment and reprob act on the configured labelled data; the datasets given keep "
                          "their own transforms", RuntimeWarning, stacklevel=3)
    num_classes = len(classes)
    if not isinstance(cfg["grad_checkpointing"], bool):
        raise config_mod.ConfigError("finetuning checkpoints every encoder block or none: grad_checkpointing must "
                                     "be true or false")
    memory_plan = fit_memory_budget(cfg, spec, num_classes, linprobe, cfg["batch_size"] // (world * A), device,
                                    amp_dtype)
    model, img_size, ckpt, model_name = build_classifier(cfg, num_classes, linprobe, spec)
    model.encoder.set_grad_checkpointing(memory_plan["grad_checkpointing"] if memory_plan else
                                         cfg["grad_checkpointing"])
    model.to(device)
    # DDP averages the ranks' gradients; each rank's loss is its share of the global batch's sum (below)
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    B = cfg["batch_size"]
    base_lr = cfg["base_lr"] if cfg["base_lr"] is not None else (0.1 if linprobe else 1e-3)
    peak_lr = cfg["lr"] if cfg["lr"] is not None else base_lr * B / 256
    wd = cfg["weight_decay"] if cfg["weight_decay"] is not None else (0.0 if linprobe else 0.05)
    if linprobe:
        head = list(model.head.parameters())
        if cfg["linprobe_optimizer"] == "lars":  # MAE's linear probe protocol (LARS itself skips 1-D parameters)
            from mae_fast.optim import LARS

            optimizer = LARS([{"params": head, "weight_decay": wd, "lr_scale": 1.0}], lr=peak_lr, weight_decay=wd,
                             momentum=0.9)
        elif cfg["linprobe_optimizer"] == "sgd":  # decay the weight only, as LARS and the finetuning groups do
            groups = [{"params": ps, "weight_decay": d, "lr_scale": 1.0} for ps, d in
                      (([p for p in head if p.ndim > 1], wd), ([p for p in head if p.ndim <= 1], 0.0)) if ps]
            optimizer = torch.optim.SGD(groups, lr=peak_lr, momentum=0.9)
        else:
            raise config_mod.ConfigError(f"linprobe_optimizer must be lars or sgd, got {cfg['linprobe_optimizer']!r}")
        criterion = nn.CrossEntropyLoss(reduction="sum")
    else:
        groups = layer_decay_groups(model, wd, cfg["layer_decay"])
        kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
        optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.999), **kw)
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"], reduction="sum")
    mixer = None
    if mixing:  # soft targets, smoothed by the mixer: plain cross-entropy on them
        mixer = BatchMixer(cfg["mixup"], cfg["cutmix"], 0.0 if linprobe else cfg["label_smoothing"], num_classes,
                           cfg["seed"])
        criterion = nn.CrossEntropyLoss(reduction="sum")

    n_train = len(train_ds)
    if n_train < 2:
        raise config_mod.ConfigError(f"only {n_train} training image(s) after fraction={cfg['fraction']}")
    if n_train < world:
        raise config_mod.ConfigError(f"{n_train} training images cannot be shared by {world} processes")
    if len(val_ds) == 0:  # evaluating on nothing divided by zero after the first epoch of training
        raise config_mod.ConfigError("no validation images: top-1 cannot be measured")
    steps_per_epoch = len(_epoch_batches(n_train, B, cfg["seed"], 0, world, rank))
    total = cfg["epochs"] * steps_per_epoch
    warmup = float(cfg["warmup_epochs"]) * steps_per_epoch  # not rounded: MAE warms up by fractional epoch

    def lr_at(step):
        if step < warmup:
            return peak_lr * step / warmup
        t = (step - warmup) / max(1, total - warmup)
        return cfg["min_lr"] + (peak_lr - cfg["min_lr"]) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    items = SeededItems(train_ds, cfg["seed"])
    val_share = val_ds if world == 1 else torch.utils.data.Subset(val_ds, range(rank, len(val_ds), world))
    val_loader = torch.utils.data.DataLoader(val_share, batch_size=max(B // world, 64), shuffle=False,
                                             num_workers=cfg["num_workers"], collate_fn=_collate)
    name = cfg["name"] or mode
    run_dir = Path(cfg["output_dir"]) / name
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # what the numbers came from: every setting, and which labelled images (the low-label subset) were used
        (run_dir / "config.yaml").write_text(config_mod.dump(cfg))
        record = getattr(train_ds, "record", None)
        if record is not None:
            checkpoint_io.atomic_write_bytes(run_dir / "data_record.json",
                                             json.dumps(record, indent=1, default=str).encode())
        ranks = f" ({B // world} x {world} ranks)" if world > 1 else ""
        ranks += f" in {A} micro-batches" if A > 1 else ""
        print(f"{mode}: {model_name} encoder from {ckpt or 'random init'}; {n_train} train / {len(val_ds)} val "
              f"images, {num_classes} classes; {cfg['epochs']} epochs x {steps_per_epoch} steps of {B}{ranks}, "
              f"lr {peak_lr:.3g}, device {device}; results -> {run_dir}", flush=True)

    bar = None
    if cfg["progress"] and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=mode, unit="step", dynamic_ncols=True, file=sys.stdout)
    history, best = [], {"top1": -1.0}
    step, start_epoch, wall_before = 0, 0, 0.0
    done_in_epoch, epoch_losses, rng_in_epoch = 0, [], None  # where a run stopped within an epoch resumes
    identity = run_identity(cfg, ckpt)
    state = _resume_state(cfg, run_dir, identity)
    if state is not None:  # an interrupted run of the same settings: continue where it was saved
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, step, wall_before = state["history"], state["best"], state["step"], state["wall_time_s"]
        rngs = state["rng"]
        rng = rngs[rank] if len(rngs) == world else rngs[0]
        if "batches_done" in state:  # stopped by a signal within epoch state["epoch"]
            start_epoch, done_in_epoch, epoch_losses = state["epoch"], state["batches_done"], state["epoch_losses"]
            rng_in_epoch = rng  # set once the epoch's loader has drawn its seed, as it had before the stop
            where = f"in epoch {start_epoch} after {done_in_epoch} of its {steps_per_epoch} steps"
        else:
            start_epoch = state["epoch"] + 1
            set_rng_state(rng)
            where = f"after epoch {state['epoch']}"
        if info.is_main:
            print(f"{mode}: resumed {where} (best top-1 so far {best['top1']:.2f}%)", flush=True)
    elif info.is_main:
        checkpoint_io.remove_checkpoints(run_dir)  # another run's, or resume=null
    if bar is not None:
        bar.update(step)

    def show_progress(epoch: int, losses: list, refresh: bool = False) -> None:
        post = {"epoch": f"{epoch + 1}/{cfg['epochs']}", "loss": f"{sum(losses) / max(1, len(losses)):.3f}"}
        if history:
            post.update(top1=f"{history[-1]['top1']:.1f}", best=f"{best['top1']:.1f}")
        bar.set_postfix(post, refresh=refresh)

    def save_state(epoch: int, losses: list | None = None):
        """Checkpoint after ``epoch``, or within it after ``len(losses)`` of its batches (a stop on a signal)."""
        rngs = dist_mod.all_gather_objects(rng_state())
        path = None
        if info.is_main:
            state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                     "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "history": history,
                     "best": best, "rng": rngs, "identity": identity,
                     "wall_time_s": wall_before + time.perf_counter() - t0}
            if losses is not None:
                state.update(batches_done=len(losses), epoch_losses=list(losses))
            path = checkpoint_io.save_checkpoint(state, run_dir, step, keep=1)  # numbered by step: mid-epoch too
        dist_mod.barrier()
        return path

    t0 = time.perf_counter()
    handlers = contextlib.ExitStack()
    signals = handlers.enter_context(stop_requests(f"mae-fast {mode}"))
    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            model.train()
            skip = done_in_epoch if epoch == start_epoch else 0
            batches = _epoch_batches(n_train, B, cfg["seed"], epoch, world, rank)[skip:]
            global_sizes = [len(b) for b in _epoch_batches(n_train, B, cfg["seed"], epoch)][skip:]
            loader = iter(torch.utils.data.DataLoader(items, batch_sampler=batches, num_workers=cfg["num_workers"],
                                                      collate_fn=_collate))
            if rng_in_epoch is not None:
                set_rng_state(rng_in_epoch)
                rng_in_epoch = None
            losses = epoch_losses if epoch == start_epoch else []
            lr = lr_at(max(step - 1, 0))  # the last step's, should none of this epoch be left
            stop_signal = None
            for (imgs, labels), global_size in zip(loader, global_sizes):
                lr = lr_at(step)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), device=device)
                # a short last batch takes fewer micro-batches: none empty, and as many rows as the BatchNorm (2 in
                # all) or the mixer (2 a rank) needs, the same number on every rank (the BatchNorm all-reduces)
                k = max(1, min(A, global_size // max(world * (2 if mixer is not None else 1), 2 if linprobe else 1)))
                for a, (x, y) in enumerate(zip(imgs.tensor_split(k), labels.tensor_split(k))):
                    if mixer is not None:
                        x, y = mixer(x, y, step * A + a)
                    sync = a == k - 1  # DDP all-reduces the gradients once, after the last micro-batch
                    with train_model.no_sync() if world > 1 and not sync else nullcontext():
                        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                            logits = train_model(x)
                        # this rank's share of the global batch's mean: summed over the micro-batches and
                        # averaged by DDP over the ranks, the gradient is the whole batch's mean's
                        loss = criterion(logits.float(), y) * (world / global_size)
                        loss.backward()
                    loss_sum += loss.detach()
                # one all-reduce: the mean loss and whether any rank got SIGTERM / SIGINT, so every rank takes
                # the same decisions below
                flags = [float(signal.SIGTERM in signals), float(signal.SIGINT in signals)]
                shared = torch.stack([loss_sum / world, *(loss_sum.new_full((), f) for f in flags)])
                mean_loss, sigterm, sigint = dist_mod.all_reduce_sum(shared).tolist()
                if math.isfinite(mean_loss):
                    optimizer.step()
                losses.append(mean_loss)
                step += 1
                if bar is not None:
                    show_progress(epoch, losses)
                    bar.update(1)
                if sigterm or sigint:
                    stop_signal = signal.SIGTERM if sigterm else signal.SIGINT
                    break
            if stop_signal is not None:
                path = save_state(epoch, losses)
                raise TrainingInterrupted(
                    f"signal {signal.Signals(stop_signal).name} in epoch {epoch} after {len(losses)} of its "
                    f"{steps_per_epoch} steps (step {step}/{total}); checkpoint {path} (resume=auto continues "
                    f"from it)", stop_signal, step, path)
            top1, top5, val_loss = evaluate(model, val_loader, device, amp_dtype, num_classes)
            row = {"epoch": epoch, "train_loss": sum(losses) / len(losses), "val_loss": val_loss,
                   "top1": top1, "top5": top5, "lr": lr}
            history.append(row)
            if top1 > best["top1"]:
                best = {"top1": top1, "top5_at_best": top5, "best_epoch": epoch}
            if bar is not None:
                show_progress(epoch, losses, refresh=True)
            every = cfg["checkpoint_every"]
            if every and (epoch + 1) % every == 0 and epoch + 1 < cfg["epochs"]:
                save_state(epoch)
    finally:
        handlers.close()
        if bar is not None:
            bar.close()

    result = {"mode": mode, "top1": best["top1"], "top5": max(h["top5"] for h in history),
              "top5_at_best": best["top5_at_best"], "best_epoch": best["best_epoch"],
              "final_top1": history[-1]["top1"], "epochs": cfg["epochs"], "fraction": cfg["fraction"],
              "train_images": n_train, "val_images": len(val_ds), "num_classes": num_classes,
              "checkpoint": str(ckpt) if ckpt else None, "model": model_name,
              "wall_time_s": wall_before + time.perf_counter() - t0, "run_dir": str(run_dir),
              "results": str(run_dir / "results.json"), "memory_plan": memory_plan, "history": history}
    result["world_size"] = world
    if info.is_main:
        def draw():
            curves.plot_finetune({name: history}, run_dir / "curves.png")
            return run_dir / "curves.png"

        result["curves"] = curves.draw_or_warn(run_dir, draw)
        checkpoint_io.atomic_write_bytes(run_dir / "results.json", json.dumps(result, indent=1).encode())
        checkpoint_io.remove_checkpoints(run_dir)  # finished: results.json is the record
        print(f"{mode}: best top-1 {result['top1']:.2f}% (epoch {result['best_epoch']}), best top-5 "
              f"{result['top5']:.2f}%; {result['results']}" + (f"; curves {result['curves']}" if result["curves"]
                                                                  else ""), flush=True)
    if signals:  # after the last step's all-reduce: the run is finished and saved, and the signal still stops
        raise TrainingInterrupted(f"finished at step {step}/{total}, then {signal.Signals(signals[0]).name}",
                                  signals[0], step, None)
    return result


def main(argv=None, mode: str | None = None) -> int:
    """``mae-fast finetune`` / ``linprobe`` pass ``mode``; the script (``torchrun train/finetune.py``) takes
    ``mode=linprobe`` from the command line (default: the recipe's, finetune)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"mae-fast {mode}" if mode else "train/finetune.py"
    if any(a in ("-h", "--help") for a in argv):
        print(config_mod.help_text(config_mod.FINETUNE_KEYS, prog))
        return 0
    try:
        cfg = config_mod.config_from_argv(argv, config_mod.FINETUNE_KEYS, None, fixed={"mode": mode} if mode else None)
        finetune(cfg)
    except (config_mod.ConfigError, FileNotFoundError, CheckpointError, DataError) as e:  # the user's input: no traceback
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # exit as the signal would have
        print(f"{prog}: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    return 0


if __name__ == "__main__":
    sys.exit(main())
