"""Mixed-resolution pretraining: resolutions drawn per image or per step, packed batches under a token budget,
resolution phases, and starting from another run's weights (``init_from``).

A pretraining run uses a :class:`StepPlan` when a recipe sets any of ``img_sizes``, ``packing``,
``tokens_per_batch`` or ``phases``. Each step's batch is then a pure function of (seed, step):

- its images are drawn uniformly at random from the data (with replacement across steps, none within a step),
  each augmented from a generator seeded by (seed, step, index) and resized to its resolution;
- with ``packing: true`` each image draws its own resolution from ``img_sizes`` (``img_size_weights``: relative
  weights) and the step's images go through :meth:`MaskedAutoencoderViT.forward_packed` (visible tokens of all
  images in one sequence); otherwise the step draws one resolution for all its images;
- the step holds ``batch_size`` images, or as many as fit ``tokens_per_batch`` patches (at least one);
- ``phases`` is a list of ``{steps: N, <key>: value}``, each overriding ``img_size``, ``img_sizes``,
  ``img_size_weights``, ``batch_size``, ``tokens_per_batch`` or ``packing`` for its N steps; the run's length is
  their sum. E.g. most steps at 224 px, the last few percent at 476 px.

So a resumed run replays the uninterrupted one across phase boundaries too. The model keeps its own size (its
checkpoints, its picture); other grids get their position tables at forward time. The step's loss is the mean
over all removed patches of all its images (accumulation micro-steps are weighted by their removed patches).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mae_fast.data.samplers import SeededItems, mix_seed
from mae_fast.training.config import ConfigError

PHASE_KEYS = ("img_size", "img_sizes", "img_size_weights", "batch_size", "tokens_per_batch", "packing")


def uses_plan(cfg) -> bool:
    """Whether the run draws its batches from a :class:`StepPlan` (any of its keys set)."""
    return bool(cfg.img_sizes or cfg.packing or cfg.tokens_per_batch or cfg.phases)


@dataclass
class Phase:
    start: int                 # first step
    steps: int | None          # None: until the end of the run (no phases)
    sizes: list[int]
    weights: list[float]
    batch: int
    tokens: int | None
    packing: bool


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a whole number >= 1, got {value!r}")
    return value


def _phase(settings: dict, start: int, steps, patch: int, default_size, where: str) -> Phase:
    size = settings.get("img_size") if settings.get("img_size") is not None else default_size
    sizes = settings.get("img_sizes") or [size]
    if not isinstance(sizes, (list, tuple)) or not sizes:
        raise ConfigError(f"{where}img_sizes must be a list of resolutions, got {sizes!r}")
    for s in sizes:
        _positive_int(s, f"{where}img_sizes / img_size (a square side in pixels, in this mode)")
        if s % patch:
            raise ConfigError(f"{where}resolution {s} is not a multiple of the patch size {patch}")
    weights = settings.get("img_size_weights") or [1.0] * len(sizes)
    if len(weights) != len(sizes) or any(not isinstance(w, (int, float)) or w < 0 for w in weights) \
            or not sum(weights) > 0:
        raise ConfigError(f"{where}img_size_weights must be {len(sizes)} non-negative numbers (one per size, "
                          f"not all 0), got {weights!r}")
    tokens = settings.get("tokens_per_batch")
    if tokens is not None:
        _positive_int(tokens, f"{where}tokens_per_batch")
    return Phase(start, steps, [int(s) for s in sizes], [float(w) for w in weights],
                 _positive_int(settings.get("batch_size"), f"{where}batch_size"), tokens,
                 bool(settings.get("packing")))


class StepPlan:
    """What each step trains on: its phase, the resolution of each image, how many images (see module doc)."""

    def __init__(self, cfg, patch_size: int, model_size: tuple[int, int]):
        self.seed, self.patch, self.mask_ratio = cfg.seed, patch_size, cfg.mask_ratio
        default = cfg.img_size if cfg.img_size is not None else model_size[0]
        if isinstance(default, (list, tuple)):
            if len(default) != 2 or default[0] != default[1]:
                raise ConfigError(f"img_sizes / packing / phases take square resolutions, got img_size {default!r}")
            default = default[0]
        base = {k: getattr(cfg, k) for k in PHASE_KEYS}
        base["img_size"] = default
        if not cfg.phases:
            self.phases = [_phase(base, 0, None, patch_size, default, "")]
            self.total_steps = None
            return
        if not isinstance(cfg.phases, list):
            raise ConfigError(f"phases must be a list of {{steps: N, key: value}} entries, got {cfg.phases!r}")
        self.phases, start = [], 0
        for i, entry in enumerate(cfg.phases):
            where = f"phases[{i}]: "
            if not isinstance(entry, dict) or "steps" not in entry:
                raise ConfigError(f"{where}each phase is a mapping with steps (and any of {', '.join(PHASE_KEYS)}), "
                                  f"got {entry!r}")
            unknown = sorted(set(entry) - {"steps", *PHASE_KEYS})
            if unknown:
                raise ConfigError(f"{where}unknown key(s) {', '.join(unknown)}; a phase sets steps and any of "
                                  f"{', '.join(PHASE_KEYS)}")
            steps = _positive_int(entry["steps"], f"{where}steps")
            settings = {**base, **{k: v for k, v in entry.items() if k != "steps"}}
            if "img_size" in entry and "img_sizes" not in entry:
                settings["img_sizes"] = None  # a phase's own img_size replaces the run's img_sizes
            self.phases.append(_phase(settings, start, steps, patch_size, settings["img_size"], where))
            start += steps
        self.total_steps = start

    def phase_at(self, step: int) -> Phase:
        for ph in reversed(self.phases):
            if step >= ph.start:
                return ph
        return self.phases[0]

    @property
    def max_size(self) -> int:
        return max(s for ph in self.phases for s in ph.sizes)

    def patches(self, size: int) -> int:
        return (size // self.patch) ** 2

    def max_step_patches(self) -> int:
        """The most patches one step can hold (the memory plan's step)."""
        out = 0
        for ph in self.phases:
            largest = max(self.patches(s) for s in ph.sizes)
            out = max(out, max(ph.tokens, largest) if ph.tokens else ph.batch * largest)
        return out

    def draw(self, step: int, n: int) -> list[tuple[int, int]]:
        """The step's images: (data index, resolution) each."""
        ph = self.phase_at(step)
        g = torch.Generator().manual_seed(mix_seed(self.seed, 2654435761, step))
        w = torch.tensor(ph.weights, dtype=torch.float64)

        def one_size() -> int:
            return ph.sizes[int(torch.multinomial(w, 1, generator=g))]

        if ph.packing:
            sizes, used = [], 0
            while len(sizes) < (ph.batch if ph.tokens is None else 1 << 30):
                s = one_size()
                if ph.tokens is not None and sizes and used + self.patches(s) > ph.tokens:
                    break
                sizes.append(s)
                used += self.patches(s)
        else:
            s = one_size()
            sizes = [s] * (ph.batch if ph.tokens is None else max(1, ph.tokens // self.patches(s)))
        if len(sizes) <= n:
            index = torch.randperm(n, generator=g)[:len(sizes)] if n <= 4 * len(sizes) + 1024 else \
                _distinct(n, len(sizes), g)
        else:
            index = torch.randint(n, (len(sizes),), generator=g)
        return list(zip(index.tolist(), sizes))

    def noise(self, step: int, patches: list[int]) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, 15485863, step))
        return [torch.rand(1, L, generator=g) for L in patches]


def _distinct(n: int, k: int, g) -> torch.Tensor:
    """k distinct indices of range(n) (n much larger than k), without an O(n) permutation."""
    out: list[int] = []
    seen: set[int] = set()
    while len(out) < k:
        for i in torch.randint(n, (2 * (k - len(out)),), generator=g).tolist():
            if i not in seen and len(out) < k:
                seen.add(i)
                out.append(i)
    return torch.tensor(out)


def check(cfg, world_size: int) -> None:
    """The plan keys' values (before the data is built)."""
    if cfg.init_from is not None and not Path(cfg.init_from).exists():
        raise ConfigError(f"init_from must be a run directory or a checkpoint file, got {cfg.init_from!r}")
    if not uses_plan(cfg):
        return
    if world_size > 1:
        raise ConfigError("img_sizes / packing / tokens_per_batch / phases run in one process for now "
                          "(no torchrun)")
    if getattr(cfg, "target", None) in ("hog", "teacher"):
        raise ConfigError(f"img_sizes / packing / tokens_per_batch / phases reconstruct pixels for now, not "
                          f"target={cfg.target}")
    if cfg.phases is not None and not isinstance(cfg.phases, list):
        raise ConfigError(f"phases must be a list of {{steps: N, key: value}} entries, got {cfg.phases!r}")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(img.shape[-2:]) == (size, size):
        return img
    return F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


class PlannedSteps(torch.utils.data.Dataset):
    """Item ``step``: that step's list of (C, H, W) images at their drawn resolutions."""

    def __init__(self, dataset, plan: StepPlan, seed: int, n: int):
        self.items, self.plan, self.n = SeededItems(dataset, seed), plan, n

    def __len__(self):
        return self.n

    def __getitem__(self, step: int) -> list[torch.Tensor]:
        out = []
        for index, size in self.plan.draw(int(step), self.n):
            item = self.items[(int(step), index)]
            out.append(_resize(item[0] if isinstance(item, (tuple, list)) else item, size))
        return out


def _as_is(x):
    return x


def make_loader(run, start_step: int):
    """The steps' image lists from ``start_step`` on (DataLoader workers prefetch them)."""
    if isinstance(run.dataset, torch.utils.data.IterableDataset) or run.n is None:
        raise ConfigError("img_sizes / packing / tokens_per_batch / phases need a dataset of known length "
                          "(a folder of images or videos, or synthetic), not a stream")
    cfg = run.cfg
    return torch.utils.data.DataLoader(
        PlannedSteps(run.dataset, run.plan, cfg.seed, run.n), batch_size=None,
        sampler=range(start_step, run.sched.total_steps), num_workers=cfg.num_workers, collate_fn=_as_is,
        pin_memory=run.device.type == "cuda", prefetch_factor=4 if cfg.num_workers > 0 else None)


# ---------------------------------------------------------------------------------------------
# one step
# ---------------------------------------------------------------------------------------------
def step_flops(model, mask_ratio: float, imgs: list[torch.Tensor]) -> float:
    """The training FLOPs of a step's images, each at its own grid (MFU counts the packed tokens)."""
    from mae_fast.models.flops import mae_train_flops

    p = model.patch_size
    return float(sum(mae_train_flops(model, mask_ratio, (im.shape[-2] // p) * (im.shape[-1] // p)) for im in imgs))


def forward_backward(run, batches, step: int, signals: list, t_loop: float):
    """A planned step: its images through the model (packed, or as one batch of one resolution) and back, in
    ``accum_steps`` micro-steps weighted by their removed patches. Returns pretraining's ``StepOutcome``."""
    from mae_fast.training import distributed as dist_mod
    from mae_fast.training.pretrain import StepOutcome, autocast
    from mae_fast.training.signals import shared_stop, signal_flags

    cfg, model, plan = run.cfg, run.model, run.plan
    t_data = time.perf_counter()
    imgs = next(batches)
    data_wait = time.perf_counter() - t_data
    imgs = [im.to(run.device, non_blocking=True) for im in imgs]
    p = model.patch_size
    patches = [(im.shape[-2] // p) * (im.shape[-1] // p) for im in imgs]
    removed = [L - model.num_visible(cfg.mask_ratio, L) for L in patches]
    noise = [nz.to(run.device) for nz in plan.noise(step, patches)]
    packing = plan.phase_at(step).packing
    chunks = [c for c in (list(range(a, len(imgs), cfg.accum_steps)) for a in range(cfg.accum_steps)) if c]
    total = sum(removed)
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=run.device)
    for chunk in chunks:
        weight = sum(removed[i] for i in chunk) / total
        with autocast(run.device, run.amp_dtype):
            if packing:
                loss = model.forward_packed([imgs[i] for i in chunk], cfg.mask_ratio, [noise[i] for i in chunk]).loss
            else:
                loss = run.train_model(torch.stack([imgs[i] for i in chunk]), mask_ratio=cfg.mask_ratio,
                                       noise=torch.cat([noise[i] for i in chunk]), masked_only=True).loss
        if step in {int(s) for s in cfg.debug_nan_steps}:
            loss = loss * float("nan")
        scaled = loss * weight
        (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        loss_sum += scaled.detach().float()
    over_time = cfg.time_limit_s is not None and time.perf_counter() - t_loop > cfg.time_limit_s
    shared = torch.stack([loss_sum, *(loss_sum.new_full((), f) for f in [float(over_time), *signal_flags(signals)])])
    shared = dist_mod.all_reduce_sum(shared).tolist()
    return StepOutcome(shared[0], shared[1] > 0, shared_stop(shared[2], shared[3]), data_wait, images=len(imgs),
                       flops=step_flops(model, cfg.mask_ratio, imgs))


# ---------------------------------------------------------------------------------------------
# setup: the plan, the data size, the memory plan's step, init_from
# ---------------------------------------------------------------------------------------------
def build_plan(cfg, model) -> StepPlan | None:
    return StepPlan(cfg, model.patch_size, model.img_size) if uses_plan(cfg) else None


def memory_step(plan: StepPlan, model) -> tuple[tuple[int, int], int]:
    """(img_size, micro-batch) whose step holds at least the plan's largest step's patches, for the memory
    planner (attention's quadratic term is over-counted a little for packed small images)."""
    side = plan.max_size
    return (side, side), math.ceil(plan.max_step_patches() / plan.patches(side))


def init_weights(model, source, say=print) -> Path:
    """Load ``source`` (a run directory: its newest valid checkpoint; a mae_fast checkpoint; an official MAE
    checkpoint, encoder and decoder) into ``model``, position tables regenerated (sin-cos) or resampled for the
    model's grid. The optimizer and schedule stay fresh. Returns the file loaded."""
    from mae_fast.models.checkpoint import CheckpointError, load_pretrained
    from mae_fast.training import checkpoint as checkpoint_io

    path = Path(source)
    state = None
    if path.is_dir():
        found = checkpoint_io.latest_valid_checkpoint(path)
        if found is None:
            raise ConfigError(f"init_from={source}: no valid checkpoint in that run directory")
        path, state = found
    elif path.suffix != ".safetensors":
        try:
            state = checkpoint_io.load_checkpoint(path)
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"init_from={source}: {e}") from e
    try:
        load_pretrained(model, state if state is not None else path, strict=True)
    except (CheckpointError, KeyError, ValueError, RuntimeError) as e:
        raise ConfigError(f"init_from={source}: does not fit this model: {' '.join(str(e).split())[:300]}") from e
    say(f"init_from: weights of {path} (position tables for {model.img_size[0]}x{model.img_size[1]}); "
        f"fresh optimizer and schedule")
    return path
