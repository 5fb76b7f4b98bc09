"""Backend dispatch for the hot ops, in the style of xformers' ``_dispatch_fw_priority_list``.

Every op has one priority list, :data:`PRIORITY`, fastest first on CUDA tensors. A backend says which inputs it
cannot take by returning *reasons* (an empty list means it can run). ``backend="auto"`` walks :func:`auto_order`
and takes the first backend with no reasons; a named backend is used or refused with its reasons; when nothing
can run, the error lists every backend with its reasons.

:func:`auto_order` is the priority list with two input-dependent adjustments, both reorderings only:

- a backend whose ``preferred`` check says so for these inputs moves to the front (in list order): the measured
  table ``attention_prefs.json`` for attention backends measured faster than SDPA on this GPU and shape, and
  the CUDA masking extension once it is loaded in the process;
- on CPU tensors the GPU kernels (``gpu=True``; they run there only in the Triton interpreter, a test vehicle)
  go last, so ``auto`` keeps the plain torch (or SDPA) path; so do they, on any device, for the ops in
  :data:`INDUCTOR_FUSES` inside a graph torch.compile traces (Inductor fuses the plain ops into their neighbours).

Forcing a backend, innermost first: the ``backend=`` argument; :func:`use_backend` (a context manager);
``MAE_FAST_BACKEND=<name>`` (every op that has a backend of that name; others keep ``auto``) or
``MAE_FAST_BACKEND=attention=sdpa,masked_patch_mse=torch`` (per op; an unknown op, or a name the op lacks, is
an error).
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

__all__ = ["PRIORITY", "INDUCTOR_FUSES", "Backend", "register_backend", "backends_for", "select_backend", "auto_order",
           "use_backend", "NoBackendError", "describe"]

# Fastest first on CUDA tensors. These orders are what ``auto`` tries; nothing else ranks backends.
PRIORITY: dict[str, list[str]] = {
    "attention": ["sdpa", "triton", "flash_attn", "flash_attn_4", "xformers", "torch"],
    "gather_visible": ["triton", "cuda", "torch"],
    "unshuffle_with_mask_token": ["triton", "cuda", "torch"],
    "patchify_gather": ["triton", "torch"],
    "masked_patch_mse": ["triton", "torch"],
    "layer_norm": ["triton", "torch"],
    "add_layer_norm": ["triton", "torch"],
    "hog": ["triton", "torch"],
}


# Ops that Inductor fuses into neighbouring kernels better than an opaque custom op allows (LayerNorm and the residual
# add in front of it; GELU and bias adds are plain torch ops in the model already). Inside a graph that torch.compile
# traces, ``auto`` hands them to their plain-torch backend; attention and the masking kernels stay custom ops.
INDUCTOR_FUSES = frozenset({"layer_norm", "add_layer_norm"})


class NoBackendError(RuntimeError):
    """No backend can run the given inputs; the message lists each backend's reasons."""


def _never(*args, **kwargs) -> bool:
    return False


@dataclass
class Backend:
    """One implementation of one op.

    ``reasons(*args)`` returns why this backend cannot take the inputs (empty: it can); ``fn(*args)`` computes the
    op and may assume ``reasons`` returned nothing; ``available()`` says why it cannot run at all (None: it can).
    ``gpu``: a GPU kernel (last in ``auto`` on CPU tensors). ``preferred(*args)``: evidence that, for these
    inputs, it beats the backends listed before it (see :func:`auto_order`).
    """

    op: str
    name: str
    fn: Callable
    reasons: Callable[..., list[str]]
    available: Callable[[], str | None] = field(default=lambda: None)
    gpu: bool = False
    preferred: Callable[..., bool] = _never

    def why_not(self, *args, **kwargs) -> list[str]:
        missing = self.available()
        if missing:
            return [missing]
        return list(self.reasons(*args, **kwargs))


_REGISTRY: dict[str, dict[str, Backend]] = {}


def register_backend(backend: Backend) -> Backend:
    if backend.name not in PRIORITY.get(backend.op, ()):
        raise KeyError(f"{backend.op}: backend {backend.name!r} is not in dispatch.PRIORITY[{backend.op!r}]")
    _REGISTRY.setdefault(backend.op, {})[backend.name] = backend
    return backend


