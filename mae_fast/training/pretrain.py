"""MAE pretraining: ``mae-fast pretrain [--config RECIPE] [key=value ...]`` or ``torchrun train/pretrain.py``.

With no arguments it pretrains the demo model on the demo images (a few minutes on a laptop CPU)
and writes checkpoints, ``metrics.jsonl`` and reconstruction PNGs to ``runs/demo``.

The run reads top to bottom: :func:`setup` builds the model, data, schedule and optimizer (:class:`Run`),
:func:`restore` continues from a checkpoint into the :class:`TrainState`, and :func:`train` loops over steps:
batch -> forward/backward (:func:`forward_backward`) -> optimizer (:func:`optimizer_step`) -> log / checkpoint.

Exactness on resume: the data order is a pure function of (seed, epoch), every sample's
augmentation draws come from a generator seeded by (seed, epoch, index), and the masking noise of
a step from (seed, step); so a step's inputs depend only on the step number and a resumed run
replays the uninterrupted one (bit-exactly on the CPU in fp32).
"""
from __future__ import annotations

import collections
import contextlib
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
import torch.nn as nn

from mae_fast import memory, optim, precision, targets
from mae_fast.data.samplers import SeededItems, StepBatchSampler, StreamBatches, SyntheticImages, collate_images, \
    mix_seed
from mae_fast.data.subset import SUBSET_MODES
from mae_fast.models.checkpoint import CheckpointError
from mae_fast.training import checkpoint, curves, packing
from mae_fast.training import distributed as dist_mod
from mae_fast.training.checkpoint import rng_state, set_rng_state
from mae_fast.training.compiling import ColdStart, resolve_compile
from mae_fast.training.config import ConfigError, PretrainConfig, dump
from mae_fast.training.metrics import DATA_WAIT_WARN, MetricsLog, Throughput, mfu_text, peak_flops_for, progress_bar
from mae_fast.training.signals import StopNow, TrainingInterrupted, shared_stop, signal_flags, stop_requests

CHECKPOINT_VERSION = 1

# keys that define a run's trajectory: resuming with other values is allowed, with a warning
RESUME_MUST_MATCH = ("model", "model_kwargs", "img_size", "norm_pix_loss", "mask_ratio", "data_source", "hours",
                     "subset", "fps", "batch_size", "epochs", "steps", "seed", "lr", "base_lr", "lr_schedule",
                     "weight_decay", "warmup_steps", "warmup_epochs", "images", "subset_strategy",
                     "target", "teacher", "teacher_layer", "hog_bins", "hog_cell", "hog_window",
                     "img_sizes", "img_size_weights", "packing", "tokens_per_batch", "phases")

# keys with a fixed set of values, checked before the process group starts and the data is built
CHOICES = {"device": ("auto", "cpu", "cuda"), "distributed": ("auto", "ddp", "fsdp", "none"),
           "precision": ("auto", "bf16", "fp16", "fp32", "fp8"), "subset": SUBSET_MODES}


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; a checkpoint of the state was written to inspect."""


def pretrain(config: dict | PretrainConfig | None = None, *, dataset=None) -> dict:
    """Pretrain an MAE. ``config`` holds recipe keys (see train/recipes/demo.yaml; ``recipe`` picks
    the base recipe, default demo) or is a :class:`PretrainConfig`. Returns checkpoint, images_seen,
    wall_time_s, final_loss, run_dir (plus steps, skipped_steps, ...). ``dataset`` replaces the configured
    data (a map-style dataset of (3, H, W) tensors)."""
    cfg = PretrainConfig.build(config)
    check_choices(cfg)
    # a non-finite-loss stop happens at the same step on every rank: the loss it checks is reduced over ranks
    with dist_mod.process_group(cfg.device, finished_on=(NonFiniteLossError, TrainingInterrupted)) as info:
        t_start = time.perf_counter()
        run = setup(cfg, info, dataset)
        state = restore(run)
        return train(run, state, t_start)


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
def check_choices(cfg, keys=("device", "distributed", "precision", "subset")) -> None:
    for key in keys:
        value = getattr(cfg, key)
        if value not in CHOICES[key]:
            raise ConfigError(f"{key} must be one of {', '.join(CHOICES[key])}, got {value!r}")


def check_config(cfg: PretrainConfig, world: int) -> None:
    B, A = cfg.batch_size, cfg.accum_steps
    if B < 1 or A < 1:
        raise ConfigError(f"batch_size ({B}) and accum_steps ({A}) must be positive")
    if B % (A * world):
        raise ConfigError(f"batch_size {B} must be divisible by accum_steps x world_size = {A * world}")
    if not 0.0 < cfg.mask_ratio < 1.0:  # 0 masks no patch: the loss (over masked patches) would be NaN
        raise ConfigError(f"mask_ratio must be in (0, 1), got {cfg.mask_ratio}")
    if cfg.lr_schedule not in ("cosine", "constant"):
        raise ConfigError(f"lr_schedule must be cosine or constant, got {cfg.lr_schedule!r}")
    if cfg.compile_scope not in ("model", "blocks"):
        raise ConfigError(f"compile_scope must be model or blocks, got {cfg.compile_scope!r}")
    if cfg.max_bad_steps < 1:
        raise ConfigError("max_bad_steps must be at least 1")
    if cfg.precision == "fp8" and (why := precision.fp8_unavailable() or precision.check_min_width(cfg.fp8_min_width)):
        raise ConfigError(why)
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).is_file():
        raise ConfigError(f"resume must be null, auto or an existing checkpoint file, got {cfg.resume!r}")
    from mae_fast.data.image_subsets import subset_config_problem
    if (problem := subset_config_problem(cfg.images, cfg.subset_strategy, cfg.hours, cfg.data_source)) is not None:
        raise ConfigError(problem)
    if cfg.checkpoint_every < 1 or cfg.log_every < 1:
        raise ConfigError("checkpoint_every and log_every must be at least 1")
    for key in ("lr", "base_lr", "fps", "clip_grad"):
        value = getattr(cfg, key)
        if value is not None and not value > 0:
            raise ConfigError(f"{key} must be a positive number, got {value!r}")
    for key in ("num_workers", "warmup_steps", "warmup_epochs", "min_lr", "weight_decay", "vis_every", "vis_images",
                "keep_checkpoints", "synthetic_size"):
        value = getattr(cfg, key)
        if value is not None and value < 0:
            raise ConfigError(f"{key} must not be negative, got {value!r}")
    packing.check(cfg, world)


def autocast_dtype(precision: str, device: torch.device):
    if precision not in CHOICES["precision"]:
        raise ConfigError(f"precision must be auto, bf16, fp16, fp32 or fp8, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    # fp8: torchao's float8 matmuls for the wide encoder linears (build_model), bf16 autocast for the rest
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None, "fp8": torch.bfloat16}[precision]


def autocast(device: torch.device, amp_dtype):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()


# ---------------------------------------------------------------------------------------------
# setup: model, data, schedule, optimizer, run directory
# ---------------------------------------------------------------------------------------------
@dataclass
class Schedule:
    """The run's length and learning rate, from the data size and the batch."""

    batch: int            # global batch per optimizer step
    accum: int            # micro-steps per optimizer step
    micro: int            # micro-batch of one rank
    steps_per_epoch: int
    total_steps: int
    warmup: float         # steps; fractional with warmup_epochs, as MAE's
    peak_lr: float
    lr_schedule: str
    min_lr: float

    def lr(self, step: int) -> float:
        return optim.lr_at(step, self.peak_lr, self.total_steps, self.warmup, self.lr_schedule, self.min_lr)


