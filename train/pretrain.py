"""MAE pretraining: ``mae-fast pretrain [--config RECIPE] [key=value ...]`` or ``torchrun train/pretrain.py``.

With no arguments it pretrains the demo model on the demo images (a few minutes on a laptop CPU)
and writes checkpoints, ``metrics.jsonl`` and reconstruction PNGs to ``runs/demo``.

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
import os
import random
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mae_fast.data.base import DataError
from mae_fast.data.subset import SUBSET_MODES
from mae_fast.models.checkpoint import CheckpointError
from mae_fast.train import checkpoint_io, config as config_mod, curves, distributed as dist_mod

CHECKPOINT_VERSION = 1

# bf16 dense peak FLOP/s of one device (datasheet figures), matched against the device name
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12),
    ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("A10G", 70e12), ("A10", 125e12),
    ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; a checkpoint of the state was written to inspect."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped training at the end of a step, after a checkpoint of that step was
    written (``checkpoint``; ``resume=auto`` continues from it). A KeyboardInterrupt, so code that stops on
    Ctrl-C still does; ``signum`` says which signal (every rank raises it at the same step)."""

    def __init__(self, message: str, signum: int, step: int, checkpoint):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


@contextlib.contextmanager
def stop_requests(prog: str = "mae-fast pretrain"):
    """While training, SIGINT and SIGTERM ask for a stop at the end of the current step, with a checkpoint; a
    second one acts at once (``prog`` names the program in the notice). Yields the list of signals received. Only in the main thread and only where the
    signal still has Python's default handler, never over one a launcher installed (e.g. submitit's)."""
    received: list[int] = []
    previous = {}

    def handler(signum, frame):
        received.append(signum)
        signal.signal(signum, previous[signum])  # the next one acts at once
        print(f"\n{prog}: {signal.Signals(signum).name}: stopping at the end of this step with a "
              f"checkpoint (send it again to stop now)", file=sys.stderr, flush=True)

    if threading.current_thread() is threading.main_thread():
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(sig) is default:
                previous[sig] = signal.signal(sig, handler)
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------------------------
# data: deterministic order and per-sample seeding
# ---------------------------------------------------------------------------------------------
def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across processes and runs."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class SeededItems(torch.utils.data.Dataset):
    """Serves ``(epoch, index)`` keys; each item's random draws (torch, numpy, python) are seeded
    from (seed, epoch, index) and the caller's RNG states are left untouched. A dataset whose
    ``draws_only_torch_rng`` is true gets only torch's CPU generator seeded (and restored)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        s = _mix(self.seed, epoch, index)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also seed (and, before CUDA starts, queue with a
            # formatted stack) every accelerator's generator, which fork_rng(devices=[]) does not restore
            torch.default_generator.manual_seed(s)
            if getattr(self.dataset, "draws_only_torch_rng", False):
                return self.dataset[int(index)]
            py_state, np_state = random.getstate(), np.random.get_state()
            random.seed(s)
            np.random.seed(s % (2**32))
            try:
                return self.dataset[int(index)]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class StepBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of ``(epoch, index)`` keys for optimizer steps ``start_step .. total_steps-1``.

    Epoch e visits a permutation drawn from (seed, e); step s takes global batch s % steps_per_epoch
    of epoch s // steps_per_epoch (the tail that does not fill a batch is dropped). The global batch
    is cut into ``accum_steps x world_size`` equal micro-batches; this rank takes its own, in order.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, total_steps: int,
                 accum_steps: int = 1, world_size: int = 1, rank: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.accum, self.world, self.rank = accum_steps, world_size, rank
        self.steps_per_epoch = n // batch_size
        self.micro = batch_size // (accum_steps * world_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_mix(self.seed, 7919, epoch))
        return torch.randperm(self.n, generator=g)

    def global_batch(self, step: int) -> tuple[int, torch.Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch)
        return epoch, self.permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

    def __iter__(self):
        perm_epoch, perm = None, None
        for step in range(self.start_step, self.total_steps):
            epoch, i = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, self.permutation(epoch)
            chunks = perm[i * self.batch_size:(i + 1) * self.batch_size].view(self.accum, self.world, self.micro)
            for a in range(self.accum):
                yield [(epoch, int(j)) for j in chunks[a, self.rank]]

    def __len__(self):
        return (self.total_steps - self.start_step) * self.accum


class StreamBatches:
    """Micro-batches from an IterableDataset (e.g. WebDataset shards), epoch after epoch, with a
    resumable position (epoch, micro-batches taken in it). Resuming replays the epoch's stream and
    skips what was taken: the same samples in the same order when the stream is deterministic for
    an epoch (``set_epoch``), not bit-exact through shuffle buffers seeded otherwise."""

    def __init__(self, dataset, micro: int, num_workers: int, pin: bool, epoch: int = 0, index: int = 0):
        self.dataset, self.micro, self.num_workers, self.pin = dataset, micro, num_workers, pin
        self.epoch, self.index = epoch, index

    def __iter__(self):
        skip = self.index
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.micro, drop_last=True,
                                                 num_workers=self.num_workers, collate_fn=_images_only,
                                                 pin_memory=self.pin)
            taken = 0
            for i, batch in enumerate(loader):
                if i < skip:
                    continue
                taken += 1
                self.index = i + 1
                yield batch
            if taken == 0 and skip == 0:
                source = getattr(self.dataset, "source", None)
                skipped = getattr(self.dataset, "skipped", None)
                raise DataError(f"the data stream gave no full micro-batch of {self.micro} in epoch {self.epoch}"
                                   + (f" from {source}" if source is not None else "")
                                   + (f"; unreadable: {skipped[:3]}" if skipped else ""))
            skip, self.epoch, self.index = 0, self.epoch + 1, 0


def _images_only(batch):
    """Collate items that are tensors or (tensor, ...) tuples into an image batch."""
    imgs = [b[0] if isinstance(b, (tuple, list)) else b for b in batch]
    return torch.stack(imgs)


class SyntheticImages(torch.utils.data.Dataset):
    """Smooth random colour fields (a few low-frequency components), normalised like real images.

    Deterministic per index; learnable structure so the loss falls. For tests and benchmarks.
    """

    draws_only_torch_rng = True  # see SeededItems

    def __init__(self, size: int, img_size: int | tuple[int, int], seed: int = 0):
        self.size, self.seed = size, seed
        self.hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.record = {"source": "synthetic", "images": size, "img_size": list(self.hw)}
        self.skipped = []

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not 0 <= index < self.size:
            raise IndexError(index)
        g = torch.Generator().manual_seed(_mix(self.seed, 104729, index))
        coarse = torch.rand(1, 3, 4, 4, generator=g)
        img = torch.nn.functional.interpolate(coarse, size=self.hw, mode="bicubic", align_corners=False)[0]
        img = img + 0.05 * torch.randn(img.shape, generator=g)
        if torch.rand(()) < 0.5:  # a random flip from the (seeded) global RNG, like an augmentation
            img = img.flip(-1)
        return (img - 0.45) / 0.25


# the share of a logging window spent blocked on the data loader above which the trainer says so
DATA_WAIT_WARN = 0.1


def build_dataset(cfg: dict, img_size, is_main: bool):
    if cfg["data_source"] == "synthetic":
        return SyntheticImages(cfg["synthetic_size"], img_size, cfg["seed"])
    from mae_fast.data import build_pretrain_dataset

    kw = dict(source=cfg["data_source"], img_size=img_size, hours=cfg["hours"], subset=cfg["subset"],
              seed=cfg["seed"], fps=cfg["fps"], train=True)
    # rank 0 first: building may write the demo data or an index that the others then reuse
    if is_main:
        ds = build_pretrain_dataset(**kw)
        dist_mod.barrier()
    else:
        dist_mod.barrier()
        ds = build_pretrain_dataset(**kw)
    return ds


# ---------------------------------------------------------------------------------------------
# optimizer, schedule, precision, FLOPs
# ---------------------------------------------------------------------------------------------
# keys that define a run's trajectory: resuming with other values is allowed, with a warning
RESUME_MUST_MATCH = ("model", "model_kwargs", "img_size", "norm_pix_loss", "mask_ratio", "data_source", "hours",
                     "subset", "fps", "batch_size", "epochs", "steps", "seed", "lr", "base_lr", "lr_schedule",
                     "weight_decay", "warmup_steps", "warmup_epochs")

NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed", "dist_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norm weights (all 1-D), tokens and position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.split(".")[-1]
        if p.ndim <= 1 or leaf in NO_DECAY_NAMES or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: dict, lr: float, device: torch.device):
    betas = tuple(float(b) for b in cfg["betas"])
    if len(betas) != 2:
        raise config_mod.ConfigError(f"betas must be two numbers, got {cfg['betas']!r}")
    # fused AdamW exists for CUDA and CPU (4x faster than foreach on a 2-core CPU for ViT-S); others: foreach
    kw = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=lr, betas=betas, **kw)


def lr_at(step: int, peak: float, total: int, warmup: float, schedule: str, min_lr: float) -> float:
    """MAE's per-step schedule; ``warmup`` may be fractional (warmup_epochs x steps per epoch), as MAE's is."""
    if warmup > 0 and step < warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def autocast_dtype(precision: str, device: torch.device):
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise config_mod.ConfigError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def peak_flops_for(device: torch.device, override) -> tuple[float | None, str]:
    """Peak FLOP/s of one device: the override, a table for known GPUs, or a measured CPU matmul."""
    if override:
        return float(override), "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in PEAK_FLOPS:
            if key in name:
                return val, f"table ({name})"
        return None, f"unknown GPU {name}"
    # CPU: the best of a few fp32 matmuls stands in for the peak (other load on the machine lowers it); the
    # operand comes from a generator of its own: a draw from the global one would move the RNG state that a
    # resume has just restored, so the resumed run would go on from another state than the uninterrupted one
    size = 1024
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best, "measured CPU fp32 matmul"


# ---------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------
def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except (RuntimeError, IndexError) as e:
            warnings.warn(f"could not restore CUDA RNG state: {e}", RuntimeWarning)


# ---------------------------------------------------------------------------------------------
# run directory and logging
# ---------------------------------------------------------------------------------------------
def resolve_run_dir(cfg: dict) -> Path:
    """runs/<name>; a fresh run (no resume) never writes into a directory that has checkpoints."""
    base = Path(cfg["output_dir"]) / str(cfg["name"] or "run")
    if cfg["resume"] is not None:
        return base
    run_dir, k = base, 1
    while checkpoint_io.list_checkpoints(run_dir):
        k += 1
        run_dir = base.with_name(f"{base.name}-{k}")
    return run_dir


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled, self.path, self.tb = enabled, run_dir / "metrics.jsonl", None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self.tb.add_scalar(k, v, row["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _say(info, msg: str) -> None:
    if info.is_main:
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# the training run
# ---------------------------------------------------------------------------------------------
def pretrain(config: dict | None = None, *, dataset=None) -> dict:
    """Pretrain an MAE. ``config`` holds recipe keys (see train/recipes/demo.yaml; ``recipe`` picks
    the base recipe, default demo). Returns checkpoint, images_seen, wall_time_s, final_loss, run_dir
    (plus steps, skipped_steps, ...). ``dataset`` replaces the configured data (a map-style dataset
    of (3, H, W) tensors)."""
    cfg = config_mod.build_config(config, config_mod.PRETRAIN_KEYS)
    _check_choices(cfg)
    # a non-finite-loss stop happens at the same step on every rank: the loss it checks is reduced over ranks
    with dist_mod.process_group(cfg["device"], finished_on=(NonFiniteLossError, TrainingInterrupted)) as info:
        return _pretrain(cfg, info, dataset)


def _check(cfg: dict, world: int) -> None:
    B, A = cfg["batch_size"], cfg["accum_steps"]
    if B < 1 or A < 1:
        raise config_mod.ConfigError(f"batch_size ({B}) and accum_steps ({A}) must be positive")
    if B % (A * world):
        raise config_mod.ConfigError(f"batch_size {B} must be divisible by accum_steps x world_size = {A * world}")
    if not 0.0 < cfg["mask_ratio"] < 1.0:  # 0 masks no patch: the loss (over masked patches) would be NaN
        raise config_mod.ConfigError(f"mask_ratio must be in (0, 1), got {cfg['mask_ratio']}")
    if cfg["lr_schedule"] not in ("cosine", "constant"):
        raise config_mod.ConfigError(f"lr_schedule must be cosine or constant, got {cfg['lr_schedule']!r}")
    if cfg["compile_scope"] not in ("model", "blocks"):
        raise config_mod.ConfigError(f"compile_scope must be model or blocks, got {cfg['compile_scope']!r}")
    if cfg["max_bad_steps"] < 1:
        raise config_mod.ConfigError("max_bad_steps must be at least 1")
    if cfg["resume"] not in (None, "auto") and not Path(cfg["resume"]).is_file():
        raise config_mod.ConfigError(f"resume must be null, auto or an existing checkpoint file, got {cfg['resume']!r}")
    if cfg["checkpoint_every"] < 1 or cfg["log_every"] < 1:
        raise config_mod.ConfigError("checkpoint_every and log_every must be at least 1")
    for key in ("lr", "base_lr", "fps", "clip_grad"):
        if cfg[key] is not None and not cfg[key] > 0:
            raise config_mod.ConfigError(f"{key} must be a positive number, got {cfg[key]!r}")
    for key in ("num_workers", "warmup_steps", "warmup_epochs", "min_lr", "weight_decay", "vis_every", "vis_images",
                "keep_checkpoints", "synthetic_size"):
        if cfg[key] is not None and cfg[key] < 0:
            raise config_mod.ConfigError(f"{key} must not be negative, got {cfg[key]!r}")


# keys with a fixed set of values, checked before the process group starts and the data is built
CHOICES = {"device": ("auto", "cpu", "cuda"), "distributed": ("auto", "ddp", "fsdp", "none"),
           "precision": ("auto", "bf16", "fp16", "fp32"), "subset": SUBSET_MODES}


def _check_choices(cfg: dict, keys=("device", "distributed", "precision", "subset")) -> None:
    for key in keys:
        if cfg[key] not in CHOICES[key]:
            raise config_mod.ConfigError(f"{key} must be one of {', '.join(CHOICES[key])}, got {cfg[key]!r}")


def _create_model(name: str, **kw):
    """``create_model``, its complaints about the name or the overrides (unknown model, img_size not a
    multiple of the patch size, unknown model_kwargs) raised as ``ConfigError``."""
    from mae_fast import create_model

    try:
        return create_model(name, **kw)
    except (ValueError, TypeError) as e:
        raise config_mod.ConfigError(f"model {name!r}: {e}") from e


def memory_job(cfg: dict, model, micro: int, amp_dtype, strategy: str, world_size: int, limit: int) -> dict:
    """What :func:`plan_memory` needs for a run of ``cfg`` (pretraining keys) on ``model`` (built or on the meta
    device): the per-device micro-batch, the configured savers, DDP's gradient buckets or the FSDP2 world."""
    blocks = len(model.blocks) + len(model.decoder_blocks)
    ck = cfg["grad_checkpointing"]
    return dict(model=cfg["model"], img_size=model.img_size, micro=micro, mask_ratio=cfg["mask_ratio"],
                amp_dtype=amp_dtype, norm_pix_loss=bool(cfg["norm_pix_loss"]),
                model_kwargs={k: v for k, v in (cfg["model_kwargs"] or {}).items() if k != "img_size"},
                extra=4 * sum(p.numel() for p in model.parameters()) if strategy == "ddp" else 0,  # DDP's buckets
                fsdp_world=world_size if strategy == "fsdp" else None, limit=limit, blocks=blocks,
                lean=bool(cfg["lean_activations"]), checkpointed=blocks if ck is True else int(ck))


