"""Non-causal multi-head attention, laid out (batch, seqlen, heads, head_dim) as ``flash_attn_func``.

Dense queries may be fewer than keys (q (B, Nq, H, D), k and v (B, Nk, H, D)), e.g. a last block that updates
only some rows. With ``cu_seqlens`` the inputs are packed (total_tokens, heads, head_dim) and sequence i occupies rows
``cu_seqlens[i]:cu_seqlens[i+1]``; sequences never attend across each other.

Backends, in ``dispatch.PRIORITY["attention"]`` order: ``sdpa`` (PyTorch's scaled_dot_product_attention, which
itself picks flash / cuDNN / efficient / math, fastest first per the measured table), ``triton``
(:mod:`mae_fast.kernels.flash_attention`), ``flash_attn``, ``flash_attn_4`` (the CuTe-DSL FlashAttention) and
``xformers`` (the last three when installed: ``pip install ".[gpu]"``) and ``torch`` (the fp32 math reference). On
CUDA tensors ``auto`` moves a backend ahead of sdpa only where ``attention_prefs.json`` measured it faster on this
GPU model, head dim and sequence length.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import numbers
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from mae_fast.kernels import flash_attention as triton_attention

from . import platform
from .dispatch import Backend, register_backend, select_backend

__all__ = ["attention", "attention_reference", "check_attention_inputs", "measured_faster", "attention_prefs",
           "GPU_VERIFIED"]

ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_attention_inputs(q, k, v, cu_seqlens=None, max_seqlen=None, softmax_scale=None) -> None:
    """Raise a clear error for inputs no backend should accept."""
    op = "attention"
    if softmax_scale is not None:
        if not isinstance(softmax_scale, (numbers.Real, torch.Tensor, torch.SymFloat, torch.SymInt)):
            raise TypeError(f"{op}: softmax_scale must be a number (or a one-element tensor), "
                            f"got {type(softmax_scale).__name__}")
        if isinstance(softmax_scale, torch.Tensor) and softmax_scale.numel() != 1:
            raise ValueError(f"{op}: softmax_scale must hold one value, got shape {tuple(softmax_scale.shape)}")
    if cu_seqlens is not None and not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{op}: cu_seqlens must be a tensor of batch+1 offsets, got {type(cu_seqlens).__name__}")
    if max_seqlen is not None and \
            not isinstance(max_seqlen, (numbers.Real, torch.Tensor, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{op}: max_seqlen must be an int, got {type(max_seqlen).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor")
        if t.dtype not in ATTN_DTYPES:
            raise TypeError(f"{op}: {name} dtype {t.dtype} not supported; use one of {ATTN_DTYPES}")
    want = 3 if cu_seqlens is not None else 4
    layout = "(total_tokens, heads, head_dim)" if want == 3 else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(t.shape)}")
    # dense inputs may have fewer queries than keys (queries for some rows only); packed ones may not
    if k.shape != v.shape or (cu_seqlens is not None and q.shape != k.shape) or \
            q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"{op}: q, k, v shapes do not match: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
                         f" (k and v must be equal; q may differ from them only in its query length)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if cu_seqlens is not None:
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"{op}: cu_seqlens must be a 1-D int32/int64 tensor of batch+1 offsets")
        if cu_seqlens.device != q.device:
            raise ValueError(f"{op}: cu_seqlens on {cu_seqlens.device} but q on {q.device}")
        if not torch.compiler.is_compiling():
            cs = cu_seqlens.tolist()
            if cs[0] != 0 or any(b < a for a, b in zip(cs, cs[1:])):
                raise ValueError(f"{op}: cu_seqlens must start at 0 and never decrease, got {cs}")
            if cs[-1] != q.shape[0]:
                raise ValueError(f"{op}: cu_seqlens ends at {cs[-1]} but q holds {q.shape[0]} tokens")
            longest = max(b - a for a, b in zip(cs, cs[1:]))
            if max_seqlen is not None and max_seqlen < longest:
                raise ValueError(f"{op}: max_seqlen={max_seqlen} is shorter than the longest sequence ({longest})")


def attention_reference(q, k, v, softmax_scale=None, cu_seqlens=None, upcast=True):
    """Plain softmax(q k^T * scale) v, in float32 (or the input dtype with ``upcast=False``)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is not None:
        cs = cu_seqlens.tolist()
        outs = [attention_reference(q[None, a:b], k[None, a:b], v[None, a:b], scale, None, upcast)[0]
                for a, b in zip(cs, cs[1:])]
        return torch.cat(outs, 0) if outs else q.new_empty(q.shape)
    dt = q.dtype
    if upcast and dt in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v).to(dt)


