"""LayerNorm and residual add + LayerNorm for pre-norm blocks, with the output in the next matmul's dtype.

``layer_norm(x, norm)`` is ``norm(x)`` cast to ``out_dtype``; ``add_layer_norm(x, branch, norm)`` is
``x_mid = x + branch`` and ``norm(x_mid)`` cast to ``out_dtype``, returned as ``(x_mid, y)``. ``out_dtype=None``
means the autocast dtype when autocast is on for x's device (what the next eager matmul would cast to),
else x's dtype. Backends (see :mod:`mae_fast.ops.dispatch`; ops ``layer_norm`` and ``add_layer_norm``):

- ``torch``: eager PyTorch, exactly the ops a pre-norm block ran before (``F.layer_norm``, in fp32 under
  autocast, then ``.to(out_dtype)``), so it is bit-identical to ``norm(x)`` followed by the matmul's cast.
- ``triton``: one fused kernel each way (:mod:`mae_fast.kernels.layer_norm`). On CUDA tensors it is refused
  until the kernels pass the GPU tests (``GPU_VERIFIED``; ``MAE_FAST_TRITON_UNVERIFIED=1`` runs them anyway).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mae_fast.kernels import layer_norm as triton_layer_norm

from . import platform
from .dispatch import Backend, register_backend, select_backend

__all__ = ["layer_norm", "add_layer_norm", "resolve_out_dtype", "compute_dtype", "GPU_VERIFIED"]

# On CUDA tensors the kernels run only with MAE_FAST_TRITON_UNVERIFIED=1 until ``pytest tests/ops/test_layer_norm.py``
# passes on a GPU and the fused kernels beat eager in a training step (bench/e2e.py's ``mae_fast_fused_ln``).
GPU_VERIFIED = False
SUPPORTED_DTYPES = triton_layer_norm.SUPPORTED_DTYPES


# ---- torch backends (the references the Triton backend is tested against) -----------------------

def _torch_layer_norm(x, weight, bias, eps, out_dtype):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps).to(out_dtype)


def _torch_add_layer_norm(x, branch, weight, bias, eps, out_dtype):
    x_mid = x + branch
    return x_mid, F.layer_norm(x_mid, x_mid.shape[-1:], weight, bias, eps).to(out_dtype)


def _always(*args, **kwargs):
    return []


# ---- triton (mae_fast.kernels.layer_norm): what it cannot take -------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def triton_layer_norm_reasons(x, weight, bias, eps, out_dtype) -> list[str]:
    out = []
    if x.device.type == "cuda":
        if not platform.gpu_verified(GPU_VERIFIED):
            out.append("not yet verified on a GPU (MAE_FAST_TRITON_UNVERIFIED=1 runs it)")
    elif x.device.type != "cpu" or not platform.interpreter():
        out.append("needs a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1 for the interpreter)")
    allowed = ", ".join(map(_dtype_name, SUPPORTED_DTYPES))
    if x.dtype not in SUPPORTED_DTYPES:
        out.append(f"x dtype {_dtype_name(x.dtype)} not supported ({allowed})")
    if out_dtype not in SUPPORTED_DTYPES:
        out.append(f"out_dtype {_dtype_name(out_dtype)} not supported ({allowed})")
    if x.shape[-1] > triton_layer_norm.MAX_D:
        out.append(f"normalised dim {x.shape[-1]} too large (at most {triton_layer_norm.MAX_D})")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.dtype not in SUPPORTED_DTYPES:
            out.append(f"norm {name} dtype {_dtype_name(p.dtype)} not supported ({allowed})")
        if p.device != x.device:
            out.append(f"norm {name} on {p.device} but x on {x.device}")
        if tuple(p.shape) != (x.shape[-1],):
            out.append(f"norm {name} shape {tuple(p.shape)} is not ({x.shape[-1]},)")
    return out


def triton_add_layer_norm_reasons(x, branch, weight, bias, eps, out_dtype) -> list[str]:
    out = triton_layer_norm_reasons(x, weight, bias, eps, out_dtype)
    if branch.shape != x.shape:
        out.append(f"branch shape {tuple(branch.shape)} differs from x's {tuple(x.shape)}")
    if branch.device != x.device:
        out.append(f"branch on {branch.device} but x on {x.device}")
    if branch.dtype not in SUPPORTED_DTYPES:
        out.append(f"branch dtype {_dtype_name(branch.dtype)} not supported")
    elif torch.promote_types(x.dtype, branch.dtype) != x.dtype:
        out.append(f"branch dtype {_dtype_name(branch.dtype)} is wider than the stream's "
                   f"{_dtype_name(x.dtype)} (x + branch would not stay in x's dtype)")
    return out


# ---- registration (order: dispatch.PRIORITY) -------------------------------------------------------------

register_backend(Backend(op="layer_norm", name="triton", fn=triton_layer_norm.layer_norm,
                         reasons=triton_layer_norm_reasons, available=platform.triton_unavailable, gpu=True))
register_backend(Backend(op="layer_norm", name="torch", fn=_torch_layer_norm, reasons=_always))
register_backend(Backend(op="add_layer_norm", name="triton", fn=triton_layer_norm.add_layer_norm,
                         reasons=triton_add_layer_norm_reasons, available=platform.triton_unavailable, gpu=True))
register_backend(Backend(op="add_layer_norm", name="torch", fn=_torch_add_layer_norm, reasons=_always))


# ---- functional API -----------------------------------------------------------------------------

def compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype when autocast is on for x's device (what eager matmuls would use), else None."""
    dev = x.device.type
    try:
        on = torch.is_autocast_enabled(dev)
    except RuntimeError:  # a device type autocast does not know (e.g. meta): no autocast there
        return None
    return torch.get_autocast_dtype(dev) if on else None


