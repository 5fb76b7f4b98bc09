"""Non-causal multi-head attention, laid out (batch, seqlen, heads, head_dim) as ``flash_attn_func``.

With ``cu_seqlens`` the inputs are packed (total_tokens, heads, head_dim) and sequence i occupies rows
``cu_seqlens[i]:cu_seqlens[i+1]``; sequences never attend across each other.
Backends here: ``torch`` (fp32 math reference) and ``sdpa`` (PyTorch's scaled_dot_product_attention,
which itself picks flash / cuDNN / efficient / math). Triton, flash-attn and xformers register elsewhere.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import Backend, register_backend, select_backend

__all__ = ["attention", "attention_reference", "check_attention_inputs"]

ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_attention_inputs(q, k, v, cu_seqlens=None, max_seqlen=None) -> None:
    """Raise a clear error for inputs no backend should accept."""
    op = "attention"
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
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{op}: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
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


def _sdpa_dense(q, k, v, scale):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def _sdpa_attention(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        return _sdpa_dense(q, k, v, scale)
    # Packed sequences: one dense call per sequence keeps every SDPA backend (flash included) usable.
    cs = cu_seqlens.tolist()
    outs = [_sdpa_dense(q[None, a:b], k[None, a:b], v[None, a:b], scale)[0] for a, b in zip(cs, cs[1:]) if b > a]
    return torch.cat(outs, 0) if outs else q.new_empty(q.shape)


def _no_reasons(*args, **kwargs):
    return []


def _sdpa_reasons(q, k, v, softmax_scale, cu_seqlens, max_seqlen):
    if q.dtype == torch.float64 and q.is_cuda:
        return ["float64 on CUDA goes to the torch reference"]
    return []


def _sdpa_priority(q, *args, **kwargs):
    return 50.0


register_backend(Backend(op="attention", name="torch", fn=_torch_attention, reasons=_no_reasons, priority=1000.0))
register_backend(Backend(op="attention", name="sdpa", fn=_sdpa_attention, reasons=_sdpa_reasons, priority=_sdpa_priority))


def attention(q, k, v, *, softmax_scale=None, cu_seqlens=None, max_seqlen=None, backend: str = "auto"):
    """softmax(q k^T * softmax_scale) v per head; see the module docstring for layouts."""
    check_attention_inputs(q, k, v, cu_seqlens, max_seqlen)
    impl = select_backend("attention", backend, q, k, v, softmax_scale, cu_seqlens, max_seqlen)
    return impl.fn(q, k, v, softmax_scale, cu_seqlens, max_seqlen)
