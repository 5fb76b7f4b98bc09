"""Training memory, measured and predicted on any device.

``saved_tensor_bytes`` measures the bytes autograd keeps from a forward for its backward.
``estimate_train_step`` predicts the peak memory of a whole training step (forward, backward, optimizer) at
any size without allocating it: the step runs on fake tensors (shapes only) while every storage's lifetime
is tracked, as the CUDA caching allocator would count it. On the H100 it agreed with
``torch.cuda.max_memory_allocated`` to about 1% for the reference MAE from ViT-B/16 to ViT-H/14 at 952 px
(``bench/results/memory-estimate-*.json``). It runs on the CPU, under CPU autocast: the CUDA-specific
kernels (SDPA's flash/cuDNN attention, the Triton masking kernels) keep the same tensors for backward.

``mae-fast memory`` is the command line: the peak for a model, resolution and batch, and the largest batch,
or the least recomputation, that fits a memory budget.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import warnings
import weakref
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["saved_tensor_bytes", "StorageTracker", "StepMemory", "estimate_train_step", "estimate_mae_step",
           "fit_batch", "Plan", "plan_for_budget", "fake_process_group", "main"]

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None

GiB = 2**30
ALLOC_ROUND = 512  # the CUDA caching allocator hands out multiples of 512 bytes


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.nn.Module] = ()) -> tuple[object, int]:
    """Run ``fn()`` and return (its result, bytes of the unique storages saved for backward).

    Storages are counted once however many views of them are saved; parameters of the ``exclude`` modules
    are left out (they are resident anyway), but copies of them, such as autocast's low-precision weights,
    count. Recomputation inside ``torch.utils.checkpoint`` regions is not seen by this hook.
    """
    params = {p.untyped_storage().data_ptr() for m in exclude for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


# ---- storage lifetimes ------------------------------------------------------------------------

class StorageTracker(TorchDispatchMode):
    """Bytes of live tensor storages, current and peak, like the allocator's "allocated" counter.

    Every tensor an operator returns is tracked until its storage is freed (a weak reference tells);
    tensors created before the mode is entered count once passed to :meth:`track`. Each storage gets a
    serial number; ``sizes`` keeps every one's bytes and :meth:`live_at_peak` which were alive at the peak.
    ``phase`` is a label the peak remembers.
    """

    def __init__(self, round_to: int = ALLOC_ROUND):
        super().__init__()
        self.round_to = round_to
        self.current = self.peak = 0
        self.phase = self.peak_phase = ""
        self.sizes: dict[int, int] = {}  # serial -> bytes, for every storage ever tracked
        self._live: dict[int, int] = {}  # id(storage) -> serial, while alive
        self._refs: dict[int, weakref.ref] = {}
        self._peak_live: frozenset[int] = frozenset()
        self._at_peak = False  # nothing freed since the peak was set: the live set *is* the peak's

    def track(self, t: torch.Tensor) -> int:
        return self._track_storage(_local(t).untyped_storage())

    def _track_storage(self, st: torch.UntypedStorage) -> int:
        key = id(st)
        if key in self._live:
            return self._live[key]
        serial = len(self.sizes)
        self.sizes[serial] = 0
        self._live[key] = serial
        self._refs[key] = weakref.ref(st, lambda _, key=key: self._free(key))
        self._set_size(serial, st.nbytes())
        return serial

    def _set_size(self, serial: int, nbytes: int) -> None:
        new = -(-nbytes // self.round_to) * self.round_to
        if new < self.sizes[serial]:
            self._leaving_peak()
        self.current += new - self.sizes[serial]
        self.sizes[serial] = new
        if self.current > self.peak:
            self.peak, self.peak_phase, self._at_peak = self.current, self.phase, True

    def _leaving_peak(self) -> None:
        if self._at_peak:  # the first decrease after a new peak: remember what the peak was made of
            self._peak_live, self._at_peak = frozenset(self._live.values()), False

    def _free(self, key: int) -> None:
        self._leaving_peak()
        self.current -= self.sizes[self._live.pop(key)]
        del self._refs[key]

    def serial(self, t: torch.Tensor) -> int | None:
        return self._live.get(id(_local(t).untyped_storage()))

    def live(self) -> frozenset[int]:
        return frozenset(self._live.values())

    def live_at_peak(self) -> frozenset[int]:
        return self.live() if self._at_peak else self._peak_live

    def reset_peak(self) -> None:
        self.peak, self.peak_phase, self._at_peak = self.current, self.phase, True

    def _resized(self, st: torch.UntypedStorage) -> None:
        """A storage grew or shrank in place (FSDP2 frees and refills unsharded parameters this way)."""
        serial = self._live.get(id(st))
        if serial is None:
            self._track_storage(st)
        else:
            self._set_size(serial, st.nbytes())

    def __enter__(self):
        original = self._original_resize = torch.UntypedStorage.resize_

        def resize_(st, nbytes):
            out = original(st, nbytes)
            self._resized(st)
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._original_resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(_is_dtensor_type(t) for t in types):
            return NotImplemented  # let DTensor (FSDP2) run its local ops, which come back here
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def _is_dtensor_type(t) -> bool:
    return DTensor is not None and isinstance(t, type) and issubclass(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (what occupies memory), else the tensor itself."""
    return t.to_local() if _is_dtensor_type(type(t)) else t


