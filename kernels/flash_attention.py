"""Non-causal flash attention in Triton for ViT shapes: forward, backward, packed variable length.

Layout as ``flash_attn_func``: q/k/v (batch, seqlen, heads, head_dim), or packed (total, heads, head_dim)
with ``cu_seqlens`` (sequences never attend across). Any last-dim-contiguous strides are accepted.

Read top to bottom: reference -> head-dim tiling -> kernels -> launch configs -> launchers -> custom op
(fake implementation, autograd) -> :func:`flash_attention`, the differentiable entry point. The ``triton`` backend
of :func:`mae_fast.ops.attention` (its reasons, its place in dispatch) is in :mod:`mae_fast.ops.attention`.

Head dims that are not a power of two are covered according to ``tiling``, a launch parameter of each kernel:

- ``"split"`` (the default, ``DEFAULT_TILING``): a 64-column head tile (32 for head dims below 64), a middle 32
  where needed, and a last 32-column tile covering the LAST 32 columns: 40 -> 32 + 32, 72-96 -> 64 + 32,
  104-120 -> 64 + 32 + 32, i.e. the head dim rounded up to a multiple of 32 rather than to a power of two
  (80 computes 96 columns, not 128). Every load reads real columns only, contiguous and unmasked along the head
  dim, so the compiler vectorises it (16-byte) and sm_90 pipelines it (cp.async). Columns the last tile shares
  with the one before it are zeroed in one operand of each product (loaded once per program) and not stored.
- ``"single"``: the head dim sits in ONE power-of-two tile (40 -> 64, 72-96 -> 128); columns past the head dim
  are loaded through clamped column offsets and zeroed (``tl.where``) in the operands each program loads once,
  and not stored. Clamped offsets hide contiguity: sm_90 gets element-wise, unpipelined loads.
- ``"wrap"``: single tile, but the columns past the head dim load real columns further left (contiguous),
  zeroed only in the operands each program loads once.
- ``"equal"``: 32-column tiles only: 72-96 compute as 32 + 32 + a last 32, 40-56 as 32 + a last 32.

For head dims 32, 64 and 128 all are the same kernel. Launch configs (block sizes, warps, stages, tiling) come
from a tuned table if it has the shape, else from a rule over pre-pruned candidates by head dim and sequence
length (see "configs" below); ``bench/compile_report.py`` compiles what the launcher picks for sm_90.

Strides that are 16-byte multiples but not 16-element ones (a head dim of 88 or 72 in bf16) are passed to the
compiler as aligned (``_stride_alignment``), or it would fall back to unpipelined scalar loads. Sequence tails are
masked in-kernel. Backward is deterministic: dK/dV are computed by one program per key block looping over query
blocks, dQ by one program per query block looping over key blocks; no atomics.
"""
from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = [
    "attention_reference_lse",
    "flash_attn_forward",
    "flash_attn_backward",
    "flash_attention",
    "head_dim_tiles",
    "pick_config",
    "candidate_configs",
    "validate_config",
    "save_tuned",
    "tuned_table",
    "seqlen_bucket",
    "CONFIG_KERNELS",
    "DEFAULT_TILING",
    "TILINGS",
    "TUNED_PATH",
]

TILINGS = ("split", "single", "wrap", "equal")
DEFAULT_TILING = "split"
# how _load_tile treats the columns of a tile past the head dim: 0 none, clamped offsets, wrapped offsets
_COLS_CLAMP = 1
_COLS_WRAP = 2

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 128


# ---- reference ----------------------------------------------------------------------------------

def attention_reference_lse(q, k, v, softmax_scale=None, cu_seqlens=None):
    """fp64-capable reference returning (out, lse) in the kernel's layouts (lse: (B,H,N) or (H,total))."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is not None:
        cs = cu_seqlens.tolist()
        outs, lses = [], []
        for a, b in zip(cs, cs[1:]):
            o, l = attention_reference_lse(q[None, a:b], k[None, a:b], v[None, a:b], scale)
            outs.append(o[0])
            lses.append(l[0])
        return torch.cat(outs, 0), torch.cat(lses, 1)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


# ---- head-dim tiling ----------------------------------------------------------------------------

def head_dim_tiles(head_dim: int, tiling: str = DEFAULT_TILING) -> tuple[int, int, int]:
    """(D0, DM, D1): the head tile over columns [0, D0), a middle tile over [D0, D0 + DM) (0: none) and the last
    tile over the LAST D1 columns (0: none), as the kernels compute them for ``tiling`` (see the module docstring).

    No tile is narrower than 32 columns: on sm_90, 16-column bf16 tiles feeding wgmma read past their
    shared-memory buffer (compute-sanitizer) and gave NaNs.
    """
    if head_dim < 32 or head_dim % 8 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} unsupported: a multiple of 8 from 32 to {MAX_HEAD_DIM}")
    if tiling not in TILINGS:
        raise ValueError(f"tiling {tiling!r} unknown; choose from {TILINGS}")
    if head_dim & (head_dim - 1) == 0:  # a power of two: one tile in every tiling
        return head_dim, 0, 0
    if tiling == "split":  # 64 (or 32) + [32] + the last 32: the head dim rounded up to a multiple of 32
        d0 = 64 if head_dim > 64 else 32
        return d0, (32 if head_dim - d0 > 32 else 0), 32
    if tiling == "equal" and head_dim <= 96:
        return 32, (32 if head_dim > 64 else 0), 32
    return triton.next_power_of_2(head_dim), 0, 0


# ---- kernels ------------------------------------------------------------------------------------

@triton.jit
def _mm(a, b, acc, DOT_PREC: tl.constexpr):
    # "upcast": the CPU interpreter of Triton 3.8 mis-multiplies bf16 tiles, so feed it fp32 copies
    # (exact for bf16 values; products still accumulate in fp32 as on tensor cores).
    if DOT_PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _seq_bounds(CU_SEQLENS, b, seqlen, VARLEN: tl.constexpr):
    if VARLEN:
        start = tl.load(CU_SEQLENS + b).to(tl.int32)
        end = tl.load(CU_SEQLENS + b + 1).to(tl.int32)
        return start, end - start
    else:
        return b * 0, seqlen


@triton.jit
def _program_sequence(CU_SEQLENS, pid_bh, num_heads, seqlen, VARLEN: tl.constexpr):
    """(batch, head, first row) as int64 offsets and the sequence length of this program's (batch, head)."""
    b = pid_bh // num_heads
    start, L = _seq_bounds(CU_SEQLENS, b, seqlen, VARLEN)
    return b.to(tl.int64), (pid_bh % num_heads).to(tl.int64), start.to(tl.int64), L


@triton.jit
def _at(PTR, b64, s64, h64, stride_b, stride_n, stride_h):
    """Pointer to row 0 of this program's sequence and head (int64 offsets: no overflow on large tensors)."""
    return PTR + b64 * stride_b + s64 * stride_n + h64 * stride_h