@dataclass
class Run:
    """Everything built once before the first step."""

    cfg: PretrainConfig
    info: dist_mod.DistInfo
    amp_dtype: torch.dtype | None
    model: nn.Module                  # the MAE itself (state dicts, clipping, pictures)
    train_model: nn.Module            # what the step calls: the model, or its DDP / FSDP2 wrapper
    strategy: str                     # none | ddp | fsdp
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    dataset: object
    n: int | None                     # images (None: a stream of unknown length)
    sched: Schedule
    run_dir: Path
    memory_plan: dict | None
    peak_src: str = ""                # where the MFU's peak FLOP/s came from
    cold_start: ColdStart | None = None  # the compiled step's cold-start timer (compile on)
    target: targets.Target | None = None  # what the decoder reconstructs (None: the model's pixels)
    plan: packing.StepPlan | None = None  # mixed resolutions / packing / phases (training/packing.py)

    @property
    def device(self) -> torch.device:
        return self.info.device

    def say(self, msg: str) -> None:
        if self.info.is_main:
            print(msg, flush=True)


def create_model(name: str, **kw):
    """``create_model``, its complaints about the name or the overrides (unknown model, img_size not a
    multiple of the patch size, unknown model_kwargs) raised as ``ConfigError``."""
    from mae_fast import create_model as create

    try:
        return create(name, **kw)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model {name!r}: {e}") from e


def build_model(cfg: PretrainConfig, device: torch.device, target: targets.Target | None = None) -> nn.Module:
    torch.manual_seed(cfg.seed)  # identical init on every rank
    kw = dict(cfg.model_kwargs or {})
    if cfg.img_size is not None:
        kw["img_size"] = cfg.img_size
    kw["norm_pix_loss"] = bool(cfg.norm_pix_loss)
    if target is not None:
        kw.update(target.model_kwargs())  # norm_pix_loss, or the prediction head's width for another target
    model = create_model(cfg.model, **kw).to(device)
    if model.num_visible(cfg.mask_ratio) < 1:
        raise ConfigError(f"mask_ratio={cfg.mask_ratio} leaves no visible patch out of {model.num_patches}: lower it")
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.lean_activations:
        model.set_lean_activations(True)
    if cfg.precision == "fp8":  # mae_fast.precision: Float8Linear for the encoder's wide linears
        model.fp8_linears = precision.convert_fp8(model, cfg.fp8_min_width, device=device)
    return model


def build_dataset(cfg: PretrainConfig, img_size, is_main: bool):
    if cfg.data_source == "synthetic":
        return SyntheticImages(cfg.synthetic_size, img_size, cfg.seed)
    from mae_fast.data import build_pretrain_dataset

    kw = dict(source=cfg.data_source, img_size=img_size, hours=cfg.hours, subset=cfg.subset,
              seed=cfg.seed, fps=cfg.fps, train=True)
    if cfg.images is not None:  # an image-count subset: rank 0 records it in the run dir, resumes replay it
        kw.update(images=cfg.images, subset_strategy=cfg.subset_strategy, subset_dir=resolve_run_dir(cfg),
                  subset_replay=("check" if cfg.resume is not None else None) if is_main else "trust")
    # rank 0 first: building may write the demo data or an index that the others then reuse
    if is_main:
        ds = build_pretrain_dataset(**kw)
        dist_mod.barrier()
    else:
        dist_mod.barrier()
        ds = build_pretrain_dataset(**kw)
    return ds


