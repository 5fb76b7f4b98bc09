"""Triton flash attention as a torch.library custom op, and the ``triton`` backend of ``attention``.

Kernels live in :mod:`mae_fast.kernels.flash_attention` and are imported on first use, so that
``TRITON_INTERPRET`` is read when the kernels are first needed (tests set it before that), and so
that importing this module (which dispatch does for every op) costs nothing.

Dispatch: on CUDA, ``auto`` ranks ``triton`` ahead of ``sdpa`` only for shapes where the measured
preference table (``attention_prefs.json``, generated from ``bench/results/attention-*.json``) shows
Triton faster; elsewhere it ranks after. On CPU Triton is refused ("needs a CUDA tensor") unless
``TRITON_INTERPRET=1``, and then it ranks last before the torch reference.
"""
from __future__ import annotations

import importlib
import math
import os
from typing import Optional

import torch

from .attention import preferred_backend_rank
from .dispatch import Backend, register_backend

__all__ = ["flash_attention", "triton_attention_reasons"]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
# Head dims that passed every GPU test, in single-tile mode (the default): an H100 with triton 3.6, 2026-11-23
# (bench/results/gpu-tests-h100-2026-11-23.txt; bench_attention --check at MAE shapes for 32/64/80, packed too).
# Split mode (MAE_FAST_FA_SINGLE_TILE=0) faulted there (attention-triage-h100-2026-11-23.json): unverified.
# Elsewhere on CUDA the kernel runs only with MAE_FAST_TRITON_UNVERIFIED=1 (experimental).
GPU_VERIFIED = {"dense": (32, 40, 48, 64, 72, 80, 88, 96, 128), "packed": (32, 40, 64, 80)}


def _unverified_allowed() -> bool:
    """MAE_FAST_TRITON_UNVERIFIED=1: run the kernel on GPUs wherever it can (experimental)."""
    return os.environ.get("MAE_FAST_TRITON_UNVERIFIED", "0") == "1"


@torch.compiler.assume_constant_result  # traced as its value: torch.compile cannot trace the module import
def _verified_tiling() -> bool:
    """The tiling the GPU tests passed with: single tile, columns past the head dim clamped (not WRAP_D, not
    EQUAL_TILES)."""
    k = _kernels()
    return bool(k.SINGLE_TILE) and not k.EQUAL_TILES and not wrap_d_on(k)


def wrap_d_on(k) -> bool:
    """The kernels module's WRAP_D switch (a tl.constexpr, or a plain bool where tests patched one in)."""
    return bool(getattr(k.WRAP_D, "value", k.WRAP_D))


def _verified_on_gpu(head_dim: int, packed: bool) -> bool:
    power_of_two = head_dim & (head_dim - 1) == 0  # one unmasked tile in every mode
    return _unverified_allowed() or ((power_of_two or _verified_tiling())
                                     and head_dim in GPU_VERIFIED["packed" if packed else "dense"])


def _kernels():
    mod = importlib.import_module("mae_fast.kernels.flash_attention")
    # The kernels were decorated in compiled mode but the interpreter is now wanted (or the reverse):
    # re-decorate them (JIT vs interpreter is decided when the module is imported).
    want_interp = _interpreting()
    is_interp = type(mod._attn_fwd_kernel).__name__ == "InterpretedFunction"
    if want_interp != is_interp:
        mod = importlib.reload(mod)
    return mod


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---- custom ops ---------------------------------------------------------------------------------

