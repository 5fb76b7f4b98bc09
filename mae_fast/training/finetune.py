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

The run reads top to bottom: :func:`setup` (data, classifier, optimizer: :class:`Run`), :func:`restore`
(:class:`TrainState`), then :func:`train`: for each epoch, :func:`train_epoch` (batch -> forward/backward ->
optimizer), evaluation, and a checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from mae_fast import memory, optim
from mae_fast.data.samplers import SeededItems, collate_labelled, epoch_batches, mix_seed
from mae_fast.training import checkpoint, curves
from mae_fast.training import distributed as dist_mod
from mae_fast.training.checkpoint import rng_state, set_rng_state
from mae_fast.training.config import ConfigError, FinetuneConfig, dump
from mae_fast.training.finetune_protocol import check_protocol, eval_crop_pct, record_report
from mae_fast.training.metrics import progress_bar
from mae_fast.training.pretrain import autocast, autocast_dtype, check_choices
from mae_fast.training.signals import TrainingInterrupted, shared_stop, signal_flags, stop_requests


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ---------------------------------------------------------------------------------------------
# the classifier
# ---------------------------------------------------------------------------------------------
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


def check_pool(pool: str, linprobe: bool) -> None:
    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if pool == "mean_fc_norm" and linprobe:
        raise ConfigError("pool=mean_fc_norm trains a new LayerNorm, which a linear probe does not: use cls or mean")


class Classifier(nn.Module):
    """timm ViT encoder -> pooled feature -> [BatchNorm (linprobe, or head=bn_linear)] -> linear head. ``pool``: the final-normed cls
    token, the mean of the final-normed patch tokens, or ``mean_fc_norm``, MAE's finetuning ``global_pool``: the
    mean of the patch tokens before the final norm, through a new LayerNorm (``fc_norm``, timm's name) in its
    place."""

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "cls", linprobe: bool = False,
                 head: str = "linear", head_init_std: float | None = None):
        super().__init__()
        check_pool(pool, linprobe)
        self.encoder, self.pool, self.linprobe = encoder, pool, linprobe
        dim = encoder.embed_dim
        if pool == "mean_fc_norm":
            encoder.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.bn = FeatureBatchNorm(dim, affine=False, eps=1e-6) if linprobe else nn.Identity()
        if head == "bn_linear" and not linprobe:  # finetuned through: each rank's (micro-)batch statistics
            self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std or (0.01 if linprobe else 2e-5))
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
        return self.head(self.bn(self.features(x)))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.linprobe:
            self.encoder.eval()  # frozen: no stochastic depth, no statistics updates
        return self


def resolve_checkpoint(cfg: FinetuneConfig):
    """A checkpoint file from ``cfg.checkpoint`` (file, or run dir -> its newest valid checkpoint);
    with null the newest checkpoint of ``<output_dir>/demo``, else None (random init, with a warning)."""
    ref = cfg.checkpoint
    if ref is None:
        found = checkpoint.latest_valid_checkpoint(Path(cfg.output_dir) / "demo")
        if found is None:
            warnings.warn("no checkpoint given and none in runs/demo: the encoder starts from random "
                          "weights", RuntimeWarning, stacklevel=2)
            return None
        return found[0]
    path = Path(ref)
    if path.is_dir():
        found = checkpoint.latest_valid_checkpoint(path)
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


def encoder_spec(cfg: FinetuneConfig) -> tuple:
    """(checkpoint path or None, model name, create_model kwargs) for the configured encoder."""
    ckpt = resolve_checkpoint(cfg)
    model_name, kw = cfg.model, dict(cfg.model_kwargs or {})
    pre = _peek_pretrain_config(ckpt)
    if pre is not None and model_name == FinetuneConfig.model and not kw:
        # a mae_fast checkpoint: build what it was trained as unless told otherwise
        model_name, kw = pre["model"], dict(pre.get("model_kwargs") or {})
        if cfg.img_size is None and pre.get("img_size") is not None:
            kw["img_size"] = pre["img_size"]
    if cfg.img_size is not None:
        kw["img_size"] = cfg.img_size
    return ckpt, model_name, kw