@dataclass
class StepMemory:
    """Peak bytes of a training step (the second one, so the optimizer state exists) and what made it up."""

    peak: int
    peak_phase: str          # "forward", "backward" or "optimizer"
    parameters: int          # the model's parameters and buffers
    optimizer_state: int
    gradients: int           # parameter gradients alive at the peak
    activations: int         # everything else alive at the peak: saved activations, temporaries, inputs
    after_forward: int       # bytes alive once the forward returned, beyond parameters and optimizer state

    def gib(self) -> dict:
        return {k: round(v / GiB, 3) if isinstance(v, int) else v for k, v in asdict(self).items()}


def estimate_train_step(build_model: Callable[[], torch.nn.Module],
                        make_inputs: Callable[[], tuple],
                        loss_fn: Callable[..., torch.Tensor], *,
                        amp_dtype: torch.dtype | None = torch.bfloat16,
                        make_optimizer: Callable[[list], torch.optim.Optimizer] | None = None,
                        round_to: int = ALLOC_ROUND,
                        prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                        observe: TorchDispatchMode | None = None) -> StepMemory:
    """Peak memory of ``loss_fn(model, *make_inputs())``, its backward and an optimizer step, without
    allocating any of it.

    ``build_model`` runs on the meta device; the step runs on fake tensors on the CPU (shapes, no data);
    ``amp_dtype`` is the autocast dtype (None: full precision);
    the default optimizer is the trainer's fused AdamW. Two steps run, so the second sees the optimizer
    state the first created; gradients are released with ``zero_grad(set_to_none=True)`` as the trainer does.
    Sizes are rounded up to ``round_to`` bytes, as the CUDA allocator rounds them.
    ``observe``, a dispatch mode, sees every op of the second (steady-state) step, e.g. to count FLOPs and bytes;
    its ``phase`` attribute is kept up to date ("forward", "backward", "optimizer").
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    make_optimizer = make_optimizer or (lambda ps: torch.optim.AdamW(ps, lr=1e-4, betas=(0.9, 0.95), fused=True))
    tracker = StorageTracker(round_to)
    amp = torch.autocast("cpu", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with torch.device("meta"):  # shapes only: initialisers skip meta tensors (some need real data)
        model = build_model()
    fake = FakeTensorMode()
    with fake, torch.device("cpu"):
        fake.allow_non_fake_inputs = True  # only to turn the meta parameters into fake CPU ones
        model = model.to_empty(device="cpu").train()
        fake.allow_non_fake_inputs = False
        if prepare is not None:  # e.g. sharding
            model = prepare(model)
        model_serials = {tracker.track(t) for t in [*model.parameters(), *model.buffers()]}
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params)
        grad_serials: set[int] = set()
        with tracker, warnings.catch_warnings():
            # FSDP2 warns that the model returns views (MAEOutput's fields), which the step never edits in place
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
            def phase(name):
                tracker.phase = name
                if observe is not None:
                    observe.phase = name

            for step in range(2):
                inputs = make_inputs()
                phase("forward")
                if step:
                    tracker.reset_peak()
                with (observe if step and observe is not None else contextlib.nullcontext()):
                    with amp:
                        loss = loss_fn(model, *inputs)
                    after_forward = tracker.current
                    phase("backward")
                    loss.backward()
                    grad_serials = {tracker.serial(p.grad) for p in params if p.grad is not None}
                    phase("optimizer")
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                del loss, inputs
        state_serials = {tracker.serial(t) for s in opt.state.values() for t in s.values()
                         if isinstance(t, torch.Tensor) and t.numel() > 0}
        live = tracker.live_at_peak()

    def total(serials):
        return sum(tracker.sizes[s] for s in serials if s is not None and s in live)

    params_b, state_b, grads_b = total(model_serials), total(state_serials), total(grad_serials)
    steady = sum(tracker.sizes[s] for s in model_serials | (state_serials - {None}))
    return StepMemory(peak=tracker.peak, peak_phase=tracker.peak_phase, parameters=params_b,
                      optimizer_state=state_b, gradients=grads_b,
                      activations=tracker.peak - params_b - state_b - grads_b,
                      after_forward=after_forward - steady)


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """A process group of ``world_size`` ranks inside this one process whose collectives move no data, and a CPU
    device mesh over it: FSDP2 shards and gathers as it would on that many devices, for :func:`estimate_train_step`.
    Needs a process without a process group of its own (the trainer plans from a subprocess)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised here: estimate FSDP in a fresh process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