def _lse_shape(q: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> tuple[int, ...]:
    if cu_seqlens is not None:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


@torch.library.custom_op("mae_fast::flash_attention_fwd", mutates_args=())
def _flash_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                  cu_seqlens: Optional[torch.Tensor], max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().flash_attn_forward(q, k, v, softmax_scale, cu_seqlens, max_seqlen)


@_flash_fwd_op.register_fake
def _(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty(_lse_shape(q, cu_seqlens), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("mae_fast::flash_attention_bwd", mutates_args=())
def _flash_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, dlse: Optional[torch.Tensor], softmax_scale: float,
                  cu_seqlens: Optional[torch.Tensor], max_seqlen: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().flash_attn_backward(dout, q, k, v, out, lse, softmax_scale, cu_seqlens, max_seqlen,
                                          dlse=dlse)


@_flash_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, softmax_scale, cu_seqlens, max_seqlen):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, cu_seqlens, max_seqlen = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.softmax_scale = softmax_scale
    ctx.max_seqlen = max_seqlen
    ctx.set_materialize_grads(False)  # an unused LSE (the usual case) then costs nothing in backward


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _flash_bwd_op(dout, q, k, v, out, lse, dlse, ctx.softmax_scale, cu_seqlens, ctx.max_seqlen)
    return dq, dk, dv, None, None, None


_flash_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---- functional entry ---------------------------------------------------------------------------

def flash_attention(q, k, v, softmax_scale=None, cu_seqlens=None, max_seqlen=None, return_lse=False):
    """Triton flash attention; returns ``out`` or ``(out, lse)`` (lse fp32, natural log; (B,H,N) or (H,total)).

    Differentiable in q, k, v (and through the returned LSE). Under autocast the inputs are cast to the
    autocast dtype, as matmul-like ops are.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is not None:
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        cu_seqlens = cu_seqlens.to(torch.int32)
    else:
        max_seqlen = q.shape[1]
    with torch.autocast(device_type, enabled=False):
        out, lse = _flash_fwd_op(q, k, v, scale, cu_seqlens, int(max_seqlen))
    return (out, lse) if return_lse else out


# ---- backend ------------------------------------------------------------------------------------

def triton_attention_reasons(q, k, v, softmax_scale, cu_seqlens, max_seqlen) -> list[str]:
    out = []
    if not q.is_cuda and not _interpreting():
        out.append("needs a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter)")
    if q.dtype not in TRITON_DTYPES:
        out.append(f"dtype {q.dtype} not supported (float16, bfloat16, float32)")
    elif q.is_cuda and q.dtype == torch.float32 and not _unverified_allowed():
        # compiled for sm_90 its IEEE fp32 dots spill kilobytes of registers at every tile size tried
        # (bench/compile_report.py --dtypes float32): correct but slow, so leave fp32 to SDPA on GPUs
        out.append("float32 on a GPU is not a fast path (fp32 dots spill registers); use bfloat16/float16 or sdpa")
    d = q.shape[-1]
    if d > MAX_HEAD_DIM or d % 8 != 0 or d < 32:
        out.append(f"head dim {d} unsupported (a multiple of 8 from 32 to {MAX_HEAD_DIM})")
    elif q.is_cuda and not _verified_on_gpu(d, cu_seqlens is not None):
        out.append(f"head dim {d} {'packed' if cu_seqlens is not None else 'dense'} not verified on GPU "
                   f"(in this tiling mode; experimental: MAE_FAST_TRITON_UNVERIFIED=1 allows it)")
    if q.shape != k.shape:
        out.append(f"query length {q.shape[-3]} differs from key length {k.shape[-3]} (self-attention only)")
    if cu_seqlens is not None and cu_seqlens.device != q.device:
        out.append(f"cu_seqlens on {cu_seqlens.device} but q on {q.device}")
    return out


def _triton_priority(q, k, v, softmax_scale, cu_seqlens, max_seqlen) -> float:
    if not q.is_cuda:
        return 999.0  # interpreter: last before the torch reference
    return preferred_backend_rank("triton", q, k, v, cu_seqlens, max_seqlen)


def _triton_backend(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    return flash_attention(q, k, v, softmax_scale, cu_seqlens, max_seqlen)


def _triton_available() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton not installed"
    return None


register_backend(Backend(op="attention", name="triton", fn=_triton_backend, reasons=triton_attention_reasons,
                         priority=_triton_priority, available=_triton_available))