def build_classifier(cfg: FinetuneConfig, num_classes: int, linprobe: bool, spec: tuple | None = None):
    from mae_fast import create_model, load_pretrained
    from mae_fast.models import create_timm_encoder, export_timm, timm_model_kwargs

    ckpt, model_name, kw = spec or encoder_spec(cfg)
    try:
        mae = create_model(model_name, **kw)
    except (ValueError, TypeError) as e:  # unknown model, img_size not a multiple of the patch, bad model_kwargs
        raise ConfigError(f"model {model_name!r}: {e}") from e
    if ckpt is not None:
        load_pretrained(mae, ckpt, encoder_only=True)
    if linprobe or not cfg.drop_path:
        encoder = create_timm_encoder(mae)
    else:
        from timm.models.vision_transformer import VisionTransformer

        encoder = VisionTransformer(**timm_model_kwargs(mae), drop_path_rate=cfg.drop_path)
        encoder.load_state_dict(export_timm(mae), strict=True)
        _drop_path_mode(encoder, cfg.drop_path_mode)
    return Classifier(encoder, num_classes, cfg.pool, linprobe, cfg.head, cfg.head_init_std), mae.img_size, ckpt, \
        model_name


# ---------------------------------------------------------------------------------------------
# run identity (what a resume must match), mixing, evaluation
# ---------------------------------------------------------------------------------------------
# the settings that decide a run's numbers: a checkpoint made under other ones is not resumed
RUN_IDENTITY = ("mode", "model", "model_kwargs", "img_size", "data_root", "fraction", "epochs", "batch_size", "base_lr",
                "lr", "min_lr", "warmup_epochs", "weight_decay", "linprobe_optimizer", "layer_decay", "drop_path",
                "label_smoothing", "pool", "precision", "seed")

# keys added later, in the identity only away from their defaults, so that older checkpoints still resume;
# accum_steps is not there: a run may resume with more micro-steps to fit a smaller GPU (the same gradient)
LATER_IDENTITY = {"auto_augment": None, "reprob": 0.0, "mixup": 0.0, "cutmix": 0.0, "head": "linear",
                  "head_init_std": None, "lr_schedule": "cosine", "decay_all": False, "crop_scale": [0.2, 1.0],
                  "eval_resize_margin": None, "label_sampling": "per_class",
                  "drop_path_mode": "efficient"}


def run_identity(cfg: FinetuneConfig, encoder_checkpoint) -> dict:
    return {**{k: getattr(cfg, k) for k in RUN_IDENTITY},
            **{k: getattr(cfg, k) for k, d in LATER_IDENTITY.items() if getattr(cfg, k) != d},
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
        np.random.seed(mix_seed(self.seed, 2654435761, step) % 2**32)
        try:
            _, soft = self.mix(imgs[:even], labels[:even])  # mixes in place, through the view
        finally:
            np.random.set_state(state)
        if even < len(imgs):
            soft = torch.cat([soft, mixup_target(labels[even:], self.num_classes, 1.0, self.smoothing)])
        return imgs, soft


def check_augment(cfg: FinetuneConfig) -> None:
    if not 0.0 <= cfg.reprob <= 1.0 or cfg.mixup < 0 or cfg.cutmix < 0:
        raise ConfigError(f"reprob must be in [0, 1] and mixup, cutmix >= 0; got reprob={cfg.reprob}, "
                          f"mixup={cfg.mixup}, cutmix={cfg.cutmix}")
    if cfg.auto_augment:
        from mae_fast.data.transforms import auto_augment_transform

        try:
            auto_augment_transform(cfg.auto_augment, 224)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp_dtype, num_classes: int) -> tuple[float, float, float]:
    """(top-1 %, top-5 %, mean loss) over the loader (over every rank's loader when distributed)."""
    model.eval()
    k = min(5, num_classes)
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for imgs, labels in loader:
        imgs, labels = imgs.to(device), labels.to(device)
        with autocast(device, amp_dtype):
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


# ---------------------------------------------------------------------------------------------
# memory budget
# ---------------------------------------------------------------------------------------------
def _with_drop_path(encoder: nn.Module, rate: float, mode: str = "efficient") -> nn.Module:
    """Stochastic depth as timm's ``drop_path_rate`` sets it (linear over the blocks), added to an encoder built
    without: the estimate's model is built on the meta device, where timm cannot read the rates it computes."""
    from timm.layers import DropPath

    rates = torch.linspace(0, rate, len(encoder.blocks), device="cpu").tolist()
    for blk, r in zip(encoder.blocks, rates):
        if r > 0:
            blk.drop_path1, blk.drop_path2 = DropPath(r), DropPath(r)
    return _drop_path_mode(encoder, mode)