def plan_memory(job: dict) -> tuple:
    """(plan or None, {plan: estimated peak}) for ``job`` (see :func:`fit_memory_budget`). With ``fsdp_world`` the
    model is sharded as ``distributed=fsdp`` shards it, over a simulated process group: call it in a process
    that has no process group of its own."""
    from mae_fast.memory import estimate_mae_step, fake_process_group, plan_for_budget

    with contextlib.ExitStack() as stack:
        prepare = None
        if job["fsdp_world"]:
            mesh = stack.enter_context(fake_process_group(job["fsdp_world"]))
            prepare = lambda m: dist_mod.shard_model(m, mesh=mesh)  # noqa: E731

        def peak_of(plan):
            return estimate_mae_step(job["model"], job["img_size"], job["micro"], lean=plan.lean,
                                     grad_checkpointing=plan.checkpointed, mask_ratio=job["mask_ratio"],
                                     amp_dtype=job["amp_dtype"], extra_bytes=job["extra"], prepare=prepare,
                                     norm_pix_loss=job["norm_pix_loss"], **job["model_kwargs"]).peak

        return plan_for_budget(peak_of, job["limit"], job["blocks"], job["lean"], job["checkpointed"])


def largest_micro_batch(job: dict, limit: int) -> int:
    """The largest micro-batch (at most ``limit``) whose step fits ``job['limit']`` with every block checkpointed."""
    from mae_fast.memory import estimate_mae_step, fit_batch

    def peak(n):
        return estimate_mae_step(job["model"], job["img_size"], n, lean=True, grad_checkpointing=True,
                                 mask_ratio=job["mask_ratio"], amp_dtype=job["amp_dtype"], extra_bytes=job["extra"],
                                 norm_pix_loss=job["norm_pix_loss"], **job["model_kwargs"]).peak

    return fit_batch(peak, job["limit"], limit=max(limit, 1))


