"""``flash_attn`` and ``xformers`` backends of ``attention``; each reports 'not installed' when missing.

Written against their public APIs: ``flash_attn.flash_attn_func`` / ``flash_attn_varlen_func`` and
``xformers.ops.memory_efficient_attention`` (with ``fmha.BlockDiagonalMask`` for packed sequences).
Both take the same (batch, seqlen, heads, head_dim) layout as ``attention``. They rank after sdpa unless
the measured preference table (``attention_prefs.json``) shows them faster on that device and shape.
"""
from __future__ import annotations

import importlib.util

import torch

from .attention import preferred_backend_rank
from .dispatch import Backend, register_backend

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _installed(module: str) -> str | None:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{module} not installed"


def _common_reasons(q, cu_seqlens, dtypes, max_head_dim) -> list[str]:
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


# ---- flash-attn ---------------------------------------------------------------------------------

def _flash_attn_reasons(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    return _common_reasons(q, cu_seqlens, HALF_DTYPES, 256)


def _flash_attn_fn(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if cu_seqlens is None:
        return flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=softmax_scale, causal=False)
    cu = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max())
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0,
                                  softmax_scale=softmax_scale, causal=False)


def _flash_attn_priority(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    return preferred_backend_rank("flash_attn", q, k, v, cu_seqlens, max_seqlen) + 1.0


# ---- xformers -----------------------------------------------------------------------------------

def _xformers_reasons(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    return _common_reasons(q, cu_seqlens, HALF_DTYPES + (torch.float32,), 256)


def _xformers_fn(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    from xformers.ops import fmha, memory_efficient_attention

    if cu_seqlens is None:
        return memory_efficient_attention(q, k, v, attn_bias=None, scale=softmax_scale)
    seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    bias = fmha.BlockDiagonalMask.from_seqlens(seqlens)
    return memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=softmax_scale)[0]


def _xformers_priority(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    return preferred_backend_rank("xformers", q, k, v, cu_seqlens, max_seqlen) + 2.0


register_backend(Backend(op="attention", name="flash_attn", fn=_flash_attn_fn, reasons=_flash_attn_reasons,
                         priority=_flash_attn_priority, available=lambda: _installed("flash_attn")))
register_backend(Backend(op="attention", name="xformers", fn=_xformers_fn, reasons=_xformers_reasons,
                         priority=_xformers_priority, available=lambda: _installed("xformers")))