@triton.jit
def _aligned(stride, ALIGN: tl.constexpr):
    # Triton only infers 16-element divisibility: a stride of 88 or 72 (16-byte multiples in 16-bit dtypes) would
    # otherwise read as unaligned, and its loads fall back to scalar accesses that cannot be pipelined.
    # (tl.multiple_of does not reach kernel arguments; a product with ALIGN carries the divisibility. Exact: the
    # launcher checked stride % ALIGN == 0.)
    if ALIGN > 1:
        return (stride // ALIGN) * ALIGN
    else:
        return stride


@triton.jit
def _aligned3(stride_b, stride_n, stride_h, ALIGN: tl.constexpr):
    return _aligned(stride_b, ALIGN), _aligned(stride_n, ALIGN), _aligned(stride_h, ALIGN)


@triton.jit
def _load_rows(base, offs_rows, stride_row, offs_d, row_limit, D: tl.constexpr,
               MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr, other):
    return _load_tile(base, offs_rows, stride_row, offs_d, row_limit, D, MASK_ROWS, MASK_D, other, True)


@triton.jit
def _load_rows_any_tail(base, offs_rows, stride_row, offs_d, row_limit, D: tl.constexpr,
                        MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr, other):
    # for inner-loop operands whose columns past the head dim need not be zero: each product they enter either
    # meets a zeroed operand (loaded once per program) or lands in output columns that are never stored
    return _load_tile(base, offs_rows, stride_row, offs_d, row_limit, D, MASK_ROWS, MASK_D, other, False)


@triton.jit
def _load_tile(base, offs_rows, stride_row, offs_d, row_limit, D: tl.constexpr,
               MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr, other, ZERO_TAIL: tl.constexpr):
    """A (rows, columns) tile. MASK_D says how columns at or past ``D`` are read: 0 (none are), 1 (clamped to
    column D - 1: a column-masked load made wgmma read past its shared-memory buffer on sm_90) or 2 (wrapped)."""
    if MASK_D == 2:
        # columns past the head dim read real columns (c - D + D % 32 lies in [0, D)), contiguous in runs of D's
        # largest power-of-two divisor, so the load stays vectorised and pipelined
        cols = tl.where(offs_d < D, offs_d, offs_d - (D - D % 32))
        safe = base + offs_rows[:, None] * stride_row + cols[None, :]
        if MASK_ROWS:
            x = tl.load(safe, mask=offs_rows[:, None] < row_limit, other=other)
        else:
            x = tl.load(safe)
        if ZERO_TAIL:
            x = tl.where(offs_d[None, :] < D, x, other)
        return x
    elif MASK_D:
        safe = base + offs_rows[:, None] * stride_row + tl.minimum(offs_d, D - 1)[None, :]
        if MASK_ROWS:
            x = tl.load(safe, mask=offs_rows[:, None] < row_limit, other=other)
        else:
            x = tl.load(safe)
        return tl.where(offs_d[None, :] < D, x, other)
    else:
        ptrs = base + offs_rows[:, None] * stride_row + offs_d[None, :]
        if MASK_ROWS:
            return tl.load(ptrs, mask=offs_rows[:, None] < row_limit, other=other)
        else:
            return tl.load(ptrs)


@triton.jit
def _store_rows(base, val, offs_rows, stride_row, offs_d, row_limit, D: tl.constexpr, MASK_D: tl.constexpr,
                D_LO: tl.constexpr):
    # D_LO > 0: an overlapping tail tile; its columns below D_LO belong to the D0 tile and are not stored
    ptrs = base + offs_rows[:, None] * stride_row + offs_d[None, :]
    if MASK_D:
        tl.store(ptrs, val, mask=(offs_rows[:, None] < row_limit) & (offs_d[None, :] < D))
    elif D_LO > 0:
        tl.store(ptrs, val, mask=(offs_rows[:, None] < row_limit) & (offs_d[None, :] >= D_LO))
    else:
        tl.store(ptrs, val, mask=offs_rows[:, None] < row_limit)


@triton.jit
def _tail_cols(HEAD_DIM: tl.constexpr, D1: tl.constexpr):
    """Columns of the tail tile: the LAST D1 columns of the head, so every column is a real one."""
    if D1 > 0:
        return (HEAD_DIM - D1) + tl.arange(0, D1)
    else:
        return tl.arange(0, 32)  # unused


@triton.jit
def _mid_cols(D0: tl.constexpr, DM: tl.constexpr):
    """Columns of the middle tile (``tiling="equal"``): [D0, D0 + DM), all real columns."""
    if DM > 0:
        return D0 + tl.arange(0, DM)
    else:
        return tl.arange(0, 32)  # unused


@triton.jit
def _zero_overlap(x, offs_d1, D0: tl.constexpr, OVERLAP: tl.constexpr):
    # Columns the tail tile shares with the D0 tile: zeroed in ONE operand of each product, so they count once.
    if OVERLAP:
        return tl.where(offs_d1[None, :] >= D0, x, 0.0)
    else:
        return x


@triton.jit
def _fwd_inner(acc0, accm, acc1, m_i, l_i, q0, qm, q1, k_base, v_base, stride_kn, stride_vn, start_n, L, qk_scale,
               offs_n, offs_d0, offs_dm, offs_d1,
               HEAD_DIM: tl.constexpr, DM: tl.constexpr, D1: tl.constexpr, MASK_D0: tl.constexpr,
               MASK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    rows = start_n + offs_n
    k0 = _load_rows_any_tail(k_base, rows, stride_kn, offs_d0, L, HEAD_DIM, MASK_N, MASK_D0, 0.0)
    qk = _mm(q0, tl.trans(k0), None, DOT_PREC)
    if DM > 0:
        km = _load_rows(k_base, rows, stride_kn, offs_dm, L, HEAD_DIM, MASK_N, False, 0.0)
        qk = _mm(qm, tl.trans(km), qk, DOT_PREC)
    if D1 > 0:
        k1 = _load_rows(k_base, rows, stride_kn, offs_d1, L, HEAD_DIM, MASK_N, False, 0.0)
        qk = _mm(q1, tl.trans(k1), qk, DOT_PREC)
    qk = qk * qk_scale
    if MASK_N:
        qk = tl.where(rows[None, :] < L, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v0 = _load_rows_any_tail(v_base, rows, stride_vn, offs_d0, L, HEAD_DIM, MASK_N, MASK_D0, 0.0)
    p_in = p.to(v0.dtype)
    acc0 = _mm(p_in, v0, acc0 * alpha[:, None], DOT_PREC)
    if DM > 0:
        vm = _load_rows(v_base, rows, stride_vn, offs_dm, L, HEAD_DIM, MASK_N, False, 0.0)
        accm = _mm(p_in, vm, accm * alpha[:, None], DOT_PREC)
    if D1 > 0:
        v1 = _load_rows(v_base, rows, stride_vn, offs_d1, L, HEAD_DIM, MASK_N, False, 0.0)
        acc1 = _mm(p_in, v1, acc1 * alpha[:, None], DOT_PREC)
    return acc0, accm, acc1, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_lb, stride_lh,
    num_heads, seqlen, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, DM: tl.constexpr, D1: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr, COL_MODE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b64, h64, s64, L = _program_sequence(CU_SEQLENS, tl.program_id(1), num_heads, seqlen, VARLEN)
    if pid_m * BLOCK_M >= L:
        return
    stride_qb, stride_qn, stride_qh = _aligned3(stride_qb, stride_qn, stride_qh, STRIDE_ALIGN)
    stride_kb, stride_kn, stride_kh = _aligned3(stride_kb, stride_kn, stride_kh, STRIDE_ALIGN)
    stride_vb, stride_vn, stride_vh = _aligned3(stride_vb, stride_vn, stride_vh, STRIDE_ALIGN)
    stride_ob, stride_on, stride_oh = _aligned3(stride_ob, stride_on, stride_oh, STRIDE_ALIGN)
    q_base = _at(Q, b64, s64, h64, stride_qb, stride_qn, stride_qh)
    k_base = _at(K, b64, s64, h64, stride_kb, stride_kn, stride_kh)
    v_base = _at(V, b64, s64, h64, stride_vb, stride_vn, stride_vh)
    o_base = _at(O, b64, s64, h64, stride_ob, stride_on, stride_oh)
    MASK_D0: tl.constexpr = COL_MODE if D0 > HEAD_DIM else 0  # columns past the head dim (single/wrap)
    OVERLAP: tl.constexpr = D0 + DM + D1 > HEAD_DIM  # the tail tile starts inside the D0 (or middle) tile
    TAIL_LO: tl.constexpr = D0 + DM if D0 + DM + D1 > HEAD_DIM else 0  # its first column to store

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    offs_dm = _mid_cols(D0, DM)
    offs_d1 = _tail_cols(HEAD_DIM, D1)

    q0 = _load_rows(q_base, offs_m, stride_qn, offs_d0, L, HEAD_DIM, True, MASK_D0, 0.0)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if DM > 0:
        qm = _load_rows(q_base, offs_m, stride_qn, offs_dm, L, HEAD_DIM, True, False, 0.0)
        accm = tl.zeros([BLOCK_M, DM], dtype=tl.float32)
    else:
        qm = q0
        accm = acc0
    if D1 > 0:
        q1 = _zero_overlap(_load_rows(q_base, offs_m, stride_qn, offs_d1, L, HEAD_DIM, True, False, 0.0),
                           offs_d1, D0 + DM, OVERLAP)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    else:
        q1 = q0
        acc1 = acc0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    n_full = (L // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, accm, acc1, m_i, l_i = _fwd_inner(acc0, accm, acc1, m_i, l_i, q0, qm, q1,
                                                k_base + start_n * stride_kn, v_base + start_n * stride_vn,
                                                stride_kn, stride_vn, 0, L - start_n, qk_scale, offs_n, offs_d0,
                                                offs_dm, offs_d1, HEAD_DIM, DM, D1, MASK_D0, False, DOT_PREC)
    if n_full < L:
        acc0, accm, acc1, m_i, l_i = _fwd_inner(acc0, accm, acc1, m_i, l_i, q0, qm, q1,
                                                k_base + n_full * stride_kn, v_base + n_full * stride_vn,
                                                stride_kn, stride_vn, 0, L - n_full, qk_scale, offs_n, offs_d0,
                                                offs_dm, offs_d1, HEAD_DIM, DM, D1, MASK_D0, True, DOT_PREC)

    inv_l = 1.0 / l_i
    _store_rows(o_base, (acc0 * inv_l[:, None]).to(O.dtype.element_ty), offs_m, stride_on, offs_d0, L,
                HEAD_DIM, MASK_D0, 0)
    if DM > 0:
        _store_rows(o_base, (accm * inv_l[:, None]).to(O.dtype.element_ty), offs_m, stride_on, offs_dm, L,
                    HEAD_DIM, False, 0)
    if D1 > 0:
        _store_rows(o_base, (acc1 * inv_l[:, None]).to(O.dtype.element_ty), offs_m, stride_on, offs_d1, L,
                    HEAD_DIM, False, TAIL_LO)
    # natural-log LSE: m_i and log2(l_i) are in the base-2 scaled domain
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + s64 + offs_m, lse, mask=offs_m < L)


@triton.jit
def _bwd_delta_kernel(
    O, DO, DLSE, DELTA, CU_SEQLENS,
    stride_ob, stride_on, stride_oh,
    stride_db, stride_dn, stride_dh,
    stride_lb, stride_lh,
    num_heads, seqlen,
    HEAD_DIM: tl.constexpr, D_TILE: tl.constexpr, VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
):
    # delta_i = sum_d o_id * do_id (minus dLSE_i when the LSE itself receives a gradient)
    pid_m = tl.program_id(0)
    b64, h64, s64, L = _program_sequence(CU_SEQLENS, tl.program_id(1), num_heads, seqlen, VARLEN)
    if pid_m * BLOCK_M >= L:
        return
    stride_ob, stride_on, stride_oh = _aligned3(stride_ob, stride_on, stride_oh, STRIDE_ALIGN)
    stride_db, stride_dn, stride_dh = _aligned3(stride_db, stride_dn, stride_dh, STRIDE_ALIGN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_TILE)
    # no dot here, so the columns past the head dim are simply masked: HEAD_DIM is a multiple of 8, so the mask is
    # constant over runs of 8 columns and the loads stay 16-byte vectors
    mask = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    o_ptrs = _at(O, b64, s64, h64, stride_ob, stride_on, stride_oh) + offs_m[:, None] * stride_on + offs_d[None, :]
    do_ptrs = _at(DO, b64, s64, h64, stride_db, stride_dn, stride_dh) + offs_m[:, None] * stride_dn + offs_d[None, :]
    o = tl.load(o_ptrs, mask=mask, other=0.0)
    do = tl.load(do_ptrs, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse_off = b64 * stride_lb + h64 * stride_lh + s64 + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + lse_off, mask=offs_m < L, other=0.0)
    tl.store(DELTA + lse_off, delta, mask=offs_m < L)


@triton.jit
def _bwd_dkdv_inner(dk0, dkm, dk1, dv0, dvm, dv1, k0, km, k1, v0, vm, v1, q_base, do_base, lse_ptr, delta_ptr,
                    stride_qn, stride_dn, L, qk_scale_log2, offs_m, offs_d0, offs_dm, offs_d1,
                    HEAD_DIM: tl.constexpr, DM: tl.constexpr, D1: tl.constexpr, MASK_D0: tl.constexpr,
                    MASK_M: tl.constexpr, DOT_PREC: tl.constexpr):
    # transposed formulation: rows are keys, columns are queries
    q0 = _load_rows_any_tail(q_base, offs_m, stride_qn, offs_d0, L, HEAD_DIM, MASK_M, MASK_D0, 0.0)
    do0 = _load_rows_any_tail(do_base, offs_m, stride_dn, offs_d0, L, HEAD_DIM, MASK_M, MASK_D0, 0.0)
    if MASK_M:
        lse2 = tl.load(lse_ptr + offs_m, mask=offs_m < L, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + offs_m, mask=offs_m < L, other=0.0)
    else:
        lse2 = tl.load(lse_ptr + offs_m) * 1.4426950408889634
        delta = tl.load(delta_ptr + offs_m)
    qkT = _mm(k0, tl.trans(q0), None, DOT_PREC)
    if DM > 0:
        qm = _load_rows(q_base, offs_m, stride_qn, offs_dm, L, HEAD_DIM, MASK_M, False, 0.0)
        dom = _load_rows(do_base, offs_m, stride_dn, offs_dm, L, HEAD_DIM, MASK_M, False, 0.0)
        qkT = _mm(km, tl.trans(qm), qkT, DOT_PREC)
    if D1 > 0:
        q1 = _load_rows(q_base, offs_m, stride_qn, offs_d1, L, HEAD_DIM, MASK_M, False, 0.0)
        do1 = _load_rows(do_base, offs_m, stride_dn, offs_d1, L, HEAD_DIM, MASK_M, False, 0.0)
        qkT = _mm(k1, tl.trans(q1), qkT, DOT_PREC)
    pT = tl.math.exp2(qkT * qk_scale_log2 - lse2[None, :])
    pT_in = pT.to(q0.dtype)
    dv0 = _mm(pT_in, do0, dv0, DOT_PREC)
    dpT = _mm(v0, tl.trans(do0), None, DOT_PREC)
    if DM > 0:
        dvm = _mm(pT_in, dom, dvm, DOT_PREC)
        dpT = _mm(vm, tl.trans(dom), dpT, DOT_PREC)
    if D1 > 0:
        dv1 = _mm(pT_in, do1, dv1, DOT_PREC)
        dpT = _mm(v1, tl.trans(do1), dpT, DOT_PREC)
    dsT = (pT * (dpT - delta[None, :])).to(q0.dtype)
    dk0 = _mm(dsT, q0, dk0, DOT_PREC)
    if DM > 0:
        dkm = _mm(dsT, qm, dkm, DOT_PREC)
    if D1 > 0:
        dk1 = _mm(dsT, q1, dk1, DOT_PREC)
    return dk0, dkm, dk1, dv0, dvm, dv1


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_lb, stride_lh,
    num_heads, seqlen, softmax_scale, qk_scale_log2,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, DM: tl.constexpr, D1: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr, COL_MODE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b64, h64, s64, L = _program_sequence(CU_SEQLENS, tl.program_id(1), num_heads, seqlen, VARLEN)
    if pid_n * BLOCK_N >= L:
        return
    stride_qb, stride_qn, stride_qh = _aligned3(stride_qb, stride_qn, stride_qh, STRIDE_ALIGN)
    stride_kb, stride_kn, stride_kh = _aligned3(stride_kb, stride_kn, stride_kh, STRIDE_ALIGN)
    stride_vb, stride_vn, stride_vh = _aligned3(stride_vb, stride_vn, stride_vh, STRIDE_ALIGN)
    stride_dob, stride_don, stride_doh = _aligned3(stride_dob, stride_don, stride_doh, STRIDE_ALIGN)
    stride_dkb, stride_dkn, stride_dkh = _aligned3(stride_dkb, stride_dkn, stride_dkh, STRIDE_ALIGN)
    stride_dvb, stride_dvn, stride_dvh = _aligned3(stride_dvb, stride_dvn, stride_dvh, STRIDE_ALIGN)
    MASK_D0: tl.constexpr = COL_MODE if D0 > HEAD_DIM else 0  # columns past the head dim (single/wrap)
    OVERLAP: tl.constexpr = D0 + DM + D1 > HEAD_DIM  # the tail tile starts inside the D0 (or middle) tile
    TAIL_LO: tl.constexpr = D0 + DM if D0 + DM + D1 > HEAD_DIM else 0  # its first column to store
    q_base = _at(Q, b64, s64, h64, stride_qb, stride_qn, stride_qh)
    do_base = _at(DO, b64, s64, h64, stride_dob, stride_don, stride_doh)
    k_base = _at(K, b64, s64, h64, stride_kb, stride_kn, stride_kh)
    v_base = _at(V, b64, s64, h64, stride_vb, stride_vn, stride_vh)
    lse_ptr = _at(LSE, b64, s64, h64, stride_lb, 1, stride_lh)
    delta_ptr = _at(DELTA, b64, s64, h64, stride_lb, 1, stride_lh)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, D0)
    offs_dm = _mid_cols(D0, DM)
    offs_d1 = _tail_cols(HEAD_DIM, D1)
    k0 = _load_rows(k_base, offs_n, stride_kn, offs_d0, L, HEAD_DIM, True, MASK_D0, 0.0)
    v0 = _load_rows(v_base, offs_n, stride_vn, offs_d0, L, HEAD_DIM, True, MASK_D0, 0.0)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if DM > 0:
        km = _load_rows(k_base, offs_n, stride_kn, offs_dm, L, HEAD_DIM, True, False, 0.0)
        vm = _load_rows(v_base, offs_n, stride_vn, offs_dm, L, HEAD_DIM, True, False, 0.0)
        dkm = tl.zeros([BLOCK_N, DM], dtype=tl.float32)
        dvm = tl.zeros([BLOCK_N, DM], dtype=tl.float32)
    else:
        km = k0
        vm = v0
        dkm = dk0
        dvm = dv0
    if D1 > 0:
        k1 = _zero_overlap(_load_rows(k_base, offs_n, stride_kn, offs_d1, L, HEAD_DIM, True, False, 0.0),
                           offs_d1, D0 + DM, OVERLAP)
        v1 = _zero_overlap(_load_rows(v_base, offs_n, stride_vn, offs_d1, L, HEAD_DIM, True, False, 0.0),
                           offs_d1, D0 + DM, OVERLAP)
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    else:
        k1 = k0
        v1 = v0
        dk1 = dk0
        dv1 = dv0

    m_full = (L // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk0, dkm, dk1, dv0, dvm, dv1 = _bwd_dkdv_inner(
            dk0, dkm, dk1, dv0, dvm, dv1, k0, km, k1, v0, vm, v1,
            q_base + start_m * stride_qn, do_base + start_m * stride_don, lse_ptr + start_m, delta_ptr + start_m,
            stride_qn, stride_don, L - start_m, qk_scale_log2, offs_m, offs_d0, offs_dm, offs_d1,
            HEAD_DIM, DM, D1, MASK_D0, False, DOT_PREC)
    if m_full < L:
        dk0, dkm, dk1, dv0, dvm, dv1 = _bwd_dkdv_inner(
            dk0, dkm, dk1, dv0, dvm, dv1, k0, km, k1, v0, vm, v1,
            q_base + m_full * stride_qn, do_base + m_full * stride_don, lse_ptr + m_full, delta_ptr + m_full,
            stride_qn, stride_don, L - m_full, qk_scale_log2, offs_m, offs_d0, offs_dm, offs_d1,
            HEAD_DIM, DM, D1, MASK_D0, True, DOT_PREC)

    dk_base = _at(DK, b64, s64, h64, stride_dkb, stride_dkn, stride_dkh)
    dv_base = _at(DV, b64, s64, h64, stride_dvb, stride_dvn, stride_dvh)
    _store_rows(dk_base, (dk0 * softmax_scale).to(DK.dtype.element_ty), offs_n, stride_dkn, offs_d0, L,
                HEAD_DIM, MASK_D0, 0)
    _store_rows(dv_base, dv0.to(DV.dtype.element_ty), offs_n, stride_dvn, offs_d0, L, HEAD_DIM, MASK_D0, 0)
    if DM > 0:
        _store_rows(dk_base, (dkm * softmax_scale).to(DK.dtype.element_ty), offs_n, stride_dkn, offs_dm, L,
                    HEAD_DIM, False, 0)
        _store_rows(dv_base, dvm.to(DV.dtype.element_ty), offs_n, stride_dvn, offs_dm, L, HEAD_DIM, False, 0)
    if D1 > 0:
        _store_rows(dk_base, (dk1 * softmax_scale).to(DK.dtype.element_ty), offs_n, stride_dkn, offs_d1, L,
                    HEAD_DIM, False, TAIL_LO)
        _store_rows(dv_base, dv1.to(DV.dtype.element_ty), offs_n, stride_dvn, offs_d1, L, HEAD_DIM, False, TAIL_LO)


@triton.jit
def _bwd_dq_inner(dq0, dqm, dq1, q0, qm, q1, do0, dom, do1, lse2, delta, k_base, v_base, stride_kn, stride_vn, L,
                  qk_scale_log2, offs_n, offs_d0, offs_dm, offs_d1,
                  HEAD_DIM: tl.constexpr, DM: tl.constexpr, D1: tl.constexpr, MASK_D0: tl.constexpr,
                  MASK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    k0 = _load_rows_any_tail(k_base, offs_n, stride_kn, offs_d0, L, HEAD_DIM, MASK_N, MASK_D0, 0.0)
    v0 = _load_rows_any_tail(v_base, offs_n, stride_vn, offs_d0, L, HEAD_DIM, MASK_N, MASK_D0, 0.0)
    qk = _mm(q0, tl.trans(k0), None, DOT_PREC)
    dp = _mm(do0, tl.trans(v0), None, DOT_PREC)
    if DM > 0:
        km = _load_rows(k_base, offs_n, stride_kn, offs_dm, L, HEAD_DIM, MASK_N, False, 0.0)
        vm = _load_rows(v_base, offs_n, stride_vn, offs_dm, L, HEAD_DIM, MASK_N, False, 0.0)
        qk = _mm(qm, tl.trans(km), qk, DOT_PREC)
        dp = _mm(dom, tl.trans(vm), dp, DOT_PREC)
    if D1 > 0:
        k1 = _load_rows(k_base, offs_n, stride_kn, offs_d1, L, HEAD_DIM, MASK_N, False, 0.0)
        v1 = _load_rows(v_base, offs_n, stride_vn, offs_d1, L, HEAD_DIM, MASK_N, False, 0.0)
        qk = _mm(q1, tl.trans(k1), qk, DOT_PREC)
        dp = _mm(do1, tl.trans(v1), dp, DOT_PREC)
    p = tl.math.exp2(qk * qk_scale_log2 - lse2[:, None])
    if MASK_N:
        p = tl.where(offs_n[None, :] < L, p, 0.0)
    ds = (p * (dp - delta[:, None])).to(k0.dtype)
    dq0 = _mm(ds, k0, dq0, DOT_PREC)
    if DM > 0:
        dqm = _mm(ds, km, dqm, DOT_PREC)
    if D1 > 0:
        dq1 = _mm(ds, k1, dq1, DOT_PREC)
    return dq0, dqm, dq1


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, CU_SEQLENS,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_dqb, stride_dqn, stride_dqh,
    stride_lb, stride_lh,
    num_heads, seqlen, softmax_scale, qk_scale_log2,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, DM: tl.constexpr, D1: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr, COL_MODE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b64, h64, s64, L = _program_sequence(CU_SEQLENS, tl.program_id(1), num_heads, seqlen, VARLEN)
    if pid_m * BLOCK_M >= L:
        return
    stride_qb, stride_qn, stride_qh = _aligned3(stride_qb, stride_qn, stride_qh, STRIDE_ALIGN)
    stride_kb, stride_kn, stride_kh = _aligned3(stride_kb, stride_kn, stride_kh, STRIDE_ALIGN)
    stride_vb, stride_vn, stride_vh = _aligned3(stride_vb, stride_vn, stride_vh, STRIDE_ALIGN)
    stride_dob, stride_don, stride_doh = _aligned3(stride_dob, stride_don, stride_doh, STRIDE_ALIGN)
    stride_dqb, stride_dqn, stride_dqh = _aligned3(stride_dqb, stride_dqn, stride_dqh, STRIDE_ALIGN)
    MASK_D0: tl.constexpr = COL_MODE if D0 > HEAD_DIM else 0  # columns past the head dim (single/wrap)
    OVERLAP: tl.constexpr = D0 + DM + D1 > HEAD_DIM  # the tail tile starts inside the D0 (or middle) tile
    TAIL_LO: tl.constexpr = D0 + DM if D0 + DM + D1 > HEAD_DIM else 0  # its first column to store
    q_base = _at(Q, b64, s64, h64, stride_qb, stride_qn, stride_qh)
    do_base = _at(DO, b64, s64, h64, stride_dob, stride_don, stride_doh)
    k_base = _at(K, b64, s64, h64, stride_kb, stride_kn, stride_kh)
    v_base = _at(V, b64, s64, h64, stride_vb, stride_vn, stride_vh)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    offs_dm = _mid_cols(D0, DM)
    offs_d1 = _tail_cols(HEAD_DIM, D1)
    q0 = _load_rows(q_base, offs_m, stride_qn, offs_d0, L, HEAD_DIM, True, MASK_D0, 0.0)
    do0 = _load_rows(do_base, offs_m, stride_don, offs_d0, L, HEAD_DIM, True, MASK_D0, 0.0)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if DM > 0:
        qm = _load_rows(q_base, offs_m, stride_qn, offs_dm, L, HEAD_DIM, True, False, 0.0)
        dom = _load_rows(do_base, offs_m, stride_don, offs_dm, L, HEAD_DIM, True, False, 0.0)
        dqm = tl.zeros([BLOCK_M, DM], dtype=tl.float32)
    else:
        qm = q0
        dom = do0
        dqm = dq0
    if D1 > 0:
        q1 = _zero_overlap(_load_rows(q_base, offs_m, stride_qn, offs_d1, L, HEAD_DIM, True, False, 0.0),
                           offs_d1, D0 + DM, OVERLAP)
        do1 = _zero_overlap(_load_rows(do_base, offs_m, stride_don, offs_d1, L, HEAD_DIM, True, False, 0.0),
                            offs_d1, D0 + DM, OVERLAP)
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    else:
        q1 = q0
        do1 = do0
        dq1 = dq0
    lse_off = b64 * stride_lb + h64 * stride_lh + s64 + offs_m
    lse2 = tl.load(LSE + lse_off, mask=offs_m < L, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + lse_off, mask=offs_m < L, other=0.0)

    n_full = (L // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq0, dqm, dq1 = _bwd_dq_inner(dq0, dqm, dq1, q0, qm, q1, do0, dom, do1, lse2, delta,
                                      k_base + start_n * stride_kn, v_base + start_n * stride_vn, stride_kn,
                                      stride_vn, L - start_n, qk_scale_log2, offs_n, offs_d0, offs_dm, offs_d1,
                                      HEAD_DIM, DM, D1, MASK_D0, False, DOT_PREC)
    if n_full < L:
        dq0, dqm, dq1 = _bwd_dq_inner(dq0, dqm, dq1, q0, qm, q1, do0, dom, do1, lse2, delta,
                                      k_base + n_full * stride_kn, v_base + n_full * stride_vn, stride_kn,
                                      stride_vn, L - n_full, qk_scale_log2, offs_n, offs_d0, offs_dm, offs_d1,
                                      HEAD_DIM, DM, D1, MASK_D0, True, DOT_PREC)

    dq_base = _at(DQ, b64, s64, h64, stride_dqb, stride_dqn, stride_dqh)
    _store_rows(dq_base, (dq0 * softmax_scale).to(DQ.dtype.element_ty), offs_m, stride_dqn, offs_d0, L,
                HEAD_DIM, MASK_D0, 0)
    if DM > 0:
        _store_rows(dq_base, (dqm * softmax_scale).to(DQ.dtype.element_ty), offs_m, stride_dqn, offs_dm, L,
                    HEAD_DIM, False, 0)
    if D1 > 0:
        _store_rows(dq_base, (dq1 * softmax_scale).to(DQ.dtype.element_ty), offs_m, stride_dqn, offs_d1, L,
                    HEAD_DIM, False, TAIL_LO)


# ---- configs ------------------------------------------------------------------------------------

CONFIG_KERNELS = ("fwd", "dkdv", "dq")  # the tiled kernels: keys of candidate_configs() and of config=
_ALL_KERNELS = CONFIG_KERNELS + ("delta",)  # the row-sum kernel of the backward takes only BLOCK_M / num_warps
_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")

# (kernel, head-dim tiles of the "split" tiling) -> candidate launch configs (BLOCK_M, BLOCK_N, num_warps,
# num_stages), most preferred first. Pre-pruned: each compiles for sm_90 with no register spill and with its loads
# staged through shared memory (cp.async) as 16-byte vectors (dense), with triton 3.6 and 3.8, at every
# head dim of its class (bench/compile_report.py --search; bench/results/compile-search-sm90-*). BLOCK_M is the
# query block, BLOCK_N the key block, in every kernel (dK/dV: one program per key block looping over queries).
_SEARCH = {  # the space the candidates were pruned from (bench/compile_report.py --search), most preferred first
    "fwd": ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (64, 128, 4, 2),
            (128, 32, 8, 3), (64, 32, 4, 3)),
    "dkdv": ((64, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 2), (32, 64, 4, 3), (64, 128, 8, 3),
             (128, 64, 8, 2), (64, 64, 4, 2)),
    # dq (128, 64, 8, 3) is left out: it faults at head dim 80 on sm_90 with triton 3.6 (bench/results/)
    "dq": ((128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2),
           (128, 32, 8, 3)),
}
_CANDIDATES: dict[tuple[str, tuple[int, int, int]], tuple[tuple[int, int, int, int], ...]] = {
    ("fwd", (32, 0, 0)): ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 8, 3), (64, 32, 4, 3)),
    ("fwd", (32, 0, 32)): ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 8, 3), (64, 32, 4, 3)),
    ("fwd", (64, 0, 0)): ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 8, 3), (64, 32, 4, 3)),
    ("fwd", (64, 0, 32)): ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3)),
    ("fwd", (128, 0, 0)): ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3)),
    ("dkdv", (32, 0, 0)): ((64, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 2), (32, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2)),
    ("dkdv", (32, 0, 32)): ((64, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 2), (32, 64, 4, 3), (64, 128, 8, 3), (64, 64, 4, 2)),
    ("dkdv", (64, 0, 0)): ((64, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 2), (32, 64, 4, 3), (64, 128, 8, 3), (64, 64, 4, 2)),
    ("dkdv", (64, 0, 32)): ((64, 64, 8, 3), (32, 128, 8, 2), (32, 64, 4, 3)),
    ("dkdv", (128, 0, 0)): ((64, 64, 8, 3), (32, 128, 8, 2)),
    ("dq", (32, 0, 0)): ((128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 8, 3)),
    ("dq", (32, 0, 32)): ((128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 8, 3)),
    ("dq", (64, 0, 0)): ((128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 8, 3)),
    ("dq", (64, 0, 32)): ((128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 128, 8, 2), (128, 32, 8, 3)),
    ("dq", (128, 0, 0)): ((128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 3)),
}
# head-dim classes without measured candidates take those of the next wider class
_CLASS_ORDER = ((32, 0, 0), (32, 0, 32), (64, 0, 0), (64, 0, 32), (64, 32, 32), (128, 0, 0))