def _drop_path_mode(encoder: nn.Module, mode: str) -> nn.Module:
    """``efficient``: the residual branches run on the kept samples only (:mod:`mae_fast.models.drop_path`);
    ``timm``: timm's DropPath, which computes every sample's branch and zeroes the dropped ones."""
    from mae_fast.models.drop_path import efficient_drop_path

    if mode not in ("efficient", "timm"):
        raise ConfigError(f"drop_path_mode must be efficient or timm, got {mode!r}")
    return efficient_drop_path(encoder) if mode == "efficient" else encoder


def fit_memory_budget(cfg: FinetuneConfig, spec: tuple, num_classes: int, linprobe: bool, batch: int, device,
                      amp_dtype) -> dict | None:
    """Estimate a finetuning step's peak (fake tensors, random weights of the same shape) and say whether it fits
    ``memory_budget_gib`` (:func:`mae_fast.memory.fit_memory_budget`); when it does not, checkpointing every
    encoder block is the plan (timm's gradient checkpointing: same numbers, about a third more encoder FLOPs)."""
    from mae_fast.memory import GiB, estimate_train_step

    configured = bool(cfg.grad_checkpointing)
    size = []

    def build(checkpointing):
        plain = dataclasses.replace(cfg, drop_path=0.0)
        model, img_size, _, _ = build_classifier(plain, num_classes, linprobe, (None, *spec[1:]))
        if not linprobe and cfg.drop_path:
            _with_drop_path(model.encoder, cfg.drop_path, cfg.drop_path_mode)
        size[:] = [img_size]
        model.encoder.set_grad_checkpointing(checkpointing)
        return model

    def peak(checkpointing):
        trainable = (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)) if linprobe else None
        return estimate_train_step(
            lambda: build(checkpointing),
            lambda: (torch.randn(batch, 3, *size[0]), torch.randint(num_classes, (batch,))),
            lambda m, x, y: nn.functional.cross_entropy(m(x).float(), y), amp_dtype=amp_dtype,
            make_optimizer=trainable).peak

    def search(limit):
        tried = {configured: peak(configured)}
        if not (tried[configured] <= limit or configured or linprobe):
            tried[True] = peak(True)
        plan = max(tried)  # the configured plan, or checkpointing when it was tried
        return (plan if tried[plan] <= limit else None), tried

    def too_big(limit, tried):
        return (f"a batch of {batch} needs about {tried[max(tried)] / GiB:.1f} GiB even with gradient "
                f"checkpointing, over the {limit / GiB:.1f} GiB budget: raise accum_steps (the "
                f"same step in smaller micro-batches) or lower batch_size")

    fit = memory.fit_memory_budget(cfg.memory_budget_gib, device, search, too_big, print)
    if fit is None:
        return None
    limit, plan, tried = fit
    est, changed = tried[plan], plan != configured
    print(f"memory: estimated peak {tried[configured] / GiB:.1f} GiB" + (
        f" is over the {limit / GiB:.1f} GiB budget; checkpointing every encoder block (estimated {est / GiB:.1f} GiB)"
        if changed else f", within the {limit / GiB:.1f} GiB budget"), flush=True)
    return dict(budget_gib=round(limit / GiB, 3), estimated_peak_gib=round(est / GiB, 3), estimated_peak_bytes=est,
                grad_checkpointing=plan, changed=changed)


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------
def finetune(config: dict | FinetuneConfig | None = None, *, datasets=None) -> dict:
    """Finetune or linearly probe an encoder (``config['mode']``). Returns top1, top5 (best over
    epochs, %), best_epoch, top5_at_best, history, results (path), checkpoint (the encoder source).
    ``datasets`` = (train_ds, val_ds, classes) replaces the configured labelled data."""
    cfg = FinetuneConfig.build(config)
    check_choices(cfg, keys=("device",))
    with dist_mod.process_group(cfg.device) as info:
        run = setup(cfg, info, datasets)
        return train(run, restore(run))


