"""Fused residual add + LayerNorm in Triton, forward and backward, for pre-norm transformer blocks.

Under autocast a pre-norm block keeps an fp32 residual stream ``x`` and adds bf16 branches to it. Eager
PyTorch then runs the add (read 4 + 2 bytes, write 4), the fp32 LayerNorm (read 4, write 4) and the cast for
the next matmul (read 4, write 2): 24 bytes per element. The forward kernel reads ``x`` and ``branch`` once
and writes ``x_mid = x + branch`` and ``y`` in the matmul dtype: 12 bytes per element, plus per-row mean and
rstd. The backward kernel likewise fuses the LayerNorm backward with the residual gradient (``d x_mid``
from the stream's later use) and the casts to the stream and branch dtypes.

Numerics: every element is computed in fp32. ``x_mid`` is rounded to the stream dtype (``x``'s) before it is
normalised, so it equals eager's ``x + branch`` bit for bit; the variance is the biased one, as torch's.
dweight/dbias are deterministic: each program sums its rows into one row of an (programs, D) fp32 buffer,
which torch then sums in a fixed order (no atomics).

Layout: rows of D contiguous elements; the leading dims are seen as (outer, inner) with a stride each, so
row slices such as ``x[:, 1:]`` are read in place (only a last dim with stride != 1, or more than two
non-collapsible leading dims, makes the launcher copy). Outputs are allocated contiguous.

Read top to bottom: reference -> kernels -> launchers -> custom ops (fake implementations, autograd). The public
functions, their input checks and the backend registration are in :mod:`mae_fast.ops.layer_norm`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["add_layer_norm_reference", "add_layer_norm_forward", "add_layer_norm_backward", "MAX_D",
           "SUPPORTED_DTYPES", "add_layer_norm_fwd_op", "add_layer_norm_bwd_op", "layer_norm", "add_layer_norm"]

MAX_D = 8192  # a row stays in registers: 16 fp32 per thread per tensor at 16 warps
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_alloc = torch.empty  # tests swap in a NaN-filling allocator so unwritten elements show


# ---- reference ----------------------------------------------------------------------------------

def add_layer_norm_reference(x, branch, weight, bias, eps, out_dtype=None):
    """(y, x_mid) computed in fp32 (fp64 inputs: fp64) with torch; ``x_mid`` is ``x`` without a branch."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_mid = x if branch is None else (x.to(compute) + branch.to(compute)).to(x.dtype)
    w = None if weight is None else weight.to(compute)
    b = None if bias is None else bias.to(compute)
    y = F.layer_norm(x_mid.to(compute), x.shape[-1:], w, b, eps)
    return y.to(out_dtype or x.dtype), x_mid


# ---- kernels ------------------------------------------------------------------------------------

@triton.jit
def _rounded(value, PTR, SOFT_BF16: tl.constexpr):
    """value in PTR's element type, rounded to nearest even. The interpreter (the only way these kernels run on
    CPU tensors) truncates fp32 -> bf16 where compiled kernels round, so under it (SOFT_BF16) bf16 is rounded
    with integer ops instead."""
    if SOFT_BF16 and PTR.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return value.to(PTR.dtype.element_ty)


@triton.jit
def _row_offsets(rows, inner, stride_outer, stride_inner):
    """Element offset of each row start for a tensor seen as (outer, inner, D)."""
    outer_idx = rows // inner
    return outer_idx * stride_outer + (rows - outer_idx * inner) * stride_inner