def backends_for(op: str) -> dict[str, Backend]:
    """The registered backends of ``op``, in priority order."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; known ops: {sorted(_REGISTRY)}")
    table = _REGISTRY[op]
    return {name: table[name] for name in PRIORITY[op] if name in table}


def _on_cuda(args) -> bool:
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return first is not None and first.is_cuda


def auto_order(op: str, *args, **kwargs) -> list[Backend]:
    """The backends ``auto`` tries for these inputs, in order: ``PRIORITY[op]``, preferred ones first on CUDA
    tensors, GPU kernels last on CPU tensors and, for ``INDUCTOR_FUSES`` ops, inside a compiled graph."""
    table = list(backends_for(op).values())
    if op in INDUCTOR_FUSES and torch.compiler.is_compiling():  # Inductor fuses the plain torch ops
        return [b for b in table if not b.gpu] + [b for b in table if b.gpu]
    if not _on_cuda(args):
        return [b for b in table if not b.gpu] + [b for b in table if b.gpu]
    ahead = [b for b in table if b.preferred(*args, **kwargs)]
    return ahead + [b for b in table if b not in ahead]


def select_backend(op: str, backend: str, *args, **kwargs) -> Backend:
    """Return the backend that will run ``op`` on these inputs, or raise with every reason."""
    table = backends_for(op)
    if backend == "auto":
        backend = forced_backend(op) or "auto"
    if backend != "auto":
        if backend not in table:
            raise ValueError(f"{op}: unknown backend {backend!r}; choose from {['auto', *table]}")
        chosen = table[backend]
        why = chosen.why_not(*args, **kwargs)
        if why:
            raise NoBackendError(f"{op}: backend {backend!r} cannot run these inputs: " + "; ".join(why))
        return chosen
    report = []
    for cand in auto_order(op, *args, **kwargs):
        why = cand.why_not(*args, **kwargs)
        if not why:
            return cand
        report.append(f"  {cand.name}: " + "; ".join(why))
    raise NoBackendError(f"{op}: no backend can run these inputs:\n" + "\n".join(report))


def describe(op: str, *args, **kwargs) -> dict[str, list[str]]:
    """Map each backend of ``op`` to its reasons for these inputs (empty list: it can run)."""
    return {name: b.why_not(*args, **kwargs) for name, b in backends_for(op).items()}


# ---- forcing a backend ------------------------------------------------------------------------------

_FORCED: list[dict[str, str]] = []  # one {op: backend} per active use_backend, innermost last
_FORCED_LOCK = threading.Lock()


@contextlib.contextmanager
def use_backend(name: str | None = None, /, **per_op: str) -> Iterator[None]:
    """Force backends inside a ``with`` block, for calls that ask for ``backend="auto"``.

    ``use_backend("torch")`` forces ``torch`` for every op that has it; ``use_backend(attention="sdpa",
    masked_patch_mse="torch")`` per op; both together: the per-op names win. Nested blocks override outer
    ones op by op; the previous choice is restored on exit. Overrides ``MAE_FAST_BACKEND``.
    """
    forced: dict[str, str] = {}
    if name is not None:
        ops = [op for op in _REGISTRY if name in _REGISTRY[op]]
        if not ops:
            raise ValueError(f"use_backend: no op has a backend {name!r}; backends: "
                             f"{sorted({b for t in _REGISTRY.values() for b in t})}")
        forced.update({op: name for op in ops})
    for op, backend in per_op.items():
        if op not in _REGISTRY:
            raise ValueError(f"use_backend: unknown op {op!r}; known ops: {sorted(_REGISTRY)}")
        if backend != "auto" and backend not in _REGISTRY[op]:
            raise ValueError(f"use_backend: {op} has no backend {backend!r}; choose from "
                             f"{['auto', *backends_for(op)]}")
        forced[op] = backend
    with _FORCED_LOCK:
        _FORCED.append(forced)
    try:
        yield
    finally:
        with _FORCED_LOCK:
            _FORCED.remove(forced)  # this block's entry (or an equal one: the same state), wherever it is in the stack


def forced_backend(op: str) -> str | None:
    """The backend forced for ``op`` by :func:`use_backend` or ``MAE_FAST_BACKEND`` (None: none is)."""
    for forced in reversed(_FORCED):
        if op in forced:
            return forced[op]
    spec = os.environ.get("MAE_FAST_BACKEND", "").strip()
    if not spec:
        return None
    if "=" not in spec:  # one name for every op that has it
        return spec if spec in _REGISTRY.get(op, {}) else None
    pairs = _forced_pairs(spec)
    unknown = sorted(set(pairs) - set(_REGISTRY))
    if unknown:  # a misspelt op would force nothing, silently
        raise ValueError(f"MAE_FAST_BACKEND={spec!r} names unknown op(s) {unknown}; known ops: {sorted(_REGISTRY)}")
    forced = pairs.get(op) or None
    if forced and forced != "auto" and forced not in _REGISTRY[op]:  # named for this op: a misspelling
        raise ValueError(f"{op}: unknown backend {forced!r} (MAE_FAST_BACKEND); choose from "
                         f"{['auto', *backends_for(op)]}")
    return forced


def _forced_pairs(spec: str) -> dict[str, str]:
    # stripped both sides: "a=x, b=y" names op b, not " b"
    pairs = (item.split("=", 1) for item in spec.split(",") if "=" in item)
    return {name.strip(): value.strip() for name, value in pairs}


# ---- shared input checks, phrased as reasons ---------------------------------------------------

def check_tensor(name: str, t, *, ndim: int | Sequence[int] | None = None, dtypes=None, device=None) -> list[str]:
    if not isinstance(t, torch.Tensor):
        return [f"{name} must be a torch.Tensor, got {type(t).__name__}"]
    out = []
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            out.append(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        out.append(f"{name} dtype {t.dtype} not in {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        out.append(f"{name} is on {t.device} but expected {device}")
    return out


def raise_if(problems: list[str], op: str, exc=ValueError) -> None:
    if problems:
        raise exc(f"{op}: " + "; ".join(problems))