def dataset_length(ds) -> int | None:
    try:
        return len(ds)
    except TypeError:  # a stream of unknown length
        return None


def make_schedule(cfg: PretrainConfig, n: int | None, world: int) -> Schedule:
    B, A = cfg.batch_size, cfg.accum_steps
    steps_per_epoch = n // B if n is not None else None
    if steps_per_epoch is None:
        if cfg.steps is None or (cfg.warmup_steps is None and cfg.warmup_epochs):
            raise ConfigError("the data is a stream of unknown length: set steps (and warmup_steps)")
        steps_per_epoch = max(1, int(cfg.steps))  # only for the epoch column of the logs
    elif steps_per_epoch < 1:
        raise ConfigError(f"the dataset has {n} images, fewer than one batch_size ({B})")
    total_steps = int(cfg.steps) if cfg.steps is not None else int(round(cfg.epochs * steps_per_epoch))
    if total_steps < 1:
        raise ConfigError("the run has no steps: raise epochs or steps")
    warmup = (int(cfg.warmup_steps) if cfg.warmup_steps is not None
              else float(cfg.warmup_epochs) * steps_per_epoch)  # not rounded: MAE warms up by fractional epoch
    peak_lr = float(cfg.lr) if cfg.lr is not None else cfg.base_lr * B / 256
    return Schedule(B, A, B // (A * world), steps_per_epoch, total_steps, warmup, peak_lr, cfg.lr_schedule,
                    cfg.min_lr)


def build_optimizer(model: nn.Module, cfg: PretrainConfig, lr: float, device: torch.device):
    betas = tuple(float(b) for b in cfg.betas)
    if len(betas) != 2:
        raise ConfigError(f"betas must be two numbers, got {cfg.betas!r}")
    return optim.adamw(optim.param_groups(model, cfg.weight_decay), lr, betas, device)


def resolve_run_dir(cfg: PretrainConfig) -> Path:
    """runs/<name>; a fresh run (no resume) never writes into a directory that has checkpoints."""
    base = Path(cfg.output_dir) / str(cfg.name or "run")
    if cfg.resume is not None:
        return base
    run_dir, k = base, 1
    while checkpoint.list_checkpoints(run_dir):
        k += 1
        run_dir = base.with_name(f"{base.name}-{k}")
    return run_dir


