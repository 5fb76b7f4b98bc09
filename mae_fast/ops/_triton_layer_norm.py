"""Triton fused (residual add +) LayerNorm as torch.library custom ops: the ``triton`` backend of the
``layer_norm`` and ``add_layer_norm`` ops. Kernels and launchers: :mod:`mae_fast.kernels.layer_norm`.

The kernels module is imported on first use (``_kernels``), so ``TRITON_INTERPRET`` is read when the
kernels are first needed and importing this module (dispatch does, for every op) costs nothing.

Dispatch: on CUDA the backend is refused until the kernels pass the GPU tests (``GPU_VERIFIED``;
``MAE_FAST_TRITON_UNVERIFIED=1`` runs them anyway), and then ranks ahead of ``torch``. On CPU tensors it
runs only under ``TRITON_INTERPRET=1`` and ranks after ``torch`` (the interpreter is slow), so ``auto``
keeps ``torch`` there; ``backend="triton"`` still runs it.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._triton_attention import _interpreting, _triton_available, _unverified_allowed
from .dispatch import Backend, register_backend

__all__ = ["add_layer_norm_fwd_op", "add_layer_norm_bwd_op", "triton_layer_norm_reasons",
           "triton_add_layer_norm_reasons", "GPU_VERIFIED"]

# Not run on a GPU yet: on CUDA tensors the kernels run only with MAE_FAST_TRITON_UNVERIFIED=1 until
# ``pytest tests/test_layer_norm.py`` passes on one (every test there runs on CUDA when it can; then flip this).
GPU_VERIFIED = False
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_D = 8192  # mirrors mae_fast.kernels.layer_norm.MAX_D (not imported here: that would import triton)


def _kernels():
    mod = importlib.import_module("mae_fast.kernels.layer_norm")
    # decorated for the other mode (compiled vs interpreter, fixed at import): re-decorate
    is_interp = type(mod._add_layer_norm_fwd_kernel).__name__ == "InterpretedFunction"
    if _interpreting() != is_interp:
        mod = importlib.reload(mod)
    return mod


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# ---- custom ops ---------------------------------------------------------------------------------
# Custom-op outputs may be neither None nor aliases of inputs: absent outputs come back as empty tensors.

@torch.library.custom_op("mae_fast::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd_op(x: Tensor, branch: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                          eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, x_mid or empty, mean, rstd)."""
    return _forward_kernels(x, branch, weight, bias, eps, out_dtype)


@add_layer_norm_fwd_op.register_fake
def _(x, branch, weight, bias, eps, out_dtype):
    y = x.new_empty(x.shape, dtype=out_dtype)
    x_mid = x.new_empty(x.shape) if branch is not None else _empty(x)
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return y, x_mid, stats, torch.empty_like(stats)