def _tile_class(head_dim: int, tiling: str) -> tuple[int, int, int]:
    tiles = head_dim_tiles(head_dim, tiling)
    if ("fwd", tiles) in _CANDIDATES:
        return tiles
    # a head dim no MAE model uses (e.g. 104: 64 + 32 + 32 columns) borrows the candidates of the narrowest
    # searched class at least as wide: correct at any config, only its spill-freedom is unchecked
    width = sum(tiles)
    return next(c for c in _CLASS_ORDER if sum(c) >= width and ("fwd", c) in _CANDIDATES)


def _row_efficiency(block: int, outer: bool, packed: bool) -> float:
    # relative useful work per padded row: small tiles feed wgmma narrower products (outer block: fewer rows per
    # warpgroup; inner block: more loop trips per output tile)
    if outer:
        eff = {16: 0.4, 32: 0.6, 64: 0.85, 128: 1.0, 256: 1.0}[block]
        return eff * (0.9 if packed and block >= 128 else 1.0)  # packed sequences are mostly shorter than the max
    return {16: 0.5, 32: 0.8, 64: 1.0, 128: 1.0, 256: 1.0}[block]


def _shape_cost(kernel: str, cfg: dict, seqlen: int, packed: bool) -> float:
    """Tensor-core work of one (batch, head) with the sequence padded to whole tiles, over tile efficiency: the
    seqlen half of the rule (290 tokens: 3 x 128-row tiles pad 32% of the rows, 5 x 64-row tiles 10%)."""
    outer, inner = (cfg["BLOCK_N"], cfg["BLOCK_M"]) if kernel == "dkdv" else (cfg["BLOCK_M"], cfg["BLOCK_N"])
    n = max(int(seqlen), 1)
    padded = lambda b: -(-n // b) * b  # noqa: E731
    return padded(outer) * padded(inner) / (_row_efficiency(outer, True, packed) * _row_efficiency(inner, False,
                                                                                                    packed))


def candidate_configs(head_dim: int, seqlen: int, *, packed: bool = False, tiling: str = "split"
                      ) -> dict[str, list[dict]]:
    """{"fwd" | "dkdv" | "dq": [launch config, ...]} for bf16/fp16 on sm_90, the launcher's pick first.

    Each config is ``dict(BLOCK_M, BLOCK_N, num_warps, num_stages, tiling)`` and can be passed as
    ``flash_attention(..., config={kernel: cfg})``. The lists are the pre-pruned candidates of the head dim's tile
    class (spill-free, pipelined, vectorised when compiled for sm_90), ordered by :func:`_shape_cost` at
    ``seqlen`` (ties: the class's order of preference), so one GPU call can autotune them all.
    """
    cls = _tile_class(head_dim, tiling)
    out = {}
    for kernel in CONFIG_KERNELS:
        cfgs = [dict(zip(_TILE_KEYS, c), tiling=tiling) for c in _CANDIDATES[(kernel, cls)]]
        out[kernel] = sorted(cfgs, key=lambda c: _shape_cost(kernel, c, seqlen, packed))  # stable: ties keep order
    return out


def validate_config(kernel: str, cfg) -> dict:
    """``cfg`` as a launch config of ``kernel``, or ValueError saying what is wrong with it."""
    if kernel not in _ALL_KERNELS:
        raise ValueError(f"attention kernel {kernel!r} unknown; choose from {_ALL_KERNELS}")
    if not isinstance(cfg, dict):
        raise ValueError(f"config for {kernel!r} must be a dict, got {type(cfg).__name__}")
    allowed = ("BLOCK_M", "num_warps") if kernel == "delta" else _TILE_KEYS + ("tiling",)
    required = ("BLOCK_M",) if kernel == "delta" else ("BLOCK_M", "BLOCK_N")
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(f"config for {kernel!r}: unknown keys {unknown}; allowed {list(allowed)}")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"config for {kernel!r}: missing {missing}")
    for key, ok, what in (("BLOCK_M", lambda b: b in (16, 32, 64, 128, 256), "a power of two from 16 to 256"),
                          ("BLOCK_N", lambda b: b in (16, 32, 64, 128, 256), "a power of two from 16 to 256"),
                          ("num_warps", lambda w: w in (1, 2, 4, 8, 16), "1, 2, 4, 8 or 16"),
                          ("num_stages", lambda s: 1 <= s <= 8, "from 1 to 8")):
        if key in cfg and (type(cfg[key]) is not int or not ok(cfg[key])):
            raise ValueError(f"config for {kernel!r}: {key} {cfg[key]!r} must be {what}")
    if "tiling" in cfg and cfg["tiling"] not in TILINGS:
        raise ValueError(f"config for {kernel!r}: tiling {cfg['tiling']!r} unknown; choose from {TILINGS}")
    return dict(cfg)