# ---- MAE pretraining --------------------------------------------------------------------------

def estimate_mae_step(name: str, img_size, batch: int, *, lean: bool = False,
                      grad_checkpointing: bool | int = False, mask_ratio: float = 0.75,
                      amp_dtype: torch.dtype | None = torch.bfloat16, extra_bytes: int = 0,
                      prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                      observe: TorchDispatchMode | None = None, fp8_min_width: int | None = None,
                      teacher: dict | None = None,
                      **model_kwargs) -> StepMemory:
    """Peak memory of one ``mae-fast pretrain`` step (masked-only training path, fused AdamW) for a registered
    model (``model_kwargs``: create_model overrides) at ``img_size`` (int or (H, W)) and per-device ``batch``:
    what ``torch.cuda.max_memory_allocated`` would report. ``extra_bytes`` is added to the peak (e.g. DDP's
    gradient buckets); ``prepare`` wraps the model before its optimizer is made (e.g. FSDP2 sharding inside
    :func:`fake_process_group`); ``observe``: see :func:`estimate_train_step`. ``fp8_min_width``: ``precision:
    fp8`` (:mod:`mae_fast.precision`), whose Float8Linear casts (float8 copies of inputs, weights and output
    gradients, the ones saved for backward included) and ``_scaled_mm`` calls then run in the traced step.
    ``teacher`` (:func:`mae_fast.targets.teacher_spec`, with ``model_kwargs["target_dim"]`` its width): a frozen
    teacher's weights (in its dtype) and its gradient-free forward on every step count too."""
    from .models import create_model

    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    model_kwargs.setdefault("norm_pix_loss", True)
    built = {}

    def build():
        m = built["model"] = create_model(name, img_size=img_size, **model_kwargs)
        m.set_lean_activations(lean)
        m.set_grad_checkpointing(grad_checkpointing)
        return m

    def inputs():
        m = built["model"]
        return torch.randn(batch, m.in_chans, *m.img_size), torch.rand(batch, m.num_patches)

    if fp8_min_width is not None:
        prepare = _with_fp8(prepare, fp8_min_width)
    loss = lambda m, x, noise: m(x, mask_ratio, noise, masked_only=True).loss  # noqa: E731
    if teacher is not None:
        build, prepare, loss = _with_teacher(teacher, build, prepare, mask_ratio)
    est = estimate_train_step(build, inputs, loss, amp_dtype=amp_dtype, prepare=prepare, observe=observe)
    if extra_bytes:
        est.peak += extra_bytes
        est.activations += extra_bytes
    return est