@torch.library.custom_op("mae_fast::add_layer_norm_bwd", mutates_args=())
def add_layer_norm_bwd_op(dy: Tensor, d_x_mid: Optional[Tensor], x_norm: Tensor, mean: Tensor, rstd: Tensor,
                          weight: Optional[Tensor], bias: Optional[Tensor], branch_dtype: Optional[torch.dtype],
                          need_weight_grad: bool, need_bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dbranch or empty when it is dx's dtype, dweight or empty, dbias or empty)."""
    return _backward_kernels(dy, d_x_mid, x_norm, mean, rstd, weight, bias, branch_dtype, need_weight_grad,
                             need_bias_grad)


def _forward_kernels(x, branch, weight, bias, eps, out_dtype):
    y, x_mid, mean, rstd = _kernels().add_layer_norm_forward(x, branch, weight, bias, eps, out_dtype)
    return y, (x_mid if x_mid is not None else _empty(x)), mean, rstd


def _backward_kernels(dy, d_x_mid, x_norm, mean, rstd, weight, bias, branch_dtype, need_weight_grad,
                      need_bias_grad):
    dx, dbranch, dw, db = _kernels().add_layer_norm_backward(
        dy, x_norm, mean, rstd, weight, bias, d_x_mid=d_x_mid, branch_dtype=branch_dtype,
        need_weight_grad=need_weight_grad, need_bias_grad=need_bias_grad)
    separate = dbranch is not None and dbranch is not dx
    return dx, (dbranch if separate else _empty(dx)), (dw if dw is not None else _empty(dx)), \
        (db if db is not None else _empty(dx))


@add_layer_norm_bwd_op.register_fake
def _(dy, d_x_mid, x_norm, mean, rstd, weight, bias, branch_dtype, need_weight_grad, need_bias_grad):
    dx = x_norm.new_empty(x_norm.shape)
    separate = branch_dtype is not None and branch_dtype != x_norm.dtype
    dbranch = x_norm.new_empty(x_norm.shape, dtype=branch_dtype) if separate else _empty(dx)
    dw = weight.new_empty(weight.shape) if (weight is not None and need_weight_grad) else _empty(dx)
    db = bias.new_empty(bias.shape) if (bias is not None and need_bias_grad) else _empty(dx)
    return dx, dbranch, dw, db


def _setup_context(ctx, inputs, output):
    x, branch, weight, bias, eps, out_dtype = inputs
    y, x_mid, mean, rstd = output
    # the normalised input: x_mid with a residual (an output, kept instead of x and branch), else x
    ctx.save_for_backward(x_mid if branch is not None else x, mean, rstd, weight, bias)
    ctx.branch_dtype = branch.dtype if branch is not None else None
    ctx.y_dtype = y.dtype
    ctx.set_materialize_grads(False)  # an unused x_mid (or y) gradient is then None, not a tensor of zeros


def _backward(ctx, dy, d_x_mid, _d_mean, _d_rstd, backward_fn=None):
    x_norm, mean, rstd, weight, bias = ctx.saved_tensors
    need_x, need_branch, need_w, need_b = ctx.needs_input_grad[:4]
    if ctx.branch_dtype is None:
        d_x_mid = None  # the empty placeholder output
    if dy is None:
        if d_x_mid is None:
            return None, None, None, None, None, None
        dy = x_norm.new_zeros(x_norm.shape, dtype=ctx.y_dtype)
    dx, dbranch, dw, db = (backward_fn or add_layer_norm_bwd_op)(
        dy, d_x_mid, x_norm, mean, rstd, weight, bias, ctx.branch_dtype, bool(need_w), bool(need_b))
    if not need_branch:
        dbranch = None
    elif ctx.branch_dtype == x_norm.dtype:
        dbranch = dx  # d x = d branch = d x_mid; the op returned an empty placeholder
    return (dx if need_x else None), dbranch, (dw if need_w and weight is not None else None), \
        (db if need_b and bias is not None else None), None, None


add_layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAddLayerNorm(torch.autograd.Function):
    """The custom op's autograd with the kernels called directly: in eager mode the dispatcher round trips of
    the two custom ops (and an autocast context) cost more host time than the kernels take at ViT sizes.
    Traced calls (``_traced``: torch.compile, fake tensors, dispatch modes) get the custom ops instead."""

    @staticmethod
    def forward(x, branch, weight, bias, eps, out_dtype):
        return _forward_kernels(x, branch, weight, bias, eps, out_dtype)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, dy, d_x_mid, d_mean, d_rstd):
        return _backward(ctx, dy, d_x_mid, d_mean, d_rstd, backward_fn=_backward_kernels)


def _traced(x) -> bool:
    """Compiling, under a dispatch mode (FakeTensorMode, an op counter) or on a tensor subclass or the meta
    device: the custom ops, with their fake implementations, must be what is seen."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None \
        or type(x) is not torch.Tensor or x.device.type == "meta"


def _fused(x, branch, weight, bias, eps, out_dtype):
    if _traced(x):
        with torch.autocast(x.device.type, enabled=False):
            return add_layer_norm_fwd_op(x, branch, weight, bias, eps, out_dtype)
    return _EagerAddLayerNorm.apply(x, branch, weight, bias, eps, out_dtype)


# ---- backend functions (receive exactly the args of the public API's select_backend call) --------

def _triton_layer_norm(x, weight, bias, eps, out_dtype):
    return _fused(x, None, weight, bias, eps, out_dtype)[0]


def _triton_add_layer_norm(x, branch, weight, bias, eps, out_dtype):
    y, x_mid, _, _ = _fused(x, branch, weight, bias, eps, out_dtype)
    return x_mid, y


# ---- reasons, priority, registration --------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def triton_layer_norm_reasons(x, weight, bias, eps, out_dtype) -> list[str]:
    out = []
    if x.device.type == "cuda":
        if not GPU_VERIFIED and not _unverified_allowed():
            out.append("not yet verified on a GPU (MAE_FAST_TRITON_UNVERIFIED=1 runs it)")
    elif x.device.type != "cpu" or not _interpreting():
        out.append("needs a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1 for the interpreter)")
    allowed = ", ".join(map(_dtype_name, SUPPORTED_DTYPES))
    if x.dtype not in SUPPORTED_DTYPES:
        out.append(f"x dtype {_dtype_name(x.dtype)} not supported ({allowed})")
    if out_dtype not in SUPPORTED_DTYPES:
        out.append(f"out_dtype {_dtype_name(out_dtype)} not supported ({allowed})")
    if x.shape[-1] > MAX_D:
        out.append(f"normalised dim {x.shape[-1]} too large (at most {MAX_D})")
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


def _priority(x, *args, **kwargs) -> float:
    """Ahead of torch (1000) on CUDA tensors; behind it on CPU, where only the interpreter runs."""
    return 10.0 if x.device.type == "cuda" else 2000.0


register_backend(Backend(op="layer_norm", name="triton", fn=_triton_layer_norm, reasons=triton_layer_norm_reasons,
                         priority=_priority, available=_triton_available))
register_backend(Backend(op="add_layer_norm", name="triton", fn=_triton_add_layer_norm,
                         reasons=triton_add_layer_norm_reasons, priority=_priority, available=_triton_available))