def check_config(cfg: FinetuneConfig, world: int) -> None:
    if cfg.mode not in ("finetune", "linprobe"):
        raise ConfigError(f"mode must be finetune or linprobe, got {cfg.mode!r}")
    linprobe = cfg.mode == "linprobe"
    if not 0.0 < cfg.fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {cfg.fraction}")
    if cfg.epochs < 1 or cfg.batch_size < 2 or cfg.checkpoint_every < 0 or cfg.accum_steps < 1:
        raise ConfigError("epochs must be >= 1, batch_size >= 2, checkpoint_every >= 0 and accum_steps >= 1")
    A = cfg.accum_steps
    if cfg.batch_size % (world * A):
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of the {world} processes x "
                          f"{A} accumulation steps")
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    if cfg.batch_size // (world * A) < 2 and (mixing or (linprobe and world == 1)):
        raise ConfigError(
            f"micro-batches of {cfg.batch_size // (world * A)} image: "
            + ("mixup / cutmix pair the images of a micro-batch" if mixing else "the linear probe's BatchNorm takes "
               "its statistics over a micro-batch") + "; batch_size / (processes x accum_steps) must be >= 2")
    check_augment(cfg)
    check_pool(cfg.pool, linprobe)  # before the data is scanned (e.g. linprobe --config mae_official_finetune)
    check_protocol(cfg, world)
    if cfg.resume not in ("auto", None):
        raise ConfigError(f"resume must be auto or null, got {cfg.resume!r}")


def load_data(cfg: FinetuneConfig, spec: tuple, datasets):
    """(train, val, classes): the configured labelled images at the encoder's size, or the datasets given."""
    if datasets is None:
        from mae_fast.data import build_labelled_datasets
        from mae_fast.models import model_config

        try:
            size = model_config(spec[1], **spec[2]).get("img_size", 224)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model {spec[1]!r}: {e}") from e
        return build_labelled_datasets(root=cfg.data_root, img_size=size, fraction=cfg.fraction, seed=cfg.seed,
                                       auto_augment=cfg.auto_augment, re_prob=cfg.reprob,
                                       train_scale=tuple(cfg.crop_scale), eval_crop_pct=eval_crop_pct(cfg, size),
                                       label_sampling=cfg.label_sampling)
    if cfg.auto_augment or cfg.reprob:
        warnings.warn("auto_augment and reprob act on the configured labelled data; the datasets given keep "
                      "their own transforms", RuntimeWarning, stacklevel=4)
    return datasets


def build_optimizer(cfg: FinetuneConfig, model: Classifier, peak_lr: float, device) -> torch.optim.Optimizer:
    linprobe = cfg.mode == "linprobe"
    wd = cfg.weight_decay if cfg.weight_decay is not None else (0.0 if linprobe else 0.05)
    if linprobe:
        try:
            return optim.linprobe_optimizer(cfg.linprobe_optimizer, list(model.head.parameters()), peak_lr, wd)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    groups = optim.layer_decay_groups(model, wd, cfg.layer_decay)
    for g in groups if cfg.decay_all else ():
        g["weight_decay"] = wd
    return optim.adamw(groups, peak_lr, (0.9, 0.999), device, fused_on_cpu=False)


def build_criterion(cfg: FinetuneConfig, num_classes: int):
    """(loss summed over a micro-batch, mixer or None): label-smoothed cross-entropy for finetuning, plain for the
    probe; with mixup / cutmix the mixer smooths its soft targets and the loss is plain cross-entropy on them."""
    linprobe = cfg.mode == "linprobe"
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixer = BatchMixer(cfg.mixup, cfg.cutmix, 0.0 if linprobe else cfg.label_smoothing, num_classes, cfg.seed)
        return nn.CrossEntropyLoss(reduction="sum"), mixer
    return nn.CrossEntropyLoss(label_smoothing=0.0 if linprobe else cfg.label_smoothing, reduction="sum"), None