def setup(cfg: PretrainConfig, info: dist_mod.DistInfo, dataset=None) -> Run:
    check_config(cfg, info.world_size)
    device = info.device
    amp_dtype = autocast_dtype(cfg.precision, device)
    target = targets.build_target(cfg, device, amp_dtype)
    model = build_model(cfg, device, target)
    plan = packing.build_plan(cfg, model)
    if cfg.init_from is not None:
        packing.init_weights(model, cfg.init_from, print if info.is_main else lambda msg: None)
    img_size = model.img_size if plan is None else (plan.max_size, plan.max_size)  # plans resize down
    ds = dataset if dataset is not None else build_dataset(cfg, img_size[0] if img_size[0] == img_size[1]
                                                            else img_size, info.is_main)
    n = dataset_length(ds)
    sched = make_schedule(cfg, n, info.world_size)
    if plan is not None and plan.total_steps is not None:
        sched.total_steps = plan.total_steps  # the phases' sum

    strategy = dist_mod.choose_strategy(cfg.distributed, model, info)
    memory_plan = fit_memory_budget(cfg, model, sched.micro, strategy, device, amp_dtype, info, target)
    train_model = dist_mod.wrap_model(model, strategy, info)
    optimizer = build_optimizer(model, cfg, sched.peak_lr, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    # run directory: rank 0 decides
    run_dir = Path(dist_mod.broadcast_object(str(resolve_run_dir(cfg)) if info.is_main else None))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.clean_temporaries(run_dir)
    dist_mod.barrier()
    return Run(cfg, info, amp_dtype, model, train_model, strategy, optimizer, scaler, ds, n, sched, run_dir,
               memory_plan, target=target, plan=plan)


def fit_memory_budget(cfg: PretrainConfig, model, micro: int, strategy: str, device, amp_dtype, info,
                      target=None) -> dict | None:
    """Make the step fit ``memory_budget_gib`` (:func:`mae_fast.memory.fit_memory_budget`): estimate its peak per
    device (DDP's gradient buckets counted, FSDP2's sharding simulated in a subprocess on rank 0) and, when the
    configured plan would not fit, turn on lean activations, then checkpoint the fewest blocks (decoder first).
    Neither changes the data order or the loss. Returns what was decided."""
    from mae_fast.memory import GiB, Plan
    from mae_fast.models import mae_recompute_pct

    def say(msg):
        if info.is_main:
            print(msg, flush=True)

    def job(limit):
        return memory.mae_memory_job(cfg, model, micro, amp_dtype, strategy, info.world_size, limit, target)

    def search(limit):
        if strategy != "fsdp":
            return memory.plan_mae_memory(job(limit))
        outcome = None
        if info.is_main:
            try:
                outcome = memory.plan_mae_memory_in_subprocess(job(limit))
            except Exception as e:  # noqa: BLE001 - every rank reports it below
                outcome = memory.EstimateFailed(f"{type(e).__name__}: {e}")
        outcome = dist_mod.broadcast_object(outcome)
        if isinstance(outcome, memory.EstimateFailed):
            raise outcome
        return outcome

    def too_big(limit, tried):
        blocks = job(limit)["blocks"]
        hint = "raise accum_steps"
        if strategy != "fsdp":  # the largest micro-batch that fits, fully checkpointed, makes the hint concrete
            try:
                fits = memory.largest_micro_batch(job(limit), micro - 1)
                A, world = cfg.accum_steps, info.world_size
                accum = next((a for a in range(A + 1, cfg.batch_size // world + 1)
                              if cfg.batch_size % (a * world) == 0 and cfg.batch_size // (a * world) <= fits),
                             None) if fits else None
                if accum:
                    hint = f"raise accum_steps to {accum} (a micro-batch of {fits} fits with every block checkpointed)"
            except Exception:  # noqa: BLE001 - only a hint
                pass
        return (f"a micro-batch of {micro} needs about {tried[Plan(True, blocks, blocks)] / GiB:.1f} GiB per device "
                f"even with every block checkpointed, over the {limit / GiB:.1f} GiB budget: {hint} (the batch stays "
                f"{cfg.batch_size}), shard with distributed=fsdp, or set memory_budget_gib")

    fit = memory.fit_memory_budget(cfg.memory_budget_gib, device, search, too_big, say)
    if fit is None:
        return None
    limit, found, tried = fit
    blocks = found.total_blocks
    ck = cfg.grad_checkpointing
    start = Plan(bool(cfg.lean_activations), blocks if ck is True else int(ck), blocks)
    model.set_lean_activations(found.lean)
    model.set_grad_checkpointing(found.checkpointed if found.checkpointed < blocks else True)
    recompute = mae_recompute_pct(model, cfg.mask_ratio)
    if found != start:
        say(f"memory: estimated peak {tried[start] / GiB:.1f} GiB per device is over the {limit / GiB:.1f} GiB "
            f"budget; training with {found.describe()} instead (estimated {tried[found] / GiB:.1f} GiB, "
            f"{recompute:.1f}% more FLOPs)")
    else:
        say(f"memory: estimated peak {tried[found] / GiB:.1f} GiB per device, within the "
            f"{limit / GiB:.1f} GiB budget ({found.describe()})")
    return dict(budget_gib=round(limit / GiB, 3), estimated_peak_gib=round(tried[found] / GiB, 3),
                estimated_peak_bytes=tried[found], lean_activations=found.lean, checkpointed_blocks=found.checkpointed,
                recompute_flops_pct=round(recompute, 2), changed=found != start, strategy=strategy)


# ---------------------------------------------------------------------------------------------
# state and resume
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What changes from step to step, and what a checkpoint restores."""

    step: int = 0
    images_seen: int = 0
    bad_total: int = 0        # skipped (non-finite) steps in all
    bad_run: int = 0          # ... in a row
    wall_before: float = 0.0  # training seconds of the runs this one resumes
    last_loss: float = float("nan")
    recent_losses: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    stream_position: tuple = (0, 0)  # (epoch, micro-batches taken) of a streamed dataset


def load_resume_state(run: Run) -> tuple[dict | None, object]:
    cfg = run.cfg
    if cfg.resume == "auto":
        found = checkpoint.latest_valid_checkpoint(run.run_dir)
        if found is not None:
            run.say(f"resuming from {found[0]}")
            return found[1], found[0]
        run.say(f"resume=auto: no checkpoint in {run.run_dir}, starting fresh")
        return None, None
    if cfg.resume is not None:
        state = checkpoint.load_checkpoint(cfg.resume)
        run.say(f"resuming from {cfg.resume}")
        return state, cfg.resume
    return None, None


def restore(run: Run) -> TrainState:
    """The state to start from: fresh, or a checkpoint's (``resume``), loaded into the model and optimizer."""
    cfg, info = run.cfg, run.info
    state, source = load_resume_state(run)
    ts = TrainState()
    if state is None:
        return ts
    if "optimizer" not in state or "step" not in state:
        raise CheckpointError("the checkpoint holds weights only (no optimizer/step): start from it with "
                              f"init_from={source} (a fresh optimizer and schedule), not with resume")
    old = state.get("config") or {}
    changed = [k for k in RESUME_MUST_MATCH if k in old and old[k] != getattr(cfg, k)]
    described = ", ".join(f"{k} ({old[k]!r} -> {getattr(cfg, k)!r})" for k in changed)
    try:
        dist_mod.load_full_state_dicts(run.model, run.optimizer, state["model"], state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:  # another model's weights or optimizer
        differs = f" (made with a different {described})" if changed else ""
        raise CheckpointError(f"cannot resume from {source}: it does not fit this model{differs}; start a new run "
                              f"(resume=null or another name) or resume with its settings. "
                              f"{' '.join(str(e).split())[:300]}") from e
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    if changed and info.is_main:
        warnings.warn(f"resuming with a different {described}: the continuation is not the run that was started",
                      RuntimeWarning, stacklevel=3)
    ts.step = int(state["step"])
    if info.is_main and cfg.resume != "auto":
        aside = checkpoint.set_aside_later(run.run_dir, ts.step)
        if aside is not None:
            run.say(f"checkpoints of steps after {ts.step} belong to the continuation this resume abandons: "
                    f"moved to {aside}, so resume=auto goes on with this one")
    ts.images_seen = int(state.get("images_seen", ts.step * run.sched.batch))
    ts.bad_total, ts.bad_run = int(state.get("skipped_steps", 0)), int(state.get("bad_in_a_row", 0))
    ts.wall_before = float(state.get("wall_time_s", 0.0))
    ts.last_loss = float(state.get("loss", float("nan")))
    positions = state.get("stream_positions") or []
    if len(positions) == info.world_size:
        ts.stream_position = tuple(positions[info.rank])
    rngs = state.get("rng") or []
    if rngs:
        set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
    return ts


def compile_model(run: Run) -> ColdStart | None:
    """torch.compile the step per ``compile`` (auto: on CUDA) and ``compile_scope``; returns the cold-start timer."""
    if not resolve_compile(run.cfg.compile, run.device):
        return None
    if run.cfg.compile_scope == "blocks":
        # regional compilation: every block has the same code, so one compiled graph serves them all
        # (much shorter cold start than the whole model; the glue between blocks stays eager)
        for blk in list(run.model.blocks) + list(run.model.decoder_blocks):
            blk.compile()
    else:
        run.train_model.compile()
    return ColdStart("blocks" if run.cfg.compile_scope == "blocks" else "whole model", run.say)


def make_loader(run: Run, ts: TrainState):
    """Micro-batches from the resume position: a DataLoader over :class:`StepBatchSampler`, or the stream."""
    cfg, info, sched = run.cfg, run.info, run.sched
    pin = run.device.type == "cuda"
    if run.plan is not None:
        return packing.make_loader(run, ts.step)
    if isinstance(run.dataset, torch.utils.data.IterableDataset):
        return StreamBatches(run.dataset, sched.micro, cfg.num_workers, pin, *ts.stream_position)
    sampler = StepBatchSampler(run.n, sched.batch, cfg.seed, ts.step, sched.total_steps, sched.accum,
                               info.world_size, info.rank)
    return torch.utils.data.DataLoader(
        SeededItems(run.dataset, cfg.seed), batch_sampler=sampler, num_workers=cfg.num_workers,
        collate_fn=collate_images, pin_memory=pin, generator=torch.Generator().manual_seed(cfg.seed),
        persistent_workers=False, prefetch_factor=4 if cfg.num_workers > 0 else None)


# ---------------------------------------------------------------------------------------------
# one step
# ---------------------------------------------------------------------------------------------
@dataclass
class StepOutcome:
    loss: float               # the mean over ranks and micro-batches (non-finite if any rank's is)
    time_up: bool             # some rank is past time_limit_s
    stop_signal: int | None   # SIGTERM / SIGINT on some rank
    data_wait_s: float        # time blocked on the loader
    images: int | None = None  # images of the step where they vary (planned steps); None: the batch size
    flops: float | None = None  # their training FLOPs where they differ in size


def forward_backward(run: Run, batches, step: int, signals: list, t_loop: float) -> StepOutcome:
    """The step's micro-batches through the model and back (gradients accumulate; DDP / FSDP2 synchronise
    after the last one), then one all-reduce of the loss and the stop flags, so every rank decides alike."""
    cfg, info, sched = run.cfg, run.info, run.sched
    if run.plan is not None:
        return packing.forward_backward(run, batches, step, signals, t_loop)
    L = run.model.num_patches
    g_noise = torch.Generator().manual_seed(mix_seed(cfg.seed, 15485863, step))
    noise_all = torch.rand(sched.batch, L, generator=g_noise).view(sched.accum, info.world_size, sched.micro, L)
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=run.device)
    data_wait = 0.0
    for a in range(sched.accum):
        t_data = time.perf_counter()
        imgs = next(batches)  # the time blocked here is the time the GPU (or CPU) waited for data
        data_wait += time.perf_counter() - t_data
        imgs = imgs.to(run.device, non_blocking=True)
        noise = noise_all[a, info.rank].to(run.device, non_blocking=True)
        sync = a == sched.accum - 1
        ctx = run.train_model.no_sync() if (run.strategy == "ddp" and not sync) else nullcontext()
        if run.strategy == "fsdp":
            run.train_model.set_requires_gradient_sync(sync)
        with ctx:
            with autocast(run.device, run.amp_dtype):
                loss = run.train_model(imgs, mask_ratio=cfg.mask_ratio, noise=noise, masked_only=True,
                                       target=targets.compute(run.target, imgs)).loss
            if step in {int(s) for s in cfg.debug_nan_steps}:
                loss = loss * float("nan")
            scaled = loss / sched.accum
            (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        loss_sum += loss.detach().float()
    over_time = cfg.time_limit_s is not None and time.perf_counter() - t_loop > cfg.time_limit_s
    flags = [float(over_time), *signal_flags(signals)]
    shared = torch.stack([loss_sum / (sched.accum * info.world_size), *(loss_sum.new_full((), f) for f in flags)])
    shared = dist_mod.all_reduce_sum(shared).tolist()
    return StepOutcome(shared[0], shared[1] > 0, shared_stop(shared[2], shared[3]), data_wait)


def optimizer_step(run: Run, loss: float) -> tuple[bool, float | None]:
    """Unscale, clip and step when the loss (and the clipped gradient) is finite; else drop the gradients.
    Returns (stepped, gradient norm before clipping or None)."""
    scaler, optimizer = run.scaler, run.optimizer
    grad_norm = None
    ok = math.isfinite(loss)
    if ok:
        if scaler:
            scaler.unscale_(optimizer)
        if run.cfg.clip_grad is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad))
            ok = math.isfinite(grad_norm) or scaler is not None
    if ok:
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return ok, grad_norm


# ---------------------------------------------------------------------------------------------
# checkpoints and pictures
# ---------------------------------------------------------------------------------------------
class Saver:
    """Writes the run's checkpoints (every rank takes part; rank 0 writes) and reconstruction pictures."""

    def __init__(self, run: Run, loader, t_loop: float):
        self.run, self.loader, self.t_loop = run, loader, t_loop
        self.vis_batch = picture_batch(run)

    def save(self, ts: TrainState, loss: float, tag: str = "") -> Path | None:
        run = self.run
        msd, osd = dist_mod.full_state_dicts(run.model, run.optimizer)
        rngs = dist_mod.all_gather_objects(rng_state())
        stream = self.loader if isinstance(self.loader, StreamBatches) else None
        positions = dist_mod.all_gather_objects((stream.epoch, stream.index)) if stream is not None else None
        path = None
        if run.info.is_main:
            epoch, index = divmod(ts.step, run.sched.steps_per_epoch)
            state = {"model": msd, "optimizer": osd, "scaler": run.scaler.state_dict() if run.scaler else None,
                     "step": ts.step, "epoch": epoch, "index_in_epoch": index, "images_seen": ts.images_seen,
                     "total_steps": run.sched.total_steps, "skipped_steps": ts.bad_total, "bad_in_a_row": ts.bad_run,
                     "loss": loss, "rng": rngs, "config": run.cfg.to_dict(), "world_size": run.info.world_size,
                     "wall_time_s": ts.wall_before + time.perf_counter() - self.t_loop,
                     "version": CHECKPOINT_VERSION, "note": tag, "stream_positions": positions}
            path = checkpoint.save_checkpoint(state, run.run_dir, ts.step, run.cfg.keep_checkpoints)
        # every rank returns the path (a later stage, e.g. the scaling runner's evaluation, loads it on every
        # rank); receiving it also waits for rank 0 to finish writing
        return dist_mod.broadcast_object(path, src=0)

    def picture(self, step: int) -> Path | None:
        from mae_fast.training import visualize

        run = self.run
        if self.vis_batch is None:
            return None
        path = run.run_dir / "reconstructions" / f"step-{step:08d}.png"
        fwd = run.train_model if run.strategy == "fsdp" else run.model.forward
        with autocast(run.device, run.amp_dtype):
            out = visualize.save_reconstruction_grid(
                run.model, self.vis_batch.to(run.device), path if run.info.is_main else None, run.cfg.mask_ratio,
                mean=getattr(run.dataset, "mean", None), std=getattr(run.dataset, "std", None), seed=run.cfg.seed,
                forward=fwd)
        if run.info.is_main:
            (run.run_dir / "reconstruction.png").write_bytes(path.read_bytes())
        return out


def picture_batch(run: Run):
    """The images of the reconstruction grid (on rank 0; on every rank under FSDP2, whose forward is collective)."""
    cfg, ds, n = run.cfg, run.dataset, run.n
    if not (run.info.is_main or run.strategy == "fsdp") or (run.target is not None and run.target.external):
        return None  # the pictures show pixels: a run with another target has none
    if isinstance(ds, torch.utils.data.IterableDataset):
        first = []
        for item in ds:
            first.append(item)
            if len(first) >= cfg.vis_images:
                break
        return collate_images(first) if first else None
    if cfg.vis_images > 0:
        k_vis = min(cfg.vis_images, n)  # spread over the data (neighbouring video frames look alike)
        return torch.stack([collate_images([SeededItems(ds, cfg.seed)[(0, i * n // k_vis)]])[0]
                            for i in range(k_vis)])
    return None


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def stop_reason(cfg: PretrainConfig, ts: TrainState, last: StepOutcome | None) -> str | None:
    if cfg.stop_at_step is not None and ts.step >= int(cfg.stop_at_step):
        return f"stop_at_step={cfg.stop_at_step}"
    if last is not None and last.time_up:
        return f"time_limit_s={cfg.time_limit_s}"
    if last is not None and last.stop_signal is not None:
        return f"signal {signal.Signals(last.stop_signal).name}"
    return None


def write_run_files(run: Run) -> None:
    """config.yaml, data_record.json and the run's summary line (rank 0)."""
    cfg, info, sched = run.cfg, run.info, run.sched
    if not info.is_main:
        return
    (run.run_dir / "config.yaml").write_text(dump(cfg.to_dict()))
    rec = getattr(run.dataset, "record", None)
    if rec is not None:
        (run.run_dir / "data_record.json").write_text(json.dumps(rec, indent=1, default=str))
    n_params = sum(p.numel() for p in run.model.parameters())
    n_decoder = sum(p.numel() for n, p in run.model.named_parameters() if n.startswith(("decoder", "mask_token")))
    h, w = run.model.img_size
    run.say(f"run dir: {run.run_dir.resolve()}\n"
            f"model {cfg.model} ({n_params / 1e6:.2f}M params: encoder {(n_params - n_decoder) / 1e6:.2f}M + "
            f"decoder {n_decoder / 1e6:.2f}M (scaling grids count the encoder and its evaluation head); {h}x{w}), "
            f"{run.n if run.n is not None else 'a stream of'} images, batch {sched.batch} (micro {sched.micro} x "
            f"accum {sched.accum} x {info.world_size} ranks), "
            f"{sched.total_steps} steps ({sched.total_steps / sched.steps_per_epoch:.2f} epochs), "
            f"lr {sched.peak_lr:.3g}, device {run.device}, "
            f"{run.strategy if run.strategy != 'none' else 'single process'}, "
            f"precision {run.amp_dtype or torch.float32}; MFU peak {run.peak_src}")
    if cfg.precision == "fp8":
        run.say(precision.fp8_summary(run.model, run.device))


def train(run: Run, ts: TrainState, t_start: float) -> dict:
    """The training loop: for each step, batch -> forward/backward -> optimizer -> log / checkpoint."""
    from mae_fast.models import mae_train_flops

    cfg, sched = run.cfg, run.sched
    cold = run.cold_start = compile_model(run)
    loader = make_loader(run, ts)
    peak, run.peak_src = peak_flops_for(run.device, cfg.peak_flops)
    saver = Saver(run, loader, 0.0)
    metrics = MetricsLog(run.run_dir, run.info.is_main, resume_step=ts.step)
    write_run_files(run)
    bar = progress_bar(run.info.is_main and cfg.progress, total=sched.total_steps, initial=ts.step, desc="pretrain",
                       mininterval=1.0)
    batches = iter(loader)
    t_loop = saver.t_loop = time.perf_counter()
    window = Throughput(mae_train_flops(run.model, cfg.mask_ratio), peak, run.info.world_size, run.device)
    stopped, last, lr, grad_norm = "finished", None, None, None
    last_ckpt, last_ckpt_step = None, None

    def log(lr, grad_norm):
        row = window.close_window()
        row = {"step": ts.step, "epoch": round(ts.step / sched.steps_per_epoch, 4), "loss": row["loss"], "lr": lr,
               "images_per_s": row["images_per_s"], "mfu": row["mfu"], "data_wait": row["data_wait"],
               "grad_norm": grad_norm, "skipped_steps": ts.bad_total, "images_seen": ts.images_seen,
               "time_s": round(ts.wall_before + time.perf_counter() - t_loop, 3)}
        metrics.write(row)
        show_progress(bar, row)

    run.train_model.train()
    with stop_requests() as signals:
        try:
            while ts.step < sched.total_steps:
                if (reason := stop_reason(cfg, ts, last)) is not None:
                    stopped = reason
                    break
                lr = sched.lr(ts.step)
                optim.set_lr(run.optimizer, lr)
                if cold is not None:
                    cold.start()
                last = forward_backward(run, batches, ts.step, signals, t_loop)
                if cold is not None:
                    cold = cold.first_step()  # reports the compile time once
                window.data_wait_s += last.data_wait_s
                with signals.critical():  # a second signal waits for the step to be whole
                    ok, grad_norm = optimizer_step(run, last.loss)
                    record_step(run, ts, ok, last.loss, bar, last.images)
                window.add_step(last.images or sched.batch, last.loss if ok else None, last.flops)
                if ts.bad_run >= cfg.max_bad_steps:
                    path = saver.save(ts, last.loss, tag="non-finite")
                    raise NonFiniteLossError(
                        f"{ts.bad_run} non-finite losses in a row (max_bad_steps={cfg.max_bad_steps}) at step "
                        f"{ts.step}; stopped. State saved to inspect: {path or run.run_dir / 'checkpoints'}")
                if ts.step % cfg.log_every == 0 or ts.step == sched.total_steps:
                    log(lr, grad_norm)
                if bar is not None:
                    bar.update(1)
                if cfg.debug_step_sleep_s:
                    time.sleep(cfg.debug_step_sleep_s)
                t_aside = time.perf_counter()  # checkpoint and picture time stays out of images/s
                if ts.step % cfg.checkpoint_every == 0 and ts.step < sched.total_steps:
                    with signals.critical():
                        last_ckpt, last_ckpt_step = saver.save(ts, ts.last_loss), ts.step
                if cfg.vis_every and ts.step % cfg.vis_every == 0 and ts.step < sched.total_steps:
                    saver.picture(ts.step)
                window.aside(t_aside)
            if window.images:
                log(lr, grad_norm)
            stop_signal = last.stop_signal if last is not None else None
            if last_ckpt_step != ts.step:
                with signals.critical():
                    last_ckpt, last_ckpt_step = saver.save(ts, ts.last_loss), ts.step
            if stop_signal is None:  # a stop on a signal is kept short (SIGTERM comes with a grace period)
                saver.picture(ts.step)
            result = finish(run, ts, window, stopped, last_ckpt, t_loop, t_start)
        except StopNow as now:
            stop_at_once(run, ts, saver, now.signum, last_ckpt if last_ckpt_step == ts.step else None, last_ckpt)
        finally:
            if bar is not None:
                bar.close()
            metrics.close()
    # a signal after the last step's all-reduce is honoured too, now that every collective is behind us
    signum = stop_signal if stop_signal is not None else (signals[0] if signals else None)
    if signum is not None:
        raise TrainingInterrupted(f"{stopped} at step {ts.step}/{sched.total_steps}"
                                  + ("" if stop_signal is not None else f", then {signal.Signals(signum).name}")
                                  + f"; checkpoint {last_ckpt} (resume=auto continues from it)", signum, ts.step,
                                  last_ckpt)
    return result


def stop_at_once(run: Run, ts: TrainState, saver, signum: int, current, last_ckpt) -> None:
    """A second signal: keep a checkpoint of the last finished step (written now when there is none yet; on one
    process only, where no other rank has to take part), say which, and raise TrainingInterrupted."""
    if current is None and run.info.world_size == 1 and ts.step > 0:
        with contextlib.suppress(StopNow):  # a third signal does not stop the write: a few ms of a whole file
            current = saver.save(ts, ts.last_loss, tag="second signal")
    name = signal.Signals(signum).name
    if current is not None:
        kept = f"checkpoint {current} of step {ts.step} (resume=auto continues from it)"
    elif last_ckpt is not None:
        kept = f"steps after the last checkpoint {last_ckpt} are lost (resume=auto continues from it)"
    else:
        kept = "no checkpoint of this run was written (resume=auto starts again)"
    raise TrainingInterrupted(f"second {name}: stopped at once at step {ts.step}/{run.sched.total_steps}; {kept}",
                              signum, ts.step, current or last_ckpt) from None


def record_step(run: Run, ts: TrainState, ok: bool, loss: float, bar, images: int | None = None) -> None:
    """Count the step: a finite one's loss, or one more skipped step."""
    if ok:
        ts.bad_run = 0
        ts.last_loss = loss
        ts.recent_losses.append(loss)
    else:
        ts.bad_total += 1
        ts.bad_run += 1
        if bar is not None:
            bar.write(f"step {ts.step}: non-finite loss ({loss}); step skipped "
                      f"({ts.bad_run} in a row, {ts.bad_total} in all)")
    ts.step += 1
    ts.images_seen += run.sched.batch if images is None else images


def show_progress(bar, row: dict) -> None:
    if bar is None:
        return
    post = {"loss": f"{row['loss']:.4f}" if row["loss"] is not None else "nan",
            "lr": f"{row['lr']:.2e}", "img/s": f"{row['images_per_s']:.1f}"}
    if row["mfu"] is not None:
        post["mfu"] = mfu_text(row["mfu"])
    if row["data_wait"] >= DATA_WAIT_WARN:
        post["data wait"] = f"{100 * row['data_wait']:.0f}%"
    bar.set_postfix(post, refresh=False)


def finish(run: Run, ts: TrainState, window: Throughput, stopped: str, last_ckpt, t_loop: float,
           t_start: float) -> dict:
    """The run's result (``result.json``, curves.png, the summary lines on rank 0)."""
    cfg, run_dir = run.cfg, run.run_dir
    wall = ts.wall_before + time.perf_counter() - t_loop
    final_loss = float(np.mean(ts.recent_losses)) if ts.recent_losses else ts.last_loss
    steady_rate, steady_mfu, steady_wait = window.summary()
    result = {"checkpoint": str(last_ckpt) if last_ckpt else None, "images_seen": ts.images_seen,
              "wall_time_s": wall, "final_loss": final_loss, "last_step_loss": ts.last_loss,
              "run_dir": str(run_dir), "steps": ts.step,
              "total_steps": run.sched.total_steps, "skipped_steps": ts.bad_total, "stopped": stopped,
              "images_per_s": steady_rate, "mfu": steady_mfu, "data_wait": steady_wait, "startup_s": t_loop - t_start,
              "reconstruction": str(run_dir / "reconstruction.png"), "memory_plan": run.memory_plan,
              "compile_cold_start_s": run.cold_start.seconds if run.cold_start is not None else None}
    if not run.info.is_main:
        return result
    result["curves"] = curves.draw_or_warn(run_dir, lambda: curves.plot_runs([run_dir], run_dir / "curves.png"))
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    run.say(f"{stopped} at step {ts.step}/{run.sched.total_steps}: loss {final_loss:.4f} (mean of the last "
            f"{max(1, len(ts.recent_losses))} steps), {ts.images_seen} images, "
            f"{wall:.1f} s training ({ts.bad_total} skipped steps)\n"
            f"  checkpoint: {last_ckpt}\n  metrics:    {run_dir / 'metrics.jsonl'}"
            + (f"\n  picture:    {run_dir / 'reconstruction.png'}" if (run_dir / "reconstruction.png").exists() else "")
            + (f"\n  curves:     {result['curves']}" if result["curves"] else ""))
    if steady_wait is not None and steady_wait >= DATA_WAIT_WARN:
        spare = " if the CPU has cores to spare (training shares them here)" if run.device.type == "cpu" else ""
        run.say(f"  data:       training waited for data {100 * steady_wait:.0f}% of the time (rank 0): raise "
                f"num_workers (now {cfg.num_workers}){spare}, or write shards once (python -m "
                f"mae_fast.data.shards; bench/bench_data.py measures the options)")
    return result


def main(argv=None) -> int:
    """``mae-fast pretrain`` and ``torchrun train/pretrain.py``: exit 2 on bad input, 3 when the loss stays
    non-finite, 128 + the signal's number when a signal stopped the run."""
    from mae_fast.training.cli import run_command

    return run_command(argv, PretrainConfig, lambda cfg: pretrain(cfg), prog="mae-fast pretrain",
                       errors={NonFiniteLossError: 3})