class _StudentTeacher(torch.nn.Module):
    """The student and its frozen teacher as one module, so the estimate sees the teacher's weights (which take
    no gradient and no optimizer state: they do not require grad) and its forward."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher = student, teacher


def _with_teacher(spec: dict, build, prepare, mask_ratio):
    """(build, prepare, loss) of :func:`estimate_mae_step` with the teacher's forward making the target."""
    from .targets import build_teacher_encoder, teacher_features

    def build_both():
        teacher = build_teacher_encoder(spec).to(getattr(torch, spec.get("dtype", "float32")))
        return _StudentTeacher(build(), teacher)

    def prepare_both(both):  # e.g. FSDP2 shards the student; every rank holds the whole teacher
        both.student = prepare(both.student)
        return both

    def loss(both, x, noise):
        target = teacher_features(both.teacher, x, spec["in_size"])
        return both.student(x, mask_ratio, noise, masked_only=True, target=target).loss

    return build_both, prepare_both if prepare is not None else None, loss


def fit_batch(peak_of: Callable[[int], int], budget: int, limit: int = 1 << 16) -> int:
    """Largest batch in [1, limit] whose ``peak_of(batch)`` fits ``budget`` bytes (0 if none).

    Peak memory grows about linearly with the batch (with a different slope at tiny batches, where the
    gradients can set the peak), so a few secant steps land next to the answer, and a search outward from
    there (steps doubling, then bisection) makes it exact: five or six estimates in all."""
    cache: dict[int, int] = {}

    def fits(b):
        if b not in cache:
            cache[b] = peak_of(b)
        return cache[b] <= budget

    if not fits(1):
        return 0
    if limit < 2 or not fits(2):
        return 1
    a, b = 1, 2
    for _ in range(3):  # secant steps towards peak == budget
        slope = max((cache[b] - cache[a]) / (b - a), 1.0)
        guess = max(1, min(limit, int(b + (budget - cache[b]) / slope)))
        if guess in cache:
            break
        fits(guess)
        a, b = b, guess
    guess = b
    if fits(guess):  # lo fits; hi does not (or is past the limit)
        lo, step = guess, 1
        while lo + step <= limit and fits(lo + step):
            lo, step = lo + step, step * 2
        hi = min(lo + step, limit + 1)
    else:
        hi, step = guess, 1
        while hi - step > 1 and not fits(hi - step):
            hi, step = hi - step, step * 2
        lo = max(hi - step, 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo



@dataclass(frozen=True)
class Plan:
    """A way to train: which memory savers are on."""

    lean: bool
    checkpointed: int  # blocks under gradient checkpointing, decoder first
    total_blocks: int

    def describe(self) -> str:
        parts = ["lean" if self.lean else "plain"]
        if self.checkpointed:
            parts.append("checkpoint all blocks" if self.checkpointed >= self.total_blocks
                         else f"checkpoint {self.checkpointed} blocks")
        return " + ".join(parts)

    def overrides(self) -> str:
        ck = "true" if self.checkpointed >= self.total_blocks else str(self.checkpointed)
        return f"lean_activations={str(self.lean).lower()} grad_checkpointing={ck if self.checkpointed else 'false'}"


def plan_for_budget(peak_of: Callable[[Plan], int], budget: int, total_blocks: int, lean: bool = False,
                    checkpointed: int = 0) -> tuple[Plan | None, dict]:
    """The cheapest plan, at least as lean as the one given, whose ``peak_of(plan)`` fits ``budget`` bytes:
    the given plan, else with lean activations (no extra FLOPs), else the fewest checkpointed blocks (by
    bisection). Returns (the plan or None if every block checkpointed does not fit, {plan: peak} estimated)."""
    tried: dict[Plan, int] = {}

    def fits(plan):
        if plan not in tried:
            tried[plan] = peak_of(plan)
        return tried[plan] <= budget

    checkpointed = min(checkpointed, total_blocks)
    for plan in (Plan(lean, checkpointed, total_blocks), Plan(True, checkpointed, total_blocks)):
        if fits(plan):
            return plan, tried
    if not fits(Plan(True, total_blocks, total_blocks)):
        return None, tried
    lo, hi = checkpointed, total_blocks  # lo does not fit, hi does
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(Plan(True, mid, total_blocks)) else (mid, hi)
    return Plan(True, hi, total_blocks), tried


# ---- fitting a training run into a memory budget ----------------------------------------------

class EstimateFailed(RuntimeError):
    """The step could not be estimated; ``reason`` is the original error as text (sent between ranks)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def budget_bytes(budget, device: torch.device) -> int | None:
    """The bytes a step may allocate per device for ``memory_budget_gib`` (a number of GiB, ``auto``: 90% of
    the GPU's memory, off on the CPU; None: off)."""
    if budget is None or (budget == "auto" and device.type != "cuda"):
        return None
    return int(0.9 * torch.cuda.get_device_properties(device).total_memory if budget == "auto" else budget * GiB)


def fit_memory_budget(budget, device: torch.device, search: Callable[[int], tuple],
                      too_big: Callable[[int, dict], str], say: Callable[[str], None]) -> tuple | None:
    """Make a training step fit ``memory_budget_gib``, for pretraining and finetuning alike: ``search(limit)``
    estimates candidate plans (``mae_fast.memory``: fake tensors, seconds) and returns (the plan that fits or
    None, {plan: estimated peak bytes}). Returns (limit, plan, tried), or None when the budget is off or the step
    cannot be estimated (a planning aid must not stop a run it cannot model); raises ConfigError with
    ``too_big(limit, tried)`` when no plan fits."""
    from mae_fast.training.config import ConfigError

    limit = budget_bytes(budget, device)
    if limit is None:
        return None
    try:
        found, tried = search(limit)
    except Exception as e:  # noqa: BLE001
        reason = e.reason if isinstance(e, EstimateFailed) else f"{type(e).__name__}: {e}"
        say(f"memory: could not estimate the step ({reason}); memory_budget_gib not checked")
        return None
    if found is None:
        raise ConfigError(too_big(limit, tried))
    return limit, found, tried


def _with_fp8(prepare, min_width: int):
    """``prepare`` after converting the wide encoder linears to torchao Float8Linear (the real, not emulated,
    matmuls: on fake tensors ``_scaled_mm`` only computes shapes), as the trainer converts them before wrapping."""
    from .precision import convert_fp8

    def both(model):
        convert_fp8(model, min_width, emulate=False)
        return prepare(model) if prepare is not None else model
    return both


def mae_memory_job(cfg, model, micro: int, amp_dtype, strategy: str, world_size: int, limit: int,
                   target=None) -> dict:
    """What :func:`plan_mae_memory` needs for a pretraining run of ``cfg`` (a ``PretrainConfig``) on ``model``
    (built or on the meta device): the per-device micro-batch, the configured savers, DDP's gradient buckets or
    the FSDP2 world, and the reconstruction ``target`` (a :class:`mae_fast.targets.Target`: its head width, and
    a teacher's weights and forward)."""
    from mae_fast.training import packing

    from .targets import teacher_spec

    blocks = len(model.blocks) + len(model.decoder_blocks)
    ck = cfg.grad_checkpointing
    model_kwargs = {k: v for k, v in (cfg.model_kwargs or {}).items() if k != "img_size"}
    if target is not None and target.external:
        model_kwargs["target_dim"] = target.width
    img_size = model.img_size
    if packing.uses_plan(cfg):  # mixed sizes, packed: a step of at least the plan's largest step's patches
        img_size, micro = packing.memory_step(packing.build_plan(cfg, model), model)
    return dict(model=cfg.model, img_size=img_size, micro=micro, mask_ratio=cfg.mask_ratio,
                amp_dtype=amp_dtype, norm_pix_loss=bool(getattr(model, "norm_pix_loss", cfg.norm_pix_loss)),
                teacher=teacher_spec(target), model_kwargs=model_kwargs,
                extra=4 * sum(p.numel() for p in model.parameters()) if strategy == "ddp" else 0,  # DDP's buckets
                fsdp_world=world_size if strategy == "fsdp" else None, limit=limit, blocks=blocks,
                lean=bool(cfg.lean_activations), checkpointed=blocks if ck is True else int(ck),
                fp8_min_width=cfg.fp8_min_width if cfg.precision == "fp8" else None)


def plan_mae_memory(job: dict) -> tuple:
    """(plan or None, {plan: estimated peak}) for ``job`` (see :func:`plan_for_budget`). With ``fsdp_world`` the
    model is sharded as ``distributed=fsdp`` shards it, over a simulated process group: call it in a process
    that has no process group of its own."""
    from mae_fast.training.distributed import shard_model

    with contextlib.ExitStack() as stack:
        prepare = None
        if job["fsdp_world"]:
            mesh = stack.enter_context(fake_process_group(job["fsdp_world"]))
            prepare = lambda m: shard_model(m, mesh=mesh)  # noqa: E731

        def peak_of(plan):
            return estimate_mae_step(job["model"], job["img_size"], job["micro"], lean=plan.lean,
                                     grad_checkpointing=plan.checkpointed, mask_ratio=job["mask_ratio"],
                                     amp_dtype=job["amp_dtype"], extra_bytes=job["extra"], prepare=prepare,
                                     norm_pix_loss=job["norm_pix_loss"], fp8_min_width=job.get("fp8_min_width"),
                                     teacher=job.get("teacher"),
                                     **job["model_kwargs"]).peak

        return plan_for_budget(peak_of, job["limit"], job["blocks"], job["lean"], job["checkpointed"])


def largest_micro_batch(job: dict, limit: int) -> int:
    """The largest micro-batch (at most ``limit``) whose step fits ``job['limit']`` with every block checkpointed."""
    def peak(n):
        return estimate_mae_step(job["model"], job["img_size"], n, lean=True, grad_checkpointing=True,
                                 mask_ratio=job["mask_ratio"], amp_dtype=job["amp_dtype"], extra_bytes=job["extra"],
                                 norm_pix_loss=job["norm_pix_loss"], fp8_min_width=job.get("fp8_min_width"),
                                 teacher=job.get("teacher"),
                                 **job["model_kwargs"]).peak

    return fit_batch(peak, job["limit"], limit=max(limit, 1))


def plan_mae_memory_in_subprocess(job: dict) -> tuple:
    """:func:`plan_mae_memory` in a fresh process (FSDP2's simulated process group cannot share this one's)."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(plan_mae_memory, job).result()


# ---- command line -----------------------------------------------------------------------------


def _print_rows(rows, title):
    """The plans' table, in GiB (MiB when every peak is under 1 GiB, so a small model shows no row of 0.00), with a
    note for rows without gradients (their peak comes before backward has allocated any)."""
    mib = all(r["peak"] < 1.0 for r in rows)
    unit, k = ("MiB", 1024.0) if mib else ("GiB", 1.0)
    print(title)
    print(f"{'plan':<34}{'batch':>6}{'peak ' + unit:>10}{'params':>8}{'optim':>8}{'grads':>8}{'activ.':>8}"
          f"{'recompute':>11}  phase")
    for r in rows:
        print(f"{r['plan']:<34}{r['batch']:>6}{k * r['peak']:>10.2f}{k * r['parameters']:>8.2f}"
              f"{k * r['optimizer_state']:>8.2f}{k * r['gradients']:>8.2f}{k * r['activations']:>8.2f}"
              f"{r['recompute_flops_pct']:>10.1f}%  {r['peak_phase']}")
    if any(round(k * r["gradients"], 2) == 0 for r in rows):
        print("grads 0.00: at that plan's peak no gradient exists yet (it comes before backward has written the first "
              "one; the previous step's were freed by zero_grad(set_to_none=True))")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="mae-fast memory",
        description="Peak GPU memory of an MAE pretraining step (fused AdamW, masked-only path), predicted on "
                    "any machine: the step runs on fake tensors. Batch sizes are per device.",
        epilog="examples:\n"
               "  mae-fast memory mae_vit_huge_patch14 --img-size 476 --batch 24             # plain / lean / all\n"
               "  mae-fast memory mae_vit_huge_patch14 --img-size 476 --batch 24 --budget 20 # cheapest plan that fits\n"
               "  mae-fast memory mae_vit_huge_patch14 --img-size 952 --budget 80            # largest batch per plan\n"
               "  mae-fast memory mae_vit_2b_patch14 --img-size 476 --batch 8 --fsdp 8       # sharded over 8 GPUs",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="registered model name (mae_fast.list_models())")
    ap.add_argument("--img-size", type=int, default=None, help="resolution (default: the model's)")
    ap.add_argument("--batch", type=int, default=None, help="images per device")
    ap.add_argument("--budget", type=float, default=None, help="GiB the step may allocate")
    ap.add_argument("--headroom", type=float, default=0.1,
                    help="fraction of --budget kept free for allocator fragmentation and the CUDA context (0.1)")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--precision", choices=["bf16", "fp16", "fp32", "fp8"], default="bf16",
                    help="fp8: torchao float8 linears for the encoder (--fp8-min-width), bf16 elsewhere")
    ap.add_argument("--fp8-min-width", type=int, default=1024, help="with --precision fp8: as fp8_min_width")
    ap.add_argument("--ddp", action="store_true",
                    help="add DDP's gradient buckets (4 bytes per parameter, counted with the activations)")
    ap.add_argument("--fsdp", type=int, default=None, metavar="N",
                    help="shard with FSDP2 over N devices, as distributed=fsdp does (simulated in this process)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="create_model override, repeatable (e.g. --set embed_dim=512 --set depth=16)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)

    from .models import create_model, list_models, model_config

    if args.model not in list_models():
        ap.error(f"unknown model {args.model!r}; available: {', '.join(list_models())}")
    if args.batch is None and args.budget is None:
        ap.error("give --batch, --budget or both")
    if args.batch is not None and args.batch < 1:
        ap.error("--batch must be at least 1")
    if args.budget is not None and not 0 < args.budget < math.inf:  # NaN fails too
        ap.error("--budget must be positive")
    if args.img_size is not None and args.img_size < 1:
        ap.error("--img-size must be at least 1")
    if not 0 <= args.mask_ratio < 1:
        ap.error("--mask-ratio must be in [0, 1)")
    if not 0 <= args.headroom < 1:
        ap.error("--headroom must be in [0, 1)")
    if args.fsdp is not None and (args.fsdp < 1 or args.ddp):
        ap.error("--fsdp takes a number of devices >= 1, and excludes --ddp")
    overrides = {}
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            ap.error(f"--set wants KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            ap.error(f"--set {key.strip()}: cannot parse the value {text!r}")
    if "img_size" in overrides:
        ap.error("give the image size as --img-size, not --set img_size")
    try:
        img_size = args.img_size or model_config(args.model, **overrides).get("img_size", 224)
        with torch.device("meta"):
            shape = create_model(args.model, img_size=img_size, **overrides)
    except (TypeError, ValueError) as e:
        ap.error(str(e))
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None, "fp8": torch.bfloat16}[args.precision]
    fp8_width = args.fp8_min_width if args.precision == "fp8" else None
    blocks = len(shape.blocks) + len(shape.decoder_blocks)
    extra = 4 * sum(p.numel() for p in shape.parameters()) if args.ddp else 0
    label = (f"{args.model}{''.join(f' {k}={v}' for k, v in overrides.items())} at {img_size} px, {args.precision}, "
             f"mask {args.mask_ratio}{', DDP' if args.ddp else ''}{f', FSDP2 over {args.fsdp}' if args.fsdp else ''}")

    with contextlib.ExitStack() as stack:
        prepare = None
        if args.fsdp:
            from .training.distributed import shard_model

            mesh = stack.enter_context(fake_process_group(args.fsdp))
            prepare = lambda m: shard_model(m, mesh=mesh)  # noqa: E731

        def estimate(batch, plan):
            return estimate_mae_step(args.model, img_size, batch, lean=plan.lean, grad_checkpointing=plan.checkpointed,
                                     mask_ratio=args.mask_ratio, amp_dtype=amp, extra_bytes=extra, prepare=prepare,
                                     fp8_min_width=fp8_width, **overrides)

        rows, chosen = _cli_rows(args, estimate, blocks, label, lambda plan: _recompute_pct(shape, plan, args))
    if args.json:
        from pathlib import Path
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(model=args.model, overrides=overrides, img_size=img_size,
                                                   precision=args.precision, fsdp=args.fsdp, ddp=args.ddp,
                                                   mask_ratio=args.mask_ratio, budget_gib=args.budget,
                                                   headroom=args.headroom, rows=rows, chosen=chosen), indent=1))
    return 0


def _recompute_pct(shape, plan: Plan, args) -> float:
    from .models import mae_recompute_pct

    shape.set_grad_checkpointing(plan.checkpointed)
    return round(mae_recompute_pct(shape, args.mask_ratio), 2)


def _cli_rows(args, estimate, blocks: int, label: str, recompute_pct) -> tuple[list, dict | None]:
    """What ``mae-fast memory`` prints: the peak per plan, the cheapest plan within the budget, or the largest
    batch per plan. Returns (rows, the chosen row or None)."""
    plain, lean, everything = Plan(False, 0, blocks), Plan(True, 0, blocks), Plan(True, blocks, blocks)
    cache: dict = {}

    def row(batch, plan):
        if (batch, plan) not in cache:
            print(f"  estimating {plan.describe()} at batch {batch} ...", file=sys.stderr, flush=True)
            est = estimate(batch, plan)
            cache[batch, plan] = dict(plan=plan.describe(), overrides=plan.overrides(), batch=batch, **est.gib(),
                                      peak_bytes=est.peak, recompute_flops_pct=recompute_pct(plan))
        return cache[batch, plan]

    if args.budget is None:
        rows = [row(args.batch, p) for p in (plain, lean, everything)]
        _print_rows(rows, f"{label}, batch {args.batch}:")
        return rows, None
    budget = int(args.budget * (1 - args.headroom) * GiB)
    budget_text = f"{args.budget:g} GiB budget ({budget / GiB:.1f} GiB usable, headroom {args.headroom:g})"
    if args.batch is not None:
        found, tried = plan_for_budget(lambda p: row(args.batch, p)["peak_bytes"], budget, blocks)
        rows = [row(args.batch, p) for p in sorted(tried, key=lambda p: (p.lean, p.checkpointed))]
        chosen = row(args.batch, found) if found else None
        _print_rows(rows, f"{label}, batch {args.batch}, {budget_text}:")
        print(f"\nfits: {chosen['plan']}  ->  mae-fast pretrain ... {chosen['overrides']}" if chosen else
              "\ndoes not fit even with every block checkpointed: lower the batch (accum_steps keeps the "
              "global batch) or shard with distributed=fsdp")
        return rows, chosen
    rows = []
    for plan in (plain, lean, everything):
        b = fit_batch(lambda n, p=plan: estimate(n, p).peak, budget, limit=4096)
        print(f"  {plan.describe()}: largest batch {b}", file=sys.stderr, flush=True)
        rows.append(row(b, plan) if b else dict(plan=plan.describe(), batch=0))
    fitting = [r for r in rows if r["batch"]]
    if fitting:
        _print_rows(fitting, f"{label}: largest batch per device within {budget_text}:")
    for r in rows:
        if not r["batch"]:
            print(f"{r['plan']}: not even one image fits")
    return rows, None