def _plan_in_subprocess(job: dict) -> tuple:
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(plan_memory, job).result()


def fit_memory_budget(cfg: dict, model, micro: int, strategy: str, device, amp_dtype, info) -> dict | None:
    """Make the step fit ``memory_budget_gib``: estimate its peak per device (``mae_fast.memory``: fake tensors,
    seconds; DDP's gradient buckets counted, FSDP2's sharding simulated in a subprocess on rank 0) and, when the
    configured plan would not fit, turn on lean activations, then checkpoint the fewest blocks (decoder first).
    Neither changes the data order or the loss. Returns what was decided."""
    from mae_fast.memory import GiB, Plan
    from mae_fast.models import mae_recompute_pct

    budget = cfg["memory_budget_gib"]
    if budget is None or (budget == "auto" and device.type != "cuda"):
        return None
    limit = int(0.9 * torch.cuda.get_device_properties(device).total_memory if budget == "auto" else budget * GiB)
    job = memory_job(cfg, model, micro, amp_dtype, strategy, info.world_size, limit)
    blocks = job["blocks"]
    start = Plan(job["lean"], job["checkpointed"], blocks)
    outcome = None
    if info.is_main or strategy != "fsdp":
        try:
            outcome = _plan_in_subprocess(job) if strategy == "fsdp" else plan_memory(job)
        except Exception as e:  # noqa: BLE001 - a planning aid must not stop a run it cannot model
            outcome = f"{type(e).__name__}: {e}"
    if strategy == "fsdp":
        outcome = dist_mod.broadcast_object(outcome)
    if isinstance(outcome, str):
        _say(info, f"memory: could not estimate the step ({outcome}); memory_budget_gib not checked")
        return None
    found, tried = outcome
    if found is None:
        hint = "raise accum_steps"
        if strategy != "fsdp":  # the largest micro-batch that fits, fully checkpointed, makes the hint concrete
            try:
                fits = largest_micro_batch(job, micro - 1)
                A, world = cfg["accum_steps"], info.world_size
                accum = next((a for a in range(A + 1, cfg["batch_size"] // world + 1)
                              if cfg["batch_size"] % (a * world) == 0 and cfg["batch_size"] // (a * world) <= fits),
                             None) if fits else None
                if accum:
                    hint = f"raise accum_steps to {accum} (a micro-batch of {fits} fits with every block checkpointed)"
            except Exception:  # noqa: BLE001 - only a hint
                pass
        raise config_mod.ConfigError(
            f"a micro-batch of {micro} needs about {tried[Plan(True, blocks, blocks)] / GiB:.1f} GiB per device even "
            f"with every block checkpointed, over the {limit / GiB:.1f} GiB budget: {hint} (the batch stays "
            f"{cfg['batch_size']}), shard with distributed=fsdp, or set memory_budget_gib")
    model.set_lean_activations(found.lean)
    model.set_grad_checkpointing(found.checkpointed if found.checkpointed < blocks else True)
    recompute = mae_recompute_pct(model, cfg["mask_ratio"])
    if found != start:
        _say(info, f"memory: estimated peak {tried[start] / GiB:.1f} GiB per device is over the {limit / GiB:.1f} GiB "
                   f"budget; training with {found.describe()} instead (estimated {tried[found] / GiB:.1f} GiB, "
                   f"{recompute:.1f}% more FLOPs)")
    else:
        _say(info, f"memory: estimated peak {tried[found] / GiB:.1f} GiB per device, within the "
                   f"{limit / GiB:.1f} GiB budget ({found.describe()})")
    return dict(budget_gib=round(limit / GiB, 3), estimated_peak_gib=round(tried[found] / GiB, 3),
                estimated_peak_bytes=tried[found], lean_activations=found.lean, checkpointed_blocks=found.checkpointed,
                recompute_flops_pct=round(recompute, 2), changed=found != start, strategy=strategy)


def _pretrain(cfg: dict, info, dataset) -> dict:
    from mae_fast.models import mae_train_flops
    from mae_fast.train import visualize

    t_start = time.perf_counter()
    _check(cfg, info.world_size)
    device = info.device
    amp_dtype = autocast_dtype(cfg["precision"], device)

    # model: identical init on every rank
    torch.manual_seed(cfg["seed"])
    kw = dict(cfg["model_kwargs"] or {})
    if cfg["img_size"] is not None:
        kw["img_size"] = cfg["img_size"]
    kw["norm_pix_loss"] = bool(cfg["norm_pix_loss"])
    model = _create_model(cfg["model"], **kw).to(device)
    if model.num_visible(cfg["mask_ratio"]) < 1:
        raise config_mod.ConfigError(f"mask_ratio={cfg['mask_ratio']} leaves no visible patch out of "
                                     f"{model.num_patches}: lower it")
    model.set_grad_checkpointing(cfg["grad_checkpointing"])
    if cfg["lean_activations"]:
        model.set_lean_activations(True)
    img_size = model.img_size

    # data
    ds = dataset if dataset is not None else build_dataset(cfg, img_size[0] if img_size[0] == img_size[1]
                                                            else img_size, info.is_main)
    streaming = isinstance(ds, torch.utils.data.IterableDataset)
    try:
        n = len(ds)
    except TypeError:  # a stream of unknown length
        n = None
    B, A = cfg["batch_size"], cfg["accum_steps"]
    micro = B // (A * info.world_size)
    steps_per_epoch = n // B if n is not None else None
    if steps_per_epoch is None:
        if cfg["steps"] is None or (cfg["warmup_steps"] is None and cfg["warmup_epochs"]):
            raise config_mod.ConfigError("the data is a stream of unknown length: set steps (and warmup_steps)")
        steps_per_epoch = max(1, int(cfg["steps"]))  # only for the epoch column of the logs
    elif steps_per_epoch < 1:
        raise config_mod.ConfigError(f"the dataset has {n} images, fewer than one batch_size ({B})")
    total_steps = int(cfg["steps"]) if cfg["steps"] is not None else int(round(cfg["epochs"] * steps_per_epoch))
    if total_steps < 1:
        raise config_mod.ConfigError("the run has no steps: raise epochs or steps")
    warmup = (int(cfg["warmup_steps"]) if cfg["warmup_steps"] is not None
              else float(cfg["warmup_epochs"]) * steps_per_epoch)  # not rounded: MAE warms up by fractional epoch
    peak_lr = float(cfg["lr"]) if cfg["lr"] is not None else cfg["base_lr"] * B / 256

    strategy = dist_mod.choose_strategy(cfg["distributed"], model, info)
    memory_plan = fit_memory_budget(cfg, model, micro, strategy, device, amp_dtype, info)
    train_model = dist_mod.wrap_model(model, strategy, info)
    optimizer = build_optimizer(model, cfg, peak_lr, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    # run directory (rank 0 decides) and resume
    run_dir = Path(dist_mod.broadcast_object(str(resolve_run_dir(cfg)) if info.is_main else None))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_io.clean_temporaries(run_dir)
    dist_mod.barrier()
    state = None
    if cfg["resume"] == "auto":
        found = checkpoint_io.latest_valid_checkpoint(run_dir)
        if found is not None:
            state_path, state = found
            _say(info, f"resuming from {state_path}")
        else:
            _say(info, f"resume=auto: no checkpoint in {run_dir}, starting fresh")
    elif cfg["resume"] is not None:
        state = checkpoint_io.load_checkpoint(cfg["resume"])
        _say(info, f"resuming from {cfg['resume']}")

    start_step, images_seen, bad_total, bad_run, wall_before, last_loss = 0, 0, 0, 0, 0.0, float("nan")
    recent_losses = collections.deque(maxlen=20)  # final_loss: their mean (one step's loss is noisy)
    if state is not None:
        if "optimizer" not in state or "step" not in state:
            raise CheckpointError("the checkpoint holds weights only (no optimizer/step); pass it as an init, "
                               "not as resume")
        old = state.get("config") or {}
        changed = [k for k in RESUME_MUST_MATCH if k in old and old[k] != cfg[k]]
        try:
            dist_mod.load_full_state_dicts(model, optimizer, state["model"], state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:  # another model's weights or optimizer
            src = state_path if cfg["resume"] == "auto" else cfg["resume"]
            differs = (" (made with a different " + ", ".join(f"{k} ({old[k]!r} -> {cfg[k]!r})" for k in changed)
                       + ")") if changed else ""
            raise CheckpointError(f"cannot resume from {src}: it does not fit this model{differs}; start a new run "
                                  f"(resume=null or another name) or resume with its settings. "
                                  f"{' '.join(str(e).split())[:300]}") from e
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if changed and info.is_main:
            warnings.warn("resuming with a different " + ", ".join(f"{k} ({old[k]!r} -> {cfg[k]!r})" for k in changed)
                          + ": the continuation is not the run that was started", RuntimeWarning, stacklevel=2)
        start_step = int(state["step"])
        if info.is_main and cfg["resume"] != "auto":
            aside = checkpoint_io.set_aside_later(run_dir, start_step)
            if aside is not None:
                _say(info, f"checkpoints of steps after {start_step} belong to the continuation this resume abandons: "
                           f"moved to {aside}, so resume=auto goes on with this one")
        images_seen = int(state.get("images_seen", start_step * B))
        bad_total, bad_run = int(state.get("skipped_steps", 0)), int(state.get("bad_in_a_row", 0))
        wall_before = float(state.get("wall_time_s", 0.0))
        last_loss = float(state.get("loss", float("nan")))
        rngs = state.get("rng") or []
        if rngs:
            set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])

    if cfg["compile"]:
        if cfg["compile_scope"] == "blocks":
            # regional compilation: every block has the same code, so one compiled graph serves them all
            # (much shorter cold start than the whole model; the glue between blocks stays eager)
            for blk in list(model.blocks) + list(model.decoder_blocks):
                blk.compile()
        else:
            train_model.compile()

    # loader from the resume position
    if streaming:
        pos = (state or {}).get("stream_positions") or []
        ep, idx = pos[info.rank] if len(pos) == info.world_size else (0, 0)
        stream = StreamBatches(ds, micro, cfg["num_workers"], device.type == "cuda", ep, idx)
        loader = stream
    else:
        stream = None
        sampler = StepBatchSampler(n, B, cfg["seed"], start_step, total_steps, A, info.world_size, info.rank)
        loader = torch.utils.data.DataLoader(
            SeededItems(ds, cfg["seed"]), batch_sampler=sampler, num_workers=cfg["num_workers"],
            collate_fn=_images_only, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg["seed"]),
            persistent_workers=False, prefetch_factor=4 if cfg["num_workers"] > 0 else None)

    flops_per_image = mae_train_flops(model, cfg["mask_ratio"])
    peak, peak_src = peak_flops_for(device, cfg["peak_flops"])
    mean, std = getattr(ds, "mean", None), getattr(ds, "std", None)
    vis_batch = None
    if info.is_main or strategy == "fsdp":
        if streaming:
            first = []
            for item in ds:
                first.append(item)
                if len(first) >= cfg["vis_images"]:
                    break
            vis_batch = _images_only(first) if first else None
        elif cfg["vis_images"] > 0:
            k_vis = min(cfg["vis_images"], n)  # spread over the data (neighbouring video frames look alike)
            vis_batch = torch.stack([_images_only([SeededItems(ds, cfg["seed"])[(0, i * n // k_vis)]])[0]
                                     for i in range(k_vis)])

    metrics = MetricsLog(run_dir, info.is_main)
    if info.is_main:
        (run_dir / "config.yaml").write_text(config_mod.dump(cfg))
        rec = getattr(ds, "record", None)
        if rec is not None:
            (run_dir / "data_record.json").write_text(json.dumps(rec, indent=1, default=str))
        n_params = sum(p.numel() for p in model.parameters())
        _say(info, f"run dir: {run_dir.resolve()}\n"
                   f"model {cfg['model']} ({n_params / 1e6:.2f}M params, {img_size[0]}x{img_size[1]}), "
                   f"{n if n is not None else 'a stream of'} images, batch {B} (micro {micro} x accum {A} x {info.world_size} ranks), "
                   f"{total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs), lr {peak_lr:.3g}, "
                   f"device {device}, {strategy if strategy != 'none' else 'single process'}, "
                   f"precision {amp_dtype or torch.float32}; MFU peak {peak_src}")

    def save(step: int, loss: float, tag: str = "") -> Path | None:
        msd, osd = dist_mod.full_state_dicts(model, optimizer)
        rngs = dist_mod.all_gather_objects(rng_state())
        positions = dist_mod.all_gather_objects((stream.epoch, stream.index)) if stream is not None else None
        path = None
        if info.is_main:
            epoch, index = divmod(step, steps_per_epoch)
            ckpt = {"model": msd, "optimizer": osd, "scaler": scaler.state_dict() if scaler else None,
                    "step": step, "epoch": epoch, "index_in_epoch": index, "images_seen": images_seen,
                    "total_steps": total_steps, "skipped_steps": bad_total, "bad_in_a_row": bad_run,
                    "loss": loss, "rng": rngs, "config": cfg, "world_size": info.world_size,
                    "wall_time_s": wall_before + time.perf_counter() - t_loop, "version": CHECKPOINT_VERSION,
                    "note": tag, "stream_positions": positions}
            path = checkpoint_io.save_checkpoint(ckpt, run_dir, step, cfg["keep_checkpoints"])
        # every rank returns the path (a later stage, e.g. the scaling runner's evaluation, loads it on every
        # rank); receiving it also waits for rank 0 to finish writing
        return dist_mod.broadcast_object(path, src=0)

    def picture(step: int) -> Path | None:
        if vis_batch is None:
            return None
        path = run_dir / "reconstructions" / f"step-{step:08d}.png"
        fwd = train_model if strategy == "fsdp" else model.forward
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            out = visualize.save_reconstruction_grid(
                model, vis_batch.to(device), path if info.is_main else None, cfg["mask_ratio"],
                mean=mean, std=std, seed=cfg["seed"], forward=fwd)
        if info.is_main:
            latest = run_dir / "reconstruction.png"
            latest.write_bytes(path.read_bytes())
        return out

    debug_nan = set(int(s) for s in cfg["debug_nan_steps"])
    stop_at = cfg["stop_at_step"]
    bar = None
    if info.is_main and cfg["progress"]:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", dynamic_ncols=True,
                   mininterval=1.0, file=sys.stdout)

    L = model.num_patches
    it = iter(loader)
    t_loop = time.perf_counter()
    t_window, imgs_window, data_wait_window = time.perf_counter(), 0, 0.0
    losses_window = []
    step = start_step
    last_ckpt, last_ckpt_step = None, None
    stopped = "finished"
    time_up = False
    stop_signal = None  # SIGINT / SIGTERM on any rank: all stop at the end of the same step
    rate, mfu = 0.0, None
    steady = {"images": 0, "seconds": 0.0, "windows": 0, "data_wait_s": 0.0}  # all windows but the first (warm-up)

    def log_window(lr, grad_norm):
        nonlocal t_window, imgs_window, losses_window, rate, mfu, data_wait_window
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t_window
        rate = imgs_window / dt if dt > 0 else 0.0
        mfu = flops_per_image * rate / (peak * info.world_size) if peak else None
        if steady["windows"] > 0:
            steady["images"] += imgs_window
            steady["seconds"] += dt
            steady["data_wait_s"] += data_wait_window
        steady["windows"] += 1
        data_wait = min(1.0, data_wait_window / dt) if dt > 0 else 0.0
        row = {"step": step, "epoch": round(step / steps_per_epoch, 4),
               "loss": float(np.mean(losses_window)) if losses_window else None,
               "lr": lr, "images_per_s": round(rate, 2), "mfu": mfu, "data_wait": round(data_wait, 4),
               "grad_norm": grad_norm,
               "skipped_steps": bad_total, "images_seen": images_seen,
               "time_s": round(wall_before + time.perf_counter() - t_loop, 3)}
        metrics.write(row)
        if bar is not None:
            post = {"loss": f"{row['loss']:.4f}" if row["loss"] is not None else "nan",
                    "lr": f"{lr:.2e}", "img/s": f"{rate:.1f}"}
            if mfu is not None:
                post["mfu"] = f"{100 * mfu:.1f}%"
            if data_wait >= DATA_WAIT_WARN:
                post["data wait"] = f"{100 * data_wait:.0f}%"
            bar.set_postfix(post, refresh=False)
        t_window, imgs_window, losses_window, data_wait_window = time.perf_counter(), 0, [], 0.0
    train_model.train()
    handlers = contextlib.ExitStack()
    signals = handlers.enter_context(stop_requests())
    try:
        while step < total_steps:
            if stop_at is not None and step >= int(stop_at):
                stopped = f"stop_at_step={stop_at}"
                break
            if time_up:
                stopped = f"time_limit_s={cfg['time_limit_s']}"
                break
            if stop_signal is not None:
                stopped = f"signal {signal.Signals(stop_signal).name}"
                break
            lr = lr_at(step, peak_lr, total_steps, warmup, cfg["lr_schedule"], cfg["min_lr"])
            for g in optimizer.param_groups:
                g["lr"] = lr
            g_noise = torch.Generator().manual_seed(_mix(cfg["seed"], 15485863, step))
            noise_all = torch.rand(B, L, generator=g_noise).view(A, info.world_size, micro, L)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for a in range(A):
                t_data = time.perf_counter()
                imgs = next(it)  # the time blocked here is the time the GPU (or CPU) waited for data
                data_wait_window += time.perf_counter() - t_data
                imgs = imgs.to(device, non_blocking=True)
                noise = noise_all[a, info.rank].to(device, non_blocking=True)
                sync = a == A - 1
                ctx = train_model.no_sync() if (strategy == "ddp" and not sync) else nullcontext()
                if strategy == "fsdp":
                    train_model.set_requires_gradient_sync(sync)
                with ctx:
                    with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                        loss = train_model(imgs, mask_ratio=cfg["mask_ratio"], noise=noise, masked_only=True).loss
                    if step in debug_nan:
                        loss = loss * float("nan")
                    scaled = loss / A
                    (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += loss.detach().float()
            # one all-reduce gives every rank the mean loss (non-finite if any rank's is) and whether any
            # rank is past the time limit or got SIGTERM / SIGINT, so all ranks stop at the same step
            over_time = cfg["time_limit_s"] is not None and time.perf_counter() - t_loop > cfg["time_limit_s"]
            flags = [float(over_time), float(signal.SIGTERM in signals), float(signal.SIGINT in signals)]
            shared = torch.stack([loss_sum / (A * info.world_size), *(loss_sum.new_full((), f) for f in flags)])
            shared = dist_mod.all_reduce_sum(shared).tolist()
            step_loss, time_up = shared[0], shared[1] > 0
            if shared[2] > 0 or shared[3] > 0:
                stop_signal = signal.SIGTERM if shared[2] > 0 else signal.SIGINT
            grad_norm = None
            ok = math.isfinite(step_loss)
            if ok:
                if scaler:
                    scaler.unscale_(optimizer)
                if cfg["clip_grad"] is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"]))
                    ok = math.isfinite(grad_norm) or scaler is not None
            if ok:
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                bad_run = 0
                last_loss = step_loss
                recent_losses.append(step_loss)
                losses_window.append(step_loss)
            else:
                optimizer.zero_grad(set_to_none=True)
                bad_total += 1
                bad_run += 1
                if bar is not None:
                    bar.write(f"step {step}: non-finite loss ({step_loss}); step skipped "
                              f"({bad_run} in a row, {bad_total} in all)")
            step += 1
            images_seen += B
            imgs_window += B

            if bad_run >= cfg["max_bad_steps"]:
                path = save(step, step_loss, tag="non-finite")
                raise NonFiniteLossError(
                    f"{bad_run} non-finite losses in a row (max_bad_steps={cfg['max_bad_steps']}) at step {step}; "
                    f"stopped. State saved to inspect: {path or run_dir / 'checkpoints'}")

            if step % cfg["log_every"] == 0 or step == total_steps:
                log_window(lr, grad_norm)
            if bar is not None:
                bar.update(1)
            if cfg["debug_step_sleep_s"]:
                time.sleep(cfg["debug_step_sleep_s"])
            t_aside = time.perf_counter()  # checkpoint and picture time stays out of images/s
            if step % cfg["checkpoint_every"] == 0 and step < total_steps:
                last_ckpt, last_ckpt_step = save(step, last_loss), step
            if cfg["vis_every"] and step % cfg["vis_every"] == 0 and step < total_steps:
                picture(step)
            t_window += time.perf_counter() - t_aside
        if imgs_window:
            log_window(lr, grad_norm)
    finally:
        handlers.close()
        if bar is not None:
            bar.close()
        metrics.close()

    if last_ckpt_step != step:
        last_ckpt = save(step, last_loss)
    if stop_signal is None:  # a stop on a signal is kept short (SIGTERM comes with a grace period)
        picture(step)
    wall = wall_before + time.perf_counter() - t_loop
    final_loss = float(np.mean(recent_losses)) if recent_losses else last_loss
    # throughput after the first logging window (which holds compilation and warm-up), else the last
    steady_rate = steady["images"] / steady["seconds"] if steady["seconds"] > 0 else rate
    steady_mfu = flops_per_image * steady_rate / (peak * info.world_size) if peak else None
    steady_wait = steady["data_wait_s"] / steady["seconds"] if steady["seconds"] > 0 else None
    result = {"checkpoint": str(last_ckpt) if last_ckpt else None, "images_seen": images_seen,
              "wall_time_s": wall, "final_loss": final_loss, "last_step_loss": last_loss,
              "run_dir": str(run_dir), "steps": step,
              "total_steps": total_steps, "skipped_steps": bad_total, "stopped": stopped,
              "images_per_s": steady_rate, "mfu": steady_mfu, "data_wait": steady_wait, "startup_s": t_loop - t_start,
              "reconstruction": str(run_dir / "reconstruction.png"), "memory_plan": memory_plan}
    if info.is_main:
        result["curves"] = curves.draw_or_warn(run_dir, lambda: curves.plot_runs([run_dir], run_dir / "curves.png"))
        (run_dir / "result.json").write_text(json.dumps(result, indent=1))
        _say(info, f"{stopped} at step {step}/{total_steps}: loss {final_loss:.4f} (mean of the last "
                   f"{max(1, len(recent_losses))} steps), {images_seen} images, "
                   f"{wall:.1f} s training ({bad_total} skipped steps)\n"
                   f"  checkpoint: {last_ckpt}\n  metrics:    {run_dir / 'metrics.jsonl'}\n"
                   f"  picture:    {run_dir / 'reconstruction.png'}"
                   + (f"\n  curves:     {result['curves']}" if result["curves"] else ""))
        if steady_wait is not None and steady_wait >= DATA_WAIT_WARN:
            spare = " if the CPU has cores to spare (training shares them here)" if device.type == "cpu" else ""
            _say(info, f"  data:       training waited for data {100 * steady_wait:.0f}% of the time (rank 0): raise "
                       f"num_workers (now {cfg['num_workers']}){spare}, or write shards once (python -m "
                       f"mae_fast.data.shards; bench/bench_data.py measures the options)")
    # a signal after the last step's all-reduce is honoured too, now that every collective is behind us
    signum = stop_signal if stop_signal is not None else (signals[0] if signals else None)
    if signum is not None:
        raise TrainingInterrupted(f"{stopped} at step {step}/{total_steps}"
                                  + ("" if stop_signal is not None else f", then {signal.Signals(signum).name}")
                                  + f"; checkpoint {last_ckpt} (resume=auto continues from it)", signum, step, last_ckpt)
    return result


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(config_mod.help_text(config_mod.PRETRAIN_KEYS, "mae-fast pretrain"))
        return 0
    try:
        cfg = config_mod.config_from_argv(argv, config_mod.PRETRAIN_KEYS, "demo")
    except config_mod.ConfigError as e:
        print(f"mae-fast pretrain: {e}", file=sys.stderr)
        return 2
    try:
        pretrain(dict(cfg, recipe=None))
    except (config_mod.ConfigError, FileNotFoundError, CheckpointError, DataError) as e:  # the user's input: no traceback
        print(f"mae-fast pretrain: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"mae-fast pretrain: {e}", file=sys.stderr)
        return 3
    except TrainingInterrupted as e:  # the summary above says where; exit as the signal would have
        print(f"mae-fast pretrain: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    return 0


if __name__ == "__main__":
    sys.exit(main())