@triton.jit
def _add_layer_norm_fwd_kernel(
    X, BRANCH, W, B, Y, X_MID, MEAN, RSTD,
    n_rows, inner, D, eps,
    stride_x_outer, stride_x_inner, stride_b_outer, stride_b_inner,
    HAS_BRANCH: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    x_at = _row_offsets(rows, inner, stride_x_outer, stride_x_inner)[:, None] + cols[None, :]
    out_at = rows[:, None] * D + cols[None, :]
    x = tl.load(X + x_at, mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        b_at = _row_offsets(rows, inner, stride_b_outer, stride_b_inner)[:, None] + cols[None, :]
        branch = tl.load(BRANCH + b_at, mask=mask, other=0.0).to(tl.float32)
        # rounded to the stream dtype first: normalise exactly the x_mid that is stored (as eager does)
        x_mid = _rounded(x + branch, X_MID, SOFT_BF16)
        tl.store(X_MID + out_at, x_mid, mask=mask)
        x = x_mid.to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    centred = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / D
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    y = centred * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + out_at, _rounded(y, Y, SOFT_BF16), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _add_layer_norm_bwd_kernel(
    DY, D_X_MID, X, W, MEAN, RSTD, DX, DBRANCH, DW_PART, DB_PART,
    n_rows, inner, D, rows_per_program,
    stride_dy_outer, stride_dy_inner, stride_dm_outer, stride_dm_inner,
    HAS_D_X_MID: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    STORE_DBRANCH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        at = rows[:, None] * D + cols[None, :]  # x_mid / x and the outputs: contiguous rows
        dy_at = _row_offsets(rows, inner, stride_dy_outer, stride_dy_inner)[:, None] + cols[None, :]
        x = tl.load(X + at, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + dy_at, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy
        if HAS_WEIGHT:
            g = dy * w[None, :]
        mean_g_xhat = tl.sum(g * x_hat, axis=1) / D
        mean_g = tl.sum(g, axis=1) / D
        dx = (g - x_hat * mean_g_xhat[:, None] - mean_g[:, None]) * rstd[:, None]
        if HAS_D_X_MID:
            dm_at = _row_offsets(rows, inner, stride_dm_outer, stride_dm_inner)[:, None] + cols[None, :]
            dx += tl.load(D_X_MID + dm_at, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + at, _rounded(dx, DX, SOFT_BF16), mask=mask)
        if STORE_DBRANCH:
            tl.store(DBRANCH + at, _rounded(dx, DBRANCH, SOFT_BF16), mask=mask)
        if NEED_DW:
            dw_acc += tl.sum(dy * x_hat, axis=0)
        if NEED_DB:
            db_acc += tl.sum(dy, axis=0)
    if NEED_DW:
        tl.store(DW_PART + pid * D + cols, dw_acc, mask=col_ok)
    if NEED_DB:
        tl.store(DB_PART + pid * D + cols, db_acc, mask=col_ok)


# ---- launchers ----------------------------------------------------------------------------------

def _as_outer_inner(t: torch.Tensor) -> torch.Tensor:
    """A (outer, inner, D) view of t with unit column stride; a contiguous copy only when none exists."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    D = t.shape[-1]
    if t.dim() == 1:
        return t.view(1, 1, D)
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 3:
        return t
    try:
        return t.view(-1, t.shape[-2], D)
    except RuntimeError:
        return t.contiguous().view(-1, t.shape[-2], D)


def _tile(D: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps): a whole row per tile, several short rows together, ~4K elements."""
    if D > MAX_D:
        raise ValueError(f"add_layer_norm kernels take rows of at most {MAX_D} elements, got {D}")
    block_d = triton.next_power_of_2(max(D, 1))
    block_r = max(1, min(16 if not backward else 8, 4096 // block_d))
    warps = min(16, max(4, block_r * block_d // 512))
    return block_r, block_d, warps


def _backward_programs(n_rows: int, block_r: int, device: torch.device, programs: int | None) -> tuple[int, int]:
    """(programs, rows per program): about 4 programs per SM on a GPU (each one partial dweight row)."""
    tiles = triton.cdiv(n_rows, block_r)
    if programs is None:
        programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    programs = max(1, min(programs, tiles))
    rows_per_program = triton.cdiv(tiles, programs) * block_r
    return triton.cdiv(n_rows, rows_per_program), rows_per_program


def add_layer_norm_forward(x, branch, weight, bias, eps: float, out_dtype: torch.dtype | None = None):
    """LayerNorm over the last dim of ``x`` (or of ``x_mid = x + branch``) -> ``(y, x_mid, mean, rstd)``.

    ``y`` is in ``out_dtype`` (default: x's), ``x_mid`` in x's dtype (None without a branch), ``mean`` and
    ``rstd`` fp32 of shape ``x.shape[:-1]``. ``branch`` (x's shape) may be narrower than x (bf16 into fp32).
    """
    out_dtype = out_dtype or x.dtype
    D = x.shape[-1]
    y = _alloc(x.shape, dtype=out_dtype, device=x.device)
    x_mid = _alloc(x.shape, dtype=x.dtype, device=x.device) if branch is not None else None
    mean = _alloc(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = _alloc(x.shape[:-1], dtype=torch.float32, device=x.device)
    n_rows = mean.numel()
    if n_rows == 0 or D == 0:
        return y, x_mid, mean, rstd
    x3 = _as_outer_inner(x)
    b3 = _as_outer_inner(branch) if branch is not None else x3
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    block_r, block_d, warps = _tile(D, backward=False)
    _add_layer_norm_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        x3, b3, weight if weight is not None else y, bias if bias is not None else y, y,
        x_mid if x_mid is not None else y, mean, rstd,
        n_rows, x3.shape[1], D, float(eps),
        x3.stride(0), x3.stride(1), b3.stride(0), b3.stride(1),
        HAS_BRANCH=branch is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, SOFT_BF16=x.device.type != "cuda", num_warps=warps,
    )
    return y, x_mid, mean, rstd


def add_layer_norm_backward(dy, x_norm, mean, rstd, weight, bias, *, d_x_mid=None,
                            branch_dtype: torch.dtype | None = None, need_weight_grad: bool = True,
                            need_bias_grad: bool = True, programs: int | None = None):
    """Gradients of ``add_layer_norm_forward`` -> ``(dx, dbranch, dweight, dbias)``.

    ``x_norm`` is the normalised input (``x_mid`` with a residual, else ``x``); ``d_x_mid`` the gradient
    reaching ``x_mid`` from its other uses (any float dtype, x's shape). ``dx`` is in x_norm's (the stream's)
    dtype; ``dbranch`` is the same gradient in ``branch_dtype`` (``dx`` itself when that is the stream dtype,
    None without a branch). ``dweight``/``dbias`` are in the parameters' dtypes, None when not wanted or
    without the parameter (``bias`` is only looked at for whether it exists and its dtype).
    ``programs`` fixes the number of partial dweight rows (default: 4 per SM).
    """
    D = x_norm.shape[-1]
    x_norm = x_norm.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()
    dx = _alloc(x_norm.shape, dtype=x_norm.dtype, device=x_norm.device)
    separate_dbranch = branch_dtype is not None and branch_dtype != x_norm.dtype
    dbranch = _alloc(x_norm.shape, dtype=branch_dtype, device=x_norm.device) if separate_dbranch else None
    need_dw = need_weight_grad and weight is not None
    need_db = need_bias_grad and bias is not None
    n_rows = mean.numel()
    block_r, block_d, warps = _tile(D, backward=True)
    n_prog, rows_per_program = _backward_programs(max(n_rows, 1), block_r, x_norm.device, programs)
    dw_part = _alloc((n_prog, D), dtype=torch.float32, device=x_norm.device) if need_dw else None
    db_part = _alloc((n_prog, D), dtype=torch.float32, device=x_norm.device) if need_db else None
    if n_rows and D:
        dy3 = _as_outer_inner(dy)
        dm3 = _as_outer_inner(d_x_mid) if d_x_mid is not None else dy3
        w = weight.contiguous() if weight is not None else dx
        _add_layer_norm_bwd_kernel[(n_prog,)](
            dy3, dm3, x_norm, w, mean, rstd, dx, dbranch if dbranch is not None else dx,
            dw_part if dw_part is not None else dx, db_part if db_part is not None else dx,
            n_rows, dy3.shape[1], D, rows_per_program,
            dy3.stride(0), dy3.stride(1), dm3.stride(0), dm3.stride(1),
            HAS_D_X_MID=d_x_mid is not None, HAS_WEIGHT=weight is not None, NEED_DW=need_dw, NEED_DB=need_db,
            STORE_DBRANCH=separate_dbranch, BLOCK_R=block_r, BLOCK_D=block_d,
            SOFT_BF16=x_norm.device.type != "cuda",
            num_warps=warps,
        )
    elif need_dw or need_db:  # no rows: zero parameter gradients
        dw_part = dw_part.zero_() if dw_part is not None else None
        db_part = db_part.zero_() if db_part is not None else None
    dweight = dw_part.sum(0).to(weight.dtype) if need_dw else None  # fixed-order reduction: deterministic
    dbias = db_part.sum(0).to(bias.dtype) if need_db else None
    if branch_dtype is not None and not separate_dbranch:
        dbranch = dx
    return dx, dbranch, dweight, dbias


# ---- custom ops ---------------------------------------------------------------------------------
# Custom-op outputs may be neither None nor aliases of inputs: absent outputs come back as empty tensors.

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
    y, x_mid, mean, rstd = add_layer_norm_forward(x, branch, weight, bias, eps, out_dtype)
    return y, (x_mid if x_mid is not None else _empty(x)), mean, rstd


def _backward_kernels(dy, d_x_mid, x_norm, mean, rstd, weight, bias, branch_dtype, need_weight_grad,
                      need_bias_grad):
    dx, dbranch, dw, db = add_layer_norm_backward(
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


# ---- entry points (the ``triton`` backends of mae_fast.ops.layer_norm; arguments as its select_backend call's) --

def layer_norm(x, weight, bias, eps, out_dtype):
    return _fused(x, None, weight, bias, eps, out_dtype)[0]


def add_layer_norm(x, branch, weight, bias, eps, out_dtype):
    y, x_mid, _, _ = _fused(x, branch, weight, bias, eps, out_dtype)
    return x_mid, y