@dataclass
class Run:
    """Everything built once before the first step."""

    cfg: FinetuneConfig
    info: dist_mod.DistInfo
    amp_dtype: torch.dtype | None
    model: Classifier
    train_model: nn.Module          # the classifier, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    mixer: BatchMixer | None
    items: SeededItems              # the training images, seeded per (epoch, index)
    n_train: int
    val_loader: torch.utils.data.DataLoader
    n_val: int
    num_classes: int
    steps_per_epoch: int
    total: int
    warmup: float
    peak_lr: float
    run_dir: Path
    encoder: object                 # the encoder checkpoint, or None (random init)
    model_name: str
    identity: dict
    memory_plan: dict | None

    @property
    def linprobe(self) -> bool:
        return self.cfg.mode == "linprobe"

    def lr(self, step: int) -> float:
        return optim.lr_at(step, self.peak_lr, self.total, self.warmup, self.cfg.lr_schedule, self.cfg.min_lr)

    def epoch_batches(self, epoch: int, whole: bool = False) -> list:
        """The epoch's batches of (epoch, index) keys: this rank's share, or (``whole``) the global batches."""
        world, rank = (1, 0) if whole else (self.info.world_size, self.info.rank)
        return epoch_batches(self.n_train, self.cfg.batch_size, self.cfg.seed, epoch, world, rank)


def check_data(cfg: FinetuneConfig, n_train: int, n_val: int, world: int) -> None:
    if n_train < 2:
        raise ConfigError(f"only {n_train} training image(s) after fraction={cfg.fraction}")
    if n_train < world:
        raise ConfigError(f"{n_train} training images cannot be shared by {world} processes")
    if n_val == 0:  # evaluating on nothing divided by zero after the first epoch of training
        raise ConfigError("no validation images: top-1 cannot be measured")