# ---- tuned table: measured picks that override the rule (written by the GPU plan's autotune) ----------------

TUNED_PATH = Path(__file__).with_name("flash_attention_tuned.json")


def seqlen_bucket(seqlen: int) -> int:
    """The tuned table's sequence-length key: the next power of two, at least 64 (290 tokens -> 512)."""
    return max(64, triton.next_power_of_2(max(int(seqlen), 1)))


def _tuned_row(row) -> tuple[tuple[str, int, int], dict]:
    """((kernel, head_dim, seqlen bucket), config) of one table row, or ValueError: it must be well formed AND one
    of the pre-pruned candidates of its shape (anything else was never checked spill-free)."""
    if not isinstance(row, dict) or not {"kernel", "head_dim", "config"} <= set(row) or not (
            "seqlen" in row or "seqlen_bucket" in row):
        raise ValueError(f"tuned row {row!r} needs kernel, head_dim, seqlen (or seqlen_bucket) and config")
    kernel, hd = row["kernel"], row["head_dim"]
    if kernel not in CONFIG_KERNELS:
        raise ValueError(f"tuned row: kernel {kernel!r} unknown; choose from {CONFIG_KERNELS}")
    if type(hd) is not int:
        raise ValueError(f"tuned row: head_dim {hd!r} is not an int")
    head_dim_tiles(hd)  # supported head dim, or ValueError
    bucket = seqlen_bucket(row.get("seqlen_bucket", row.get("seqlen")))
    cfg = validate_config(kernel, row["config"])
    cfg.setdefault("tiling", DEFAULT_TILING)
    if cfg not in candidate_configs(hd, bucket, tiling=cfg["tiling"])[kernel]:
        raise ValueError(f"tuned row: {kernel} config {cfg} is not a pre-pruned candidate for head dim {hd} "
                         f"(candidate_configs)")
    return (kernel, hd, bucket), cfg


