"""Backend dispatch for the hot ops, in the style of xformers' fmha.

Every op has an ordered list of backends. A backend says which inputs it cannot take by returning
*reasons* (an empty list means it can run). ``backend="auto"`` picks the first backend in the op's
preference order that has no reasons; a named backend is used or refused with its reasons; when
nothing can run, the error lists every backend with its reasons. ``MAE_FAST_BACKEND=<name>`` forces
a backend for every op that has one of that name (ops without it keep ``auto``);
``MAE_FAST_BACKEND=attention=sdpa,masked_patch_mse=torch`` forces per op (an unknown op, or a name the op lacks, is
an error).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

__all__ = ["Backend", "register_backend", "backends_for", "select_backend", "NoBackendError", "describe"]


class NoBackendError(RuntimeError):
    """No backend can run the given inputs; the message lists each backend's reasons."""


@dataclass
class Backend:
    """One implementation of one op.

    ``reasons(*args, **kwargs)`` returns why this backend cannot take the inputs (empty: it can).
    ``fn(*args, **kwargs)`` computes the op; it may assume ``reasons`` returned nothing.
    ``priority`` orders backends for ``auto`` (lower first) and may be a function of the inputs,
    so a backend can defer to another on shapes where measurements say it is slower.
    """

    op: str
    name: str
    fn: Callable
    reasons: Callable[..., list[str]]
    priority: Callable[..., float] | float = 100.0
    available: Callable[[], str | None] = field(default=lambda: None)  # returns why unavailable

    def why_not(self, *args, **kwargs) -> list[str]:
        missing = self.available()
        if missing:
            return [missing]
        return list(self.reasons(*args, **kwargs))

    def rank(self, *args, **kwargs) -> float:
        return self.priority(*args, **kwargs) if callable(self.priority) else float(self.priority)


_REGISTRY: dict[str, dict[str, Backend]] = {}


def register_backend(backend: Backend) -> Backend:
    _REGISTRY.setdefault(backend.op, {})[backend.name] = backend
    return backend


def backends_for(op: str) -> dict[str, Backend]:
    load_optional_backends()
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; known ops: {sorted(_REGISTRY)}")
    return _REGISTRY[op]


def select_backend(op: str, backend: str, *args, **kwargs) -> Backend:
    """Return the backend that will run ``op`` on these inputs, or raise with every reason."""
    table = backends_for(op)
    if backend == "auto":
        forced = forced_backend(op)
        _check_forced_ops()
        if forced and forced != "auto" and forced not in table and "=" in os.environ.get("MAE_FAST_BACKEND", ""):
            # named for this op (op=name), so a misspelling, not a backend other ops have
            raise ValueError(f"{op}: unknown backend {forced!r} (MAE_FAST_BACKEND); choose from {['auto', *table]}")
        if forced and forced != "auto" and forced in table:
            backend = forced
    if backend != "auto":
        if backend not in table:
            raise ValueError(f"{op}: unknown backend {backend!r}; choose from {['auto', *table]}")
        chosen = table[backend]
        why = chosen.why_not(*args, **kwargs)
        if why:
            raise NoBackendError(f"{op}: backend {backend!r} cannot run these inputs: " + "; ".join(why))
        return chosen
    report = []
    for cand in sorted(table.values(), key=lambda b: b.rank(*args, **kwargs)):
        why = cand.why_not(*args, **kwargs)
        if not why:
            return cand
        report.append(f"  {cand.name}: " + "; ".join(why))
    raise NoBackendError(f"{op}: no backend can run these inputs:\n" + "\n".join(report))


def forced_backend(op: str) -> str | None:
    """The backend ``MAE_FAST_BACKEND`` names for ``op``: either one name for every op that has it
    (``MAE_FAST_BACKEND=torch``) or per-op pairs (``MAE_FAST_BACKEND=attention=sdpa,gather_visible=cuda``)."""
    spec = os.environ.get("MAE_FAST_BACKEND", "").strip()
    if not spec:
        return None
    if "=" not in spec:
        return spec
    return _forced_pairs(spec).get(op, "") or None


def _forced_pairs(spec: str) -> dict[str, str]:
    # stripped both sides: "a=x, b=y" names op b, not " b"
    pairs = (item.split("=", 1) for item in spec.split(",") if "=" in item)
    return {name.strip(): value.strip() for name, value in pairs}


def _check_forced_ops() -> None:
    """A pair naming an op that does not exist (``atention=sdpa``) would force nothing, silently: refuse it."""
    spec = os.environ.get("MAE_FAST_BACKEND", "")
    if "=" not in spec:
        return
    unknown = sorted(set(_forced_pairs(spec)) - set(_REGISTRY))
    if unknown:
        raise ValueError(f"MAE_FAST_BACKEND={spec!r} names unknown op(s) {unknown}; known ops: {sorted(_REGISTRY)}")


def describe(op: str, *args, **kwargs) -> dict[str, list[str]]:
    """Map each backend of ``op`` to its reasons for these inputs (empty list: it can run)."""
    return {name: b.why_not(*args, **kwargs) for name, b in backends_for(op).items()}


_OPTIONAL_LOADED = False
# Modules that register more backends when imported; a missing module is skipped.
OPTIONAL_BACKEND_MODULES = (
    "mae_fast.ops._triton_masking",   # Triton masked-token kernels (kernels/masking.py)
    "mae_fast.ops._cuda_masking",     # CUDA masked-token kernels (csrc/)
    "mae_fast.ops._triton_attention", # Triton flash attention (kernels/flash_attention.py)
    "mae_fast.ops._triton_layer_norm",  # Triton fused residual add + LayerNorm (kernels/layer_norm.py)
    "mae_fast.ops._thirdparty_attention",  # flash-attn and xformers, when installed
)


def load_optional_backends() -> None:
    """Import the modules that register the Triton/CUDA/third-party backends, once."""
    global _OPTIONAL_LOADED
    if _OPTIONAL_LOADED:
        return
    _OPTIONAL_LOADED = True
    import importlib

    for mod in OPTIONAL_BACKEND_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # module not written yet or optional package missing
            if e.name != mod:
                raise


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