def setup(cfg: FinetuneConfig, info: dist_mod.DistInfo, datasets=None) -> Run:
    world, device = info.world_size, info.device
    check_config(cfg, world)
    linprobe = cfg.mode == "linprobe"
    amp_dtype = autocast_dtype(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    spec = encoder_spec(cfg)  # the encoder's image size decides the data's
    train_ds, val_ds, classes = load_data(cfg, spec, datasets)
    num_classes = len(classes)
    if not isinstance(cfg.grad_checkpointing, bool):
        raise ConfigError("finetuning checkpoints every encoder block or none: grad_checkpointing must be true or false")
    B, A = cfg.batch_size, cfg.accum_steps
    memory_plan = fit_memory_budget(cfg, spec, num_classes, linprobe, B // (world * A), device, amp_dtype)
    model, _, ckpt, model_name = build_classifier(cfg, num_classes, linprobe, spec)
    model.encoder.set_grad_checkpointing(memory_plan["grad_checkpointing"] if memory_plan else cfg.grad_checkpointing)
    model.to(device)
    # DDP averages the ranks' gradients; each rank's loss is its share of the global batch's sum (train_epoch)
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    base_lr = cfg.base_lr if cfg.base_lr is not None else (0.1 if linprobe else 1e-3)
    peak_lr = cfg.lr if cfg.lr is not None else base_lr * B / 256
    optimizer = build_optimizer(cfg, model, peak_lr, device)
    criterion, mixer = build_criterion(cfg, num_classes)

    n_train = len(train_ds)
    check_data(cfg, n_train, len(val_ds), world)
    steps_per_epoch = len(epoch_batches(n_train, B, cfg.seed, 0, world, info.rank))
    val_share = val_ds if world == 1 else torch.utils.data.Subset(val_ds, range(info.rank, len(val_ds), world))
    val_loader = torch.utils.data.DataLoader(val_share, batch_size=max(B // world, 64), shuffle=False,
                                             num_workers=cfg.num_workers, collate_fn=collate_labelled)
    run = Run(cfg, info, amp_dtype, model, train_model, optimizer, criterion, mixer, SeededItems(train_ds, cfg.seed),
              n_train, val_loader, len(val_ds), num_classes, steps_per_epoch, cfg.epochs * steps_per_epoch,
              float(cfg.warmup_epochs) * steps_per_epoch,  # not rounded: MAE warms up by fractional epoch
              peak_lr, Path(cfg.output_dir) / (cfg.name or cfg.mode), ckpt, model_name, run_identity(cfg, ckpt),
              memory_plan)
    if info.is_main:
        write_run_files(run, getattr(train_ds, "record", None))
    return run


def write_run_files(run: Run, record) -> None:
    """What the numbers came from: every setting, and which labelled images (the low-label subset) were used."""
    cfg, world, A = run.cfg, run.info.world_size, run.cfg.accum_steps
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "config.yaml").write_text(dump(cfg.to_dict()))
    if record is not None:
        checkpoint.atomic_write_bytes(run.run_dir / "data_record.json",
                                      json.dumps(record, indent=1, default=str).encode())
    B = cfg.batch_size
    ranks = f" ({B // world} x {world} ranks)" if world > 1 else ""
    ranks += f" in {A} micro-batches" if A > 1 else ""
    print(f"{cfg.mode}: {run.model_name} encoder from {run.encoder or 'random init'}; {run.n_train} train / "
          f"{run.n_val} val images, {run.num_classes} classes; {cfg.epochs} epochs x {run.steps_per_epoch} steps "
          f"of {B}{ranks}, lr {run.peak_lr:.3g}, device {run.info.device}; results -> {run.run_dir}", flush=True)


# ---------------------------------------------------------------------------------------------
# state and resume
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What changes from step to step, and what a checkpoint restores."""

    step: int = 0
    start_epoch: int = 0
    wall_before: float = 0.0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"top1": -1.0})
    done_in_epoch: int = 0           # where a run stopped within an epoch resumes
    epoch_losses: list = field(default_factory=list)
    rng_in_epoch: dict | None = None  # set once that epoch's loader has drawn its seed, as before the stop


def resume_state(resume: str | None, run_dir: Path, identity: dict) -> dict | None:
    """With ``resume=auto``, the newest checkpoint of an interrupted run with the same settings, else None (a
    checkpoint of other settings is named in a warning and will be replaced)."""
    found = checkpoint.latest_valid_checkpoint(run_dir) if resume == "auto" else None
    if found is None:
        return None
    path, state = found
    if state.get("identity") != identity:
        old = state.get("identity") or {}
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        warnings.warn(f"{path} was made with other settings ({', '.join(diff)}): starting over", RuntimeWarning,
                      stacklevel=4)
        return None
    return state


def restore(run: Run) -> TrainState:
    """An interrupted run of the same settings continues where it was saved; otherwise its checkpoints go."""
    info = run.info
    ts = TrainState()
    state = resume_state(run.cfg.resume, run.run_dir, run.identity)
    if state is None:
        if info.is_main:
            checkpoint.remove_checkpoints(run.run_dir)  # another run's, or resume=null
        return ts
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    ts.history, ts.best, ts.step, ts.wall_before = state["history"], state["best"], state["step"], state["wall_time_s"]
    rngs = state["rng"]
    rng = rngs[info.rank] if len(rngs) == info.world_size else rngs[0]
    if "batches_done" in state:  # stopped by a signal within epoch state["epoch"]
        ts.start_epoch, ts.done_in_epoch, ts.epoch_losses = state["epoch"], state["batches_done"], state["epoch_losses"]
        ts.rng_in_epoch = rng
        where = f"in epoch {ts.start_epoch} after {ts.done_in_epoch} of its {run.steps_per_epoch} steps"
    else:
        ts.start_epoch = state["epoch"] + 1
        set_rng_state(rng)
        where = f"after epoch {state['epoch']}"
    if info.is_main:
        print(f"{run.cfg.mode}: resumed {where} (best top-1 so far {ts.best['top1']:.2f}%)", flush=True)
    return ts


def save_state(run: Run, ts: TrainState, epoch: int, t0: float, losses: list | None = None):
    """Checkpoint after ``epoch``, or within it after ``len(losses)`` of its batches (a stop on a signal)."""
    rngs = dist_mod.all_gather_objects(rng_state())
    path = None
    if run.info.is_main:
        state = {"model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
                 "optimizer": run.optimizer.state_dict(), "epoch": epoch, "step": ts.step, "history": ts.history,
                 "best": ts.best, "rng": rngs, "identity": run.identity,
                 "wall_time_s": ts.wall_before + time.perf_counter() - t0}
        if losses is not None:
            state.update(batches_done=len(losses), epoch_losses=list(losses))
        path = checkpoint.save_checkpoint(state, run.run_dir, ts.step, keep=1)  # numbered by step: mid-epoch too
    dist_mod.barrier()
    return path


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def train_step(run: Run, imgs: torch.Tensor, labels: torch.Tensor, global_size: int, step: int,
               signals: list) -> tuple[float, int | None]:
    """One optimizer step on this rank's share of a global batch, in micro-batches; returns (the batch's mean
    loss, the signal every rank stops on or None), agreed by one all-reduce."""
    cfg, world, device = run.cfg, run.info.world_size, run.info.device
    optim.set_lr(run.optimizer, run.lr(step))
    imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    # a short last batch takes fewer micro-batches: none empty, and as many rows as the BatchNorm (2 in
    # all) or the mixer (2 a rank) needs, the same number on every rank (the BatchNorm all-reduces)
    A = cfg.accum_steps
    k = max(1, min(A, global_size // max(world * (2 if run.mixer is not None else 1), 2 if run.linprobe else 1)))
    for a, (x, y) in enumerate(zip(imgs.tensor_split(k), labels.tensor_split(k))):
        if run.mixer is not None:
            x, y = run.mixer(x, y, step * A + a)
        sync = a == k - 1  # DDP all-reduces the gradients once, after the last micro-batch
        with run.train_model.no_sync() if world > 1 and not sync else nullcontext():
            with autocast(device, run.amp_dtype):
                logits = run.train_model(x)
            # this rank's share of the global batch's mean: summed over the micro-batches and
            # averaged by DDP over the ranks, the gradient is the whole batch's mean's
            loss = run.criterion(logits.float(), y) * (world / global_size)
            loss.backward()
        loss_sum += loss.detach()
    # one all-reduce: the mean loss and whether any rank got SIGTERM / SIGINT, so every rank takes
    # the same decisions
    shared = torch.stack([loss_sum / world, *(loss_sum.new_full((), f) for f in signal_flags(signals))])
    mean_loss, sigterm, sigint = dist_mod.all_reduce_sum(shared).tolist()
    if math.isfinite(mean_loss):
        run.optimizer.step()
    return mean_loss, shared_stop(sigterm, sigint)


def train_epoch(run: Run, ts: TrainState, epoch: int, signals: list, bar, t0: float) -> tuple[list, float]:
    """The epoch's steps (from where a resumed run stopped); returns (its losses, the last lr). A signal stops it
    with a checkpoint of the step (``TrainingInterrupted``)."""
    cfg = run.cfg
    run.model.train()
    skip = ts.done_in_epoch if epoch == ts.start_epoch else 0
    batches = run.epoch_batches(epoch)[skip:]
    global_sizes = [len(b) for b in run.epoch_batches(epoch, whole=True)][skip:]
    loader = iter(torch.utils.data.DataLoader(run.items, batch_sampler=batches, num_workers=cfg.num_workers,
                                              collate_fn=collate_labelled))
    if ts.rng_in_epoch is not None:
        set_rng_state(ts.rng_in_epoch)
        ts.rng_in_epoch = None
    losses = ts.epoch_losses if epoch == ts.start_epoch else []
    lr = run.lr(max(ts.step - 1, 0))  # the last step's, should none of this epoch be left
    for (imgs, labels), global_size in zip(loader, global_sizes):
        lr = run.lr(ts.step)
        loss, stop_signal = train_step(run, imgs, labels, global_size, ts.step, signals)
        losses.append(loss)
        ts.step += 1
        if bar is not None:
            show_progress(bar, cfg, ts, epoch, losses)
            bar.update(1)
        if stop_signal is not None:
            path = save_state(run, ts, epoch, t0, losses)
            raise TrainingInterrupted(
                f"signal {signal.Signals(stop_signal).name} in epoch {epoch} after {len(losses)} of its "
                f"{run.steps_per_epoch} steps (step {ts.step}/{run.total}); checkpoint {path} (resume=auto continues "
                f"from it)", stop_signal, ts.step, path)
    return losses, lr


def show_progress(bar, cfg: FinetuneConfig, ts: TrainState, epoch: int, losses: list, refresh: bool = False) -> None:
    post = {"epoch": f"{epoch + 1}/{cfg.epochs}", "loss": f"{sum(losses) / max(1, len(losses)):.3f}"}
    if ts.history:
        post.update(top1=f"{ts.history[-1]['top1']:.1f}", best=f"{ts.best['top1']:.1f}")
    bar.set_postfix(post, refresh=refresh)


def train(run: Run, ts: TrainState) -> dict:
    """For each epoch: train, evaluate, keep the best, checkpoint; then the results."""
    cfg, info = run.cfg, run.info
    bar = progress_bar(cfg.progress and info.is_main, total=run.total, desc=cfg.mode, unit="step")
    if bar is not None:
        bar.update(ts.step)
    t0 = time.perf_counter()
    with stop_requests(f"mae-fast {cfg.mode}") as signals:
        try:
            for epoch in range(ts.start_epoch, cfg.epochs):
                losses, lr = train_epoch(run, ts, epoch, signals, bar, t0)
                top1, top5, val_loss = evaluate(run.model, run.val_loader, info.device, run.amp_dtype,
                                                run.num_classes)
                ts.history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), "val_loss": val_loss,
                                   "top1": top1, "top5": top5, "lr": lr})
                if top1 > ts.best["top1"]:
                    ts.best = {"top1": top1, "top5_at_best": top5, "best_epoch": epoch}
                if bar is not None:
                    show_progress(bar, cfg, ts, epoch, losses, refresh=True)
                every = cfg.checkpoint_every
                if every and (epoch + 1) % every == 0 and epoch + 1 < cfg.epochs:
                    save_state(run, ts, epoch, t0)
        finally:
            if bar is not None:
                bar.close()
    result = record_report(cfg, finish(run, ts, t0), ts.history, ts.best, run.run_dir / "results.json", info.is_main)
    if signals:  # after the last step's all-reduce: the run is finished and saved, and the signal still stops
        raise TrainingInterrupted(f"finished at step {ts.step}/{run.total}, then {signal.Signals(signals[0]).name}",
                                  signals[0], ts.step, None)
    return result


def finish(run: Run, ts: TrainState, t0: float) -> dict:
    """results.json, curves.png and the summary line (rank 0); the training checkpoints are removed."""
    cfg, run_dir, history = run.cfg, run.run_dir, ts.history
    result = {"mode": cfg.mode, "top1": ts.best["top1"], "top5": max(h["top5"] for h in history),
              "top5_at_best": ts.best["top5_at_best"], "best_epoch": ts.best["best_epoch"],
              "final_top1": history[-1]["top1"], "epochs": cfg.epochs, "fraction": cfg.fraction,
              "train_images": run.n_train, "val_images": run.n_val, "num_classes": run.num_classes,
              "checkpoint": str(run.encoder) if run.encoder else None, "model": run.model_name,
              "wall_time_s": ts.wall_before + time.perf_counter() - t0, "run_dir": str(run_dir),
              "results": str(run_dir / "results.json"), "memory_plan": run.memory_plan, "history": history,
              "world_size": run.info.world_size, "chance": 100.0 / run.num_classes,
              "final_top5": history[-1]["top5"]}
    if not run.info.is_main:
        return result
    name = cfg.name or cfg.mode

    def draw():
        curves.plot_finetune({name: history}, run_dir / "curves.png")
        return run_dir / "curves.png"

    result["curves"] = curves.draw_or_warn(run_dir, draw)
    checkpoint.atomic_write_bytes(run_dir / "results.json", json.dumps(result, indent=1).encode())
    checkpoint.remove_checkpoints(run_dir)  # finished: results.json is the record
    print(headline(result), flush=True)
    return result


def headline(result: dict) -> str:
    """The summary line: the last epoch's top-1 first, then the best epoch's (a selection on the validation set
    itself, so optimistic; MAE's protocol reports it too), against chance, with the size of the validation set."""
    last, n = len(result["history"]), result["epochs"]  # epochs counted from 1 here (best_epoch is 0-based)
    kept = f"{result['results']}" + (f"; curves {result['curves']}" if result.get("curves") else "")
    return (f"{result['mode']}: top-1 {result['final_top1']:.2f}% after the last epoch ({last}/{n}), "
            f"{result['top1']:.2f}% at the best epoch ({result['best_epoch'] + 1}/{n}; chosen on the validation set, as "
            f"MAE's protocol reports it); chance {result['chance']:.2f}%; {result['val_images']} validation images "
            f"(one is {100 / max(1, result['val_images']):.2f} points); {kept}")


def main(argv=None, mode: str | None = None) -> int:
    """``mae-fast finetune`` / ``linprobe`` pass ``mode``; the script (``torchrun train/finetune.py``) takes
    ``mode=linprobe`` from the command line (default: the recipe's, finetune)."""
    from mae_fast.training.cli import run_command

    return run_command(argv, FinetuneConfig, lambda cfg: finetune(cfg), prog=f"mae-fast {mode}" if mode else
                       "train/finetune.py", fixed={"mode": mode} if mode else None)