@functools.lru_cache(maxsize=4)
def _tuned_table(path: str, mtime: float) -> dict[tuple[str, int, int], dict]:
    try:
        with open(path) as f:
            data = json.load(f)
        rows = data["rows"] if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise ValueError("no 'rows' list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"attention tuned table {path} is unreadable ({e}); using the built-in rule", RuntimeWarning)
        return {}
    table = {}
    for i, row in enumerate(rows):
        try:
            key, cfg = _tuned_row(row)
        except (ValueError, TypeError) as e:
            warnings.warn(f"attention tuned table {path}: row {i} ignored: {e}", RuntimeWarning)
            continue
        table[key] = cfg
    return table


def tuned_table() -> dict[tuple[str, int, int], dict]:
    """{(kernel, head_dim, seqlen bucket): config} of the valid rows of ``TUNED_PATH`` (absent: empty); invalid
    rows are ignored with a RuntimeWarning naming them."""
    path = Path(TUNED_PATH)
    return _tuned_table(str(path), path.stat().st_mtime) if path.exists() else {}


def tuned_config(kernel: str, head_dim: int, seqlen: int) -> dict | None:
    """The tuned table's config for this shape, or None."""
    cfg = tuned_table().get((kernel, head_dim, seqlen_bucket(seqlen)))
    return dict(cfg) if cfg else None


def save_tuned(rows, path=None) -> Path:
    """Merge autotuned rows into the tuned table (default ``TUNED_PATH``) and return its path.

    A row: ``dict(kernel, head_dim, seqlen or seqlen_bucket, config, **measurements)``; rows of the same
    (kernel, head_dim, bucket) replace older ones. Any invalid row (malformed, or a config that is not one of
    :func:`candidate_configs`) raises ValueError and nothing is written.
    """
    path = Path(path or TUNED_PATH)
    merged: dict[tuple, dict] = {}
    if path.exists():
        old = json.loads(path.read_text()).get("rows", [])
        for row in old:
            try:
                merged[_tuned_row(row)[0]] = row
            except (ValueError, TypeError):
                pass  # invalid old rows are dropped (the loader ignored them too)
    for i, row in enumerate(rows):
        try:
            key, cfg = _tuned_row(row)
        except (ValueError, TypeError) as e:
            raise ValueError(f"save_tuned: row {i}: {e}") from None
        merged[key] = {**row, "seqlen_bucket": key[2], "config": cfg}
    out = [merged[k] for k in sorted(merged)]
    meta = dict(triton=triton.__version__, torch=torch.__version__.split("+")[0])
    path.write_text(json.dumps(dict(meta=meta, rows=out), indent=1) + "\n")
    _tuned_table.cache_clear()
    return path


def pick_config(kind: str, head_dim: int, max_seqlen: int, dtype: torch.dtype, device: torch.device,
                tiling: str | None = None, packed: bool = False) -> dict:
    """Launch config for one kernel: small blocks under the interpreter (CPU tensors); on CUDA the tuned table's
    entry for (kernel, head dim, seqlen bucket) when there is one and ``tiling`` is None (the library's choice),
    else the first of :func:`candidate_configs`. The config names its ``tiling``.

    kind: "fwd", "delta", "dkdv" or "dq". Pure Python, so tests can ask for the CUDA configs on a CPU
    machine (``device=torch.device("cuda")``) and run them through the interpreter.
    """
    if kind == "delta":  # row-sum kernel: no tiles worth tuning
        return dict(BLOCK_M=64 if device.type == "cuda" else 32, num_warps=4)
    if device.type != "cuda":
        blk = 16 if max_seqlen <= 16 else 32
        return dict(BLOCK_M=blk, BLOCK_N=blk, num_warps=4, num_stages=1, tiling=tiling or DEFAULT_TILING)
    if tiling is None and dtype != torch.float32:
        cfg = tuned_config(kind, head_dim, max_seqlen)
        if cfg is not None:
            return cfg
    cfg = candidate_configs(head_dim, max_seqlen, packed=packed, tiling=tiling or DEFAULT_TILING)[kind][0]
    if dtype == torch.float32:  # fp32 tiles are twice the bytes: halve the larger block
        cfg["num_stages"] = min(cfg["num_stages"], 2)
        if kind == "dkdv":
            cfg["BLOCK_M"] = min(cfg["BLOCK_M"], 32)
            cfg["BLOCK_N"] = min(cfg["BLOCK_N"], 64)
        else:
            cfg["BLOCK_M"] = min(cfg["BLOCK_M"], 64)
            cfg["BLOCK_N"] = min(cfg["BLOCK_N"], 32)
    return cfg


# ---- launchers ----------------------------------------------------------------------------------

# Every output buffer comes from here; tests swap in a NaN-filled allocator to catch unwritten elements.
_alloc = torch.empty


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides3(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, seq, head) strides; packed tensors have no batch stride (sequences offset by cu_seqlens)."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _geometry(q, cu_seqlens, max_seqlen):
    varlen = cu_seqlens is not None
    if varlen:
        batch = cu_seqlens.numel() - 1
        heads, head_dim = q.shape[1], q.shape[2]
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if batch > 0 else 0
        seqlen = int(max_seqlen)
    else:
        batch, seqlen, heads, head_dim = q.shape
        max_seqlen = seqlen
    return varlen, batch, seqlen, heads, head_dim, int(max_seqlen)


def _lse_shape_strides(q, varlen, batch, seqlen, heads):
    if varlen:
        total = q.shape[0]
        return (heads, total), (0, total)
    return (batch, heads, seqlen), (heads * seqlen, seqlen)


def _stride_alignment(*tensors: torch.Tensor) -> int:
    """Elements per 16 bytes if every tensor starts on 16 bytes and all its strides are 16-byte multiples, else 1.

    Passed to the kernels as a divisibility hint (see _aligned): exact for any layout, as it is checked here.
    """
    per16 = 16 // tensors[0].element_size()
    for t in tensors:
        if t.data_ptr() % 16 or any(st % per16 for st in t.stride()[:-1]):
            return 1
    return per16


def _col_mode(tiling: str) -> int:
    return _COLS_WRAP if tiling == "wrap" else _COLS_CLAMP


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    if device.type != "cuda" and dtype == torch.bfloat16:
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_config(kind, config, head_dim, max_seqlen, q, tiling, varlen) -> tuple[dict, str]:
    """(launch kwargs without ``tiling``, the tiling): ``config`` if given, else :func:`pick_config`."""
    if config:
        cfg = validate_config(kind, config)
    else:
        cfg = pick_config(kind, head_dim, max_seqlen, q.dtype, q.device, tiling, packed=varlen)
    return cfg, cfg.pop("tiling", None) or tiling or DEFAULT_TILING


def flash_attn_forward(q, k, v, softmax_scale=None, cu_seqlens=None, max_seqlen=None, config=None,
                       tiling: str | None = None):
    """Returns (out, lse); out like q (contiguous), lse fp32 (batch, heads, seqlen) or (heads, total).

    ``config`` (optional) overrides :func:`pick_config` (its ``tiling``, if named, wins); ``tiling`` is one of
    :data:`TILINGS` (None: the library's choice, ``DEFAULT_TILING`` unless the tuned table names another).
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    varlen, batch, seqlen, heads, head_dim, max_seqlen = _geometry(q, cu_seqlens, max_seqlen)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    out = _alloc(q.shape, dtype=q.dtype, device=q.device)
    lse_shape, (slb, slh) = _lse_shape_strides(q, varlen, batch, seqlen, heads)
    lse = _alloc(lse_shape, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or max_seqlen == 0 or batch == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    cfg, tiling = _launch_config("fwd", config, head_dim, max_seqlen, q, tiling, varlen)
    d0, dm, d1 = head_dim_tiles(head_dim, tiling)
    bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    grid = (triton.cdiv(max_seqlen, bm), batch * heads)
    cu = cu_seqlens if varlen else q  # dummy pointer when dense
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen),
        slb, slh, heads, seqlen, scale * LOG2E,
        HEAD_DIM=head_dim, D0=d0, DM=dm, D1=d1, VARLEN=varlen, BLOCK_M=bm, BLOCK_N=bn,
        DOT_PREC=_dot_precision(q.dtype, q.device), STRIDE_ALIGN=_stride_alignment(q, k, v, out),
        COL_MODE=_col_mode(tiling), **cfg,
    )
    return out, lse


def flash_attn_backward(dout, q, k, v, out, lse, softmax_scale=None, cu_seqlens=None, max_seqlen=None,
                        dlse=None, configs=None, tiling: str | None = None):
    """Returns (dq, dk, dv). ``dlse`` (optional) is the gradient flowing into the returned LSE.

    ``configs`` (optional) maps "delta"/"dkdv"/"dq" to launch configs overriding :func:`pick_config`;
    ``tiling`` as in :func:`flash_attn_forward` (each kernel may use its own: results do not depend on it).
    """
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    varlen, batch, seqlen, heads, head_dim, max_seqlen = _geometry(q, cu_seqlens, max_seqlen)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    dq = _alloc(q.shape, dtype=q.dtype, device=q.device)
    dk = _alloc(k.shape, dtype=k.dtype, device=k.device)
    dv = _alloc(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or max_seqlen == 0 or batch == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse_shape, (slb, slh) = _lse_shape_strides(q, varlen, batch, seqlen, heads)
    lse = lse.contiguous()
    delta = _alloc(lse_shape, dtype=torch.float32, device=q.device)
    cu = cu_seqlens if varlen else q
    configs = configs or {}
    prec = _dot_precision(q.dtype, q.device)
    align = _stride_alignment(q, k, v, dout, dq, dk, dv)

    cfg, _ = _launch_config("delta", configs.get("delta"), head_dim, max_seqlen, q, tiling, varlen)
    bm = cfg.pop("BLOCK_M")
    has_dlse = dlse is not None
    dlse_arg = dlse.contiguous().float() if has_dlse else delta
    _bwd_delta_kernel[(triton.cdiv(max_seqlen, bm), batch * heads)](
        out, dout, dlse_arg, delta, cu, *_strides3(out, varlen), *_strides3(dout, varlen), slb, slh,
        heads, seqlen, HEAD_DIM=head_dim, D_TILE=max(16, triton.next_power_of_2(head_dim)), VARLEN=varlen,
        HAS_DLSE=has_dlse, BLOCK_M=bm, STRIDE_ALIGN=_stride_alignment(out, dout), **cfg,
    )

    cfg, til = _launch_config("dkdv", configs.get("dkdv"), head_dim, max_seqlen, q, tiling, varlen)
    d0, dm, d1 = head_dim_tiles(head_dim, til)
    bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    _attn_bwd_dkdv_kernel[(triton.cdiv(max_seqlen, bn), batch * heads)](
        q, k, v, dout, dk, dv, lse, delta, cu,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(dout, varlen),
        *_strides3(dk, varlen), *_strides3(dv, varlen), slb, slh,
        heads, seqlen, scale, scale * LOG2E,
        HEAD_DIM=head_dim, D0=d0, DM=dm, D1=d1, VARLEN=varlen, BLOCK_M=bm, BLOCK_N=bn, DOT_PREC=prec,
        STRIDE_ALIGN=align, COL_MODE=_col_mode(til), **cfg,
    )
    cfg, til = _launch_config("dq", configs.get("dq"), head_dim, max_seqlen, q, tiling, varlen)
    d0, dm, d1 = head_dim_tiles(head_dim, til)
    bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    _attn_bwd_dq_kernel[(triton.cdiv(max_seqlen, bm), batch * heads)](
        q, k, v, dout, dq, lse, delta, cu,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(dout, varlen),
        *_strides3(dq, varlen), slb, slh,
        heads, seqlen, scale, scale * LOG2E,
        HEAD_DIM=head_dim, D0=d0, DM=dm, D1=d1, VARLEN=varlen, BLOCK_M=bm, BLOCK_N=bn, DOT_PREC=prec,
        STRIDE_ALIGN=align, COL_MODE=_col_mode(til), **cfg,
    )
    return dq, dk, dv


# ---- custom op ----------------------------------------------------------------------------------
# ``tiling`` "" = the library's choice; ``config`` = JSON of {kernel: launch config} ("" = none): custom-op schemas
# take no dicts.

def _lse_shape(q: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> tuple[int, ...]:
    if cu_seqlens is not None:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


@torch.library.custom_op("mae_fast::flash_attention_fwd", mutates_args=())
def _flash_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                  cu_seqlens: Optional[torch.Tensor], max_seqlen: int, tiling: str = "", config: str = ""
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = json.loads(config) if config else {}
    return flash_attn_forward(q, k, v, softmax_scale, cu_seqlens, max_seqlen, config=cfg.get("fwd"),
                              tiling=tiling or None)


@_flash_fwd_op.register_fake
def _(q, k, v, softmax_scale, cu_seqlens, max_seqlen, tiling="", config=""):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty(_lse_shape(q, cu_seqlens), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("mae_fast::flash_attention_bwd", mutates_args=())
def _flash_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, dlse: Optional[torch.Tensor], softmax_scale: float,
                  cu_seqlens: Optional[torch.Tensor], max_seqlen: int, tiling: str = "", config: str = ""
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_attn_backward(dout, q, k, v, out, lse, softmax_scale, cu_seqlens, max_seqlen, dlse=dlse,
                               configs=json.loads(config) if config else None, tiling=tiling or None)


@_flash_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, softmax_scale, cu_seqlens, max_seqlen, tiling="", config=""):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, cu_seqlens, max_seqlen, tiling, config = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.softmax_scale = softmax_scale
    ctx.max_seqlen = max_seqlen
    ctx.tiling = tiling
    ctx.config = config
    ctx.set_materialize_grads(False)  # an unused LSE (the usual case) then costs nothing in backward


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _flash_bwd_op(dout, q, k, v, out, lse, dlse, ctx.softmax_scale, cu_seqlens, ctx.max_seqlen,
                               ctx.tiling, ctx.config)
    return dq, dk, dv, None, None, None, None, None


_flash_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _config_json(config) -> str:
    """``config`` ({kernel: launch config}, or None) checked and serialised for the custom ops."""
    if not config:
        return ""
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict of kernel -> launch config, got {type(config).__name__}")
    return json.dumps({kind: validate_config(kind, cfg) for kind, cfg in config.items()}, sort_keys=True)


def flash_attention(q, k, v, softmax_scale=None, cu_seqlens=None, max_seqlen=None, return_lse=False,
                    tiling: str | None = None, config: dict | None = None):
    """Triton flash attention; returns ``out`` or ``(out, lse)`` (lse fp32, natural log; (B,H,N) or (H,total)).

    Differentiable in q, k, v (and through the returned LSE). Under autocast the inputs are cast to the
    autocast dtype, as matmul-like ops are. ``tiling`` is one of :data:`TILINGS` (None: the library's choice).
    ``config`` maps kernel names ("fwd", "dkdv", "dq", "delta") to launch configs (as :func:`candidate_configs`
    gives them) that replace the chosen config of each kernel named; a bad one raises ValueError.
    """
    config_arg = _config_json(config)
    if tiling is not None and tiling not in TILINGS:
        raise ValueError(f"tiling {tiling!r} unknown; choose from {TILINGS}")
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
        out, lse = _flash_fwd_op(q, k, v, scale, cu_seqlens, int(max_seqlen), tiling or "", config_arg)
    return (out, lse) if return_lse else out