def resolve_out_dtype(x: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    """``out_dtype``, or the autocast dtype if autocast is on for x's device, else x's dtype."""
    return out_dtype or compute_dtype(x) or x.dtype


def _check(op: str, x, norm, out_dtype) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{op}: x must be a (..., D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be floating point, got {x.dtype}")
    shape = tuple(getattr(norm, "normalized_shape", ()))
    if shape != (x.shape[-1],):
        raise ValueError(f"{op}: norm normalises over {shape} but x's last dim is {x.shape[-1]} "
                         f"(a LayerNorm over the last dim of x is needed)")
    for name in ("weight", "bias"):
        p = getattr(norm, name, None)
        if p is not None and p.device != x.device:
            raise ValueError(f"{op}: norm {name} is on {p.device} but x on {x.device}")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise ValueError(f"{op}: out_dtype must be a floating torch.dtype, got {out_dtype!r}")


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm, out_dtype: torch.dtype | None = None, *,
               backend: str = "auto") -> torch.Tensor:
    """``norm(x)`` in ``out_dtype`` (default: the autocast dtype under autocast, else x's dtype)."""
    _check("layer_norm", x, norm, out_dtype)
    out_dtype = resolve_out_dtype(x, out_dtype)
    args = (x, norm.weight, norm.bias, float(norm.eps), out_dtype)
    return select_backend("layer_norm", backend, *args).fn(*args)


def add_layer_norm(x: torch.Tensor, branch: torch.Tensor, norm: torch.nn.LayerNorm,
                   out_dtype: torch.dtype | None = None, *, backend: str = "auto"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_mid, norm(x_mid))`` with ``x_mid = x + branch`` (x's shape, eager type promotion) and the norm's
    output in ``out_dtype`` (default: the autocast dtype under autocast, else x's dtype)."""
    op = "add_layer_norm"
    _check(op, x, norm, out_dtype)
    if not isinstance(branch, torch.Tensor) or branch.shape != x.shape:
        got = tuple(branch.shape) if isinstance(branch, torch.Tensor) else type(branch).__name__
        raise ValueError(f"{op}: branch must have x's shape {tuple(x.shape)}, got {got}")
    if branch.device != x.device:
        raise ValueError(f"{op}: branch is on {branch.device} but x on {x.device}")
    if not branch.is_floating_point():
        raise ValueError(f"{op}: branch must be floating point, got {branch.dtype}")
    out_dtype = resolve_out_dtype(x, out_dtype)
    args = (x, branch, norm.weight, norm.bias, float(norm.eps), out_dtype)
    return select_backend(op, backend, *args).fn(*args)