def _torch_attention(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    return attention_reference(q, k, v, softmax_scale, cu_seqlens, upcast=True)


# ---- measured preferences -----------------------------------------------------------------------
# attention_prefs.json holds, per GPU model, head dim and sequence length, the median times of every
# backend measured by bench/bench_attention.py (regenerate with ``--write-prefs``). ``auto`` moves a
# backend ahead of sdpa only where it was measured faster; unmeasured devices/shapes keep the priority list.

PREFS_PATH = Path(__file__).with_name("attention_prefs.json")


@functools.lru_cache(maxsize=None)
def attention_prefs(path: str | None = None) -> dict:
    p = Path(path or os.environ.get("MAE_FAST_ATTENTION_PREFS", PREFS_PATH))
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:  # said once per path (cached): auto still works, without measurements
        warnings.warn(f"attention preference table {p} is unreadable ({type(exc).__name__}: {exc}); "
                      f"backend='auto' ranks attention backends in their default order", RuntimeWarning, stacklevel=2)
        return {}


@functools.lru_cache(maxsize=64)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def lookup_pref_row(prefs: dict, device_name: str, layout: str, head_dim: int, seqlen: int | None) -> dict | None:
    """The table row for this GPU model, layout ("dense"/"varlen") and head dim nearest ``seqlen`` (log scale)."""
    rows = prefs.get("devices", {}).get(device_name, {}).get(layout, {}).get(str(head_dim))
    if not rows:
        return None
    if seqlen is None:  # the middle row by length, as faster_on_device (a hand-written table may list rows in any order)
        return sorted(rows, key=lambda r: r["seqlen"])[len(rows) // 2]
    return min(rows, key=lambda r: abs(math.log(max(r["seqlen"], 1)) - math.log(max(seqlen, 1))))


def faster_than_sdpa(row: dict | None, name: str, train: bool) -> bool:
    """``name`` was measured faster than every SDPA kernel on this table row."""
    if row is None:
        return False
    times = row["train_ms" if train else "fwd_ms"]
    mine = times.get(name)
    sdpa = [t for b, t in times.items() if b.startswith("sdpa") and t is not None]
    if mine is None or not sdpa:
        return False
    return mine < min(sdpa)


def _measured_entry(q, cu_seqlens, max_seqlen) -> dict | None:
    # eager only (the SDPA kernel order, which compiled graphs leave to PyTorch); backends use _faster_steps
    if not q.is_cuda or torch.compiler.is_compiling():
        return None
    name = _device_name(q.device.index if q.device.index is not None else torch.cuda.current_device())
    layout = "varlen" if cu_seqlens is not None else "dense"
    seqlen = max_seqlen if cu_seqlens is not None else q.shape[1]
    return lookup_pref_row(attention_prefs(), name, layout, q.shape[-1], seqlen)


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@torch.compiler.assume_constant_result  # traced as its value: the file and device queries cannot be traced
def _faster_steps(device_index: int, layout: str, name: str, train: bool) -> tuple:
    """``((head_dim, ((largest seqlen, faster), ...), faster with no seqlen), ...)``: ``faster_than_sdpa`` of the
    row nearest each seqlen (log scale, as ``lookup_pref_row``), as steps that compare symbolic sizes too."""
    return _faster_steps_for(_device_name(device_index), layout, name, train)


# Eager dispatch asks on every CUDA attention call, so the steps are cached. Each entry keeps the table it was
# computed from and is used only while ``attention_prefs()`` returns that very table: a swapped table recomputes.
# (Keying on ``id(table)`` did not: the old table, once freed, often gives its id to the new one.)
_STEPS_CACHE: dict[tuple, tuple[dict, tuple]] = {}


def _faster_steps_for(device_name: str, layout: str, name: str, train: bool) -> tuple:
    prefs = attention_prefs()
    key = (device_name, layout, name, train)
    hit = _STEPS_CACHE.get(key)
    if hit is not None and hit[0] is prefs:
        return hit[1]
    table = prefs.get("devices", {}).get(device_name, {}).get(layout, {})
    out = []
    for head_dim, rows in table.items():
        rows = sorted(rows, key=lambda r: r["seqlen"])
        steps = []
        for i, row in enumerate(rows):
            nxt = rows[i + 1]["seqlen"] if i + 1 < len(rows) else None
            bound = math.sqrt(max(row["seqlen"], 1) * max(nxt, 1)) if nxt is not None else math.inf
            steps.append((bound, faster_than_sdpa(row, name, train)))
        mid = faster_than_sdpa(rows[len(rows) // 2], name, train)  # no max_seqlen given: the middle row
        out.append((int(head_dim), tuple(steps), mid))
    _STEPS_CACHE[key] = (prefs, tuple(out))
    return tuple(out)


def faster_on_device(device_index: int, varlen: bool, head_dim, seqlen, name: str, train: bool) -> bool:
    """``faster_than_sdpa`` of the table row nearest ``seqlen``; traces under torch.compile, where
    ``head_dim`` and ``seqlen`` may be symbolic: the comparisons below become guards."""
    for dim, steps, mid in _faster_steps(device_index, "varlen" if varlen else "dense", name, train):
        if head_dim == dim:
            if seqlen is None:
                return mid
            for bound, faster in steps:
                if seqlen <= bound:
                    return faster
    return False


def measured_faster(name: str, q, k, v, cu_seqlens=None, max_seqlen=None) -> bool:
    """Whether ``auto`` moves ``name`` ahead of sdpa: the table measured it faster than every SDPA kernel on this
    GPU and shape (fwd+bwd time when gradients are needed, forward time otherwise), eager and compiled alike."""
    if not q.is_cuda:
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    varlen = cu_seqlens is not None
    return faster_on_device(index, varlen, q.shape[-1], max_seqlen if varlen else q.shape[1], name,
                          _wants_grad(q, k, v))


_SDPA_KERNELS = {"sdpa:flash": "FLASH_ATTENTION", "sdpa:cudnn": "CUDNN_ATTENTION",
                 "sdpa:efficient": "EFFICIENT_ATTENTION", "sdpa:math": "MATH"}


def _preferred_sdpa_order(q, k, v, cu_seqlens, max_seqlen):
    """SDPA kernels fastest first per the table (None: let PyTorch choose)."""
    row = _measured_entry(q, cu_seqlens, max_seqlen)
    if row is None:
        return None
    times = row["train_ms" if _wants_grad(q, k, v) else "fwd_ms"]
    ranked = sorted((t, b) for b, t in times.items() if b in _SDPA_KERNELS and t is not None)
    if not ranked:
        return None
    from torch.nn.attention import SDPBackend

    order = [getattr(SDPBackend, _SDPA_KERNELS[b]) for _, b in ranked]
    # keep every kernel allowed (fastest first) so an input the fastest one refuses still runs
    for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        if getattr(SDPBackend, b) not in order:
            order.append(getattr(SDPBackend, b))
    return order


def _sdpa_dense(q, k, v, scale, order=None):
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if order is not None and not torch.compiler.is_compiling():
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(order, set_priority=True):
            out = F.scaled_dot_product_attention(qt, kt, vt, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, scale=scale)
    return out.transpose(1, 2)


def _sdpa_attention(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, torch.Tensor):
        scale = scale.reshape(())  # SDPA takes a float or a 0-dim tensor, not a (1,) one
    order = _preferred_sdpa_order(q, k, v, cu_seqlens, max_seqlen) if q.is_cuda else None
    if cu_seqlens is None:
        return _sdpa_dense(q, k, v, scale, order)
    # Packed sequences: one dense call per sequence keeps every SDPA backend (flash included) usable.
    cs = cu_seqlens.tolist()
    outs = [_sdpa_dense(q[None, a:b], k[None, a:b], v[None, a:b], scale, order)[0]
            for a, b in zip(cs, cs[1:]) if b > a]
    return torch.cat(outs, 0) if outs else q.new_empty(q.shape)


def _sdpa_reasons(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    if q.dtype == torch.float64 and q.is_cuda:
        return ["float64 on CUDA goes to the torch reference"]
    return []


def _no_reasons(*args, **kwargs):
    return []


# ---- triton (mae_fast.kernels.flash_attention) ---------------------------------------------------------

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
# Head dims that passed every GPU test (bench/results/gpu-tests-*.txt; bench_attention --check at MAE shapes) in
# the tiling this backend launches (the kernels' default, "split"; powers of two are one tile in every tiling, so
# their earlier results stand). Elsewhere on CUDA the kernel runs only with MAE_FAST_TRITON_UNVERIFIED=1.
GPU_VERIFIED = {"dense": (32, 64, 128), "packed": (32, 64)}


def triton_attention_reasons(q, k, v, softmax_scale, cu_seqlens, max_seqlen) -> list[str]:
    out = []
    if not q.is_cuda and not platform.interpreter():
        out.append("needs a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter)")
    if q.dtype not in TRITON_DTYPES:
        out.append(f"dtype {q.dtype} not supported (float16, bfloat16, float32)")
    elif q.is_cuda and q.dtype == torch.float32 and not platform.unverified_allowed():
        # compiled for sm_90 its IEEE fp32 dots spill kilobytes of registers at every tile size tried
        # (bench/compile_report.py --dtypes float32): correct but slow, so leave fp32 to SDPA on GPUs
        out.append("float32 on a GPU is not a fast path (fp32 dots spill registers); use bfloat16/float16 or sdpa")
    d = q.shape[-1]
    layout = "packed" if cu_seqlens is not None else "dense"
    if d > MAX_HEAD_DIM or d % 8 != 0 or d < 32:
        out.append(f"head dim {d} unsupported (a multiple of 8 from 32 to {MAX_HEAD_DIM})")
    elif q.is_cuda and not platform.gpu_verified(d in GPU_VERIFIED[layout]):
        out.append(f"head dim {d} {layout} not verified on GPU (experimental: MAE_FAST_TRITON_UNVERIFIED=1 allows it)")
    if q.shape != k.shape:
        out.append(f"query length {q.shape[-3]} differs from key length {k.shape[-3]} (self-attention only)")
    if cu_seqlens is not None and cu_seqlens.device != q.device:
        out.append(f"cu_seqlens on {cu_seqlens.device} but q on {q.device}")
    return out


# ---- flash-attn and xformers (public APIs: flash_attn_func / flash_attn_varlen_func,
# xformers.ops.memory_efficient_attention with fmha.BlockDiagonalMask for packed sequences) -------------

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _installed(module: str, package: str | None = None) -> str | None:
    """None when ``module`` can be imported (found without importing it), else why not (``package``: its PyPI name)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing
        found = False
    return None if found else f"{package or module} not installed"


def _library_reasons(q, cu_seqlens, dtypes, max_head_dim) -> list[str]:
    out = []
    if not q.is_cuda:
        out.append("needs a CUDA tensor")
    if q.dtype not in dtypes:
        out.append(f"dtype {q.dtype} not supported ({', '.join(str(d) for d in dtypes)})")
    d = q.shape[-1]
    if d % 8 != 0 or d > max_head_dim:
        out.append(f"head dim {d} unsupported (a multiple of 8 up to {max_head_dim})")
    if cu_seqlens is not None and cu_seqlens.device != q.device:
        out.append(f"cu_seqlens on {cu_seqlens.device} but q on {q.device}")
    return out


def _flash_attn_reasons(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    return _library_reasons(q, cu_seqlens, HALF_DTYPES, 256)


def _flash_attn_fn(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if cu_seqlens is None:
        return flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=softmax_scale, causal=False)
    cu = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max())
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0,
                                  softmax_scale=softmax_scale, causal=False)


def _xformers_reasons(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    return _library_reasons(q, cu_seqlens, HALF_DTYPES + (torch.float32,), 256)


def _xformers_fn(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    from xformers.ops import fmha, memory_efficient_attention

    if cu_seqlens is None:
        return memory_efficient_attention(q, k, v, attn_bias=None, scale=softmax_scale)
    seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    bias = fmha.BlockDiagonalMask.from_seqlens(seqlens)
    return memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=softmax_scale)[0]


# ---- flash-attn-4 (the CuTe-DSL FlashAttention, PyPI flash-attn-4, module flash_attn.cute) ----------------
# Its interface (flash_attn/cute/interface.py) validates: fp16/bf16 inputs (fp8 forward only, on sm_100), head dims
# that are multiples of 16 bytes / element size (8 for 16-bit types) from 8 to 256 on sm_90 and from 8 to 128 on
# sm_100/sm_110 (no padding of 80 to 96 or 128), dense or varlen (cu_seqlens, int32), non-causal by default. The
# backward runs on sm_90 and sm_100/sm_110 only (sm_80 and sm_120 have a forward without our training needs), so a
# training backend needs compute capability 9.x, 10.x or 11.x.

FA4_MAX_HEAD_DIM = {9: 256, 10: 128, 11: 128}


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _flash_attn_4_reasons(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    out = []
    if not q.is_cuda:
        return ["needs a CUDA tensor (compute capability 9.x or 10.x: Hopper or Blackwell)"]
    major, minor = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if major not in FA4_MAX_HEAD_DIM:
        out.append(f"compute capability {major}.{minor} unsupported (forward and backward need sm_90 or sm_100/sm_110)")
    if q.dtype not in HALF_DTYPES:
        out.append(f"dtype {q.dtype} not supported (float16, bfloat16)")
    d, most = q.shape[-1], FA4_MAX_HEAD_DIM.get(major, 128)
    if d % 8 != 0 or not 8 <= d <= most:
        out.append(f"head dim {d} unsupported (a multiple of 8 from 8 to {most} on sm_{major}x)")
    if cu_seqlens is not None and cu_seqlens.device != q.device:
        out.append(f"cu_seqlens on {cu_seqlens.device} but q on {q.device}")
    return out


@torch.compiler.disable  # CuTe-DSL kernels compile at their first call: not traceable, a graph break under compile
def _flash_attn_4_fn(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    scale = float(softmax_scale) if softmax_scale is not None else None
    if cu_seqlens is None:
        out = flash_attn_func(q, k, v, softmax_scale=scale, causal=False)
    else:
        cu = cu_seqlens.to(torch.int32).contiguous()
        if max_seqlen is None:
            max_seqlen = int((cu[1:] - cu[:-1]).max())
        out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=int(max_seqlen),
                                     max_seqlen_k=int(max_seqlen), softmax_scale=scale, causal=False)
    return out[0] if isinstance(out, tuple) else out  # (out, lse)


# ---- registration (order: dispatch.PRIORITY["attention"]) ------------------------------------------------

def _measured(name):
    def preferred(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
        return measured_faster(name, q, k, v, cu_seqlens, max_seqlen)
    return preferred


register_backend(Backend(op="attention", name="sdpa", fn=_sdpa_attention, reasons=_sdpa_reasons))
# flash_attention(q, k, v, softmax_scale, cu_seqlens, max_seqlen): the backend call's arguments, in order
register_backend(Backend(op="attention", name="triton", fn=triton_attention.flash_attention,
                         reasons=triton_attention_reasons,
                         available=platform.triton_unavailable, gpu=True, preferred=_measured("triton")))
register_backend(Backend(op="attention", name="flash_attn", fn=_flash_attn_fn, reasons=_flash_attn_reasons,
                         available=functools.partial(_installed, "flash_attn.flash_attn_interface", "flash_attn"),
                         gpu=True, preferred=_measured("flash_attn")))
register_backend(Backend(op="attention", name="flash_attn_4", fn=_flash_attn_4_fn, reasons=_flash_attn_4_reasons,
                         available=functools.partial(_installed, "flash_attn.cute", "flash-attn-4"), gpu=True,
                         preferred=_measured("flash_attn_4")))
register_backend(Backend(op="attention", name="xformers", fn=_xformers_fn, reasons=_xformers_reasons,
                         available=functools.partial(_installed, "xformers"), gpu=True,
                         preferred=_measured("xformers")))
register_backend(Backend(op="attention", name="torch", fn=_torch_attention, reasons=_no_reasons))


def attention(q, k, v, *, softmax_scale=None, cu_seqlens=None, max_seqlen=None, backend: str = "auto"):
    """softmax(q k^T * softmax_scale) v per head; see the module docstring for layouts."""
    check_attention_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    impl = select_backend("attention", backend, q, k, v, softmax_scale, cu_seqlens, max_seqlen)
    return impl.fn(q, k, v, softmax_scale, cu_seqlens, max_seqlen)
