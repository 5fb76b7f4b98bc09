"""Triton kernels for the masked-token ops, their launchers and their ``torch.library`` custom ops.

Read top to bottom: kernels -> launchers -> custom ops (fake implementations, autograd). The public functions,
input checks and the torch reference are in :mod:`mae_fast.ops.masking`. Four kernels, each a single pass over
the bytes it must touch:

* ``gather_or_fill_rows``: out row = src row picked by an index, or a fill row (mask token / zero),
  plus a pos-embed row; serves gather_visible, unshuffle_with_mask_token and both their backwards
  (a permutation's scatter is a gather with its inverse, so no atomics anywhere).
* ``masked_row_sum``: per-chunk fp32 sums of the rows whose index says "mask token"
  (the mask-token gradient; the chunks are reduced afterwards in a fixed order).
* ``patchify_gather``: reads only the visible patches of a (B, C, H, W) image.
* ``masked_patch_mse_fwd`` / ``_bwd``: target patchify + per-patch normalisation + squared error,
  reading image and prediction only for removed patches.

Index convention of ``gather_or_fill_rows``: index j in [0, limit) takes source row ``head + j``,
j in [limit, upper) takes the fill row, anything else writes NaN (out-of-range ids never read memory
out of bounds and never pass silently). Rows whose batch is flagged in ``bad`` are NaN too.
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _row_sum(x, axis: tl.constexpr):
    # tl.reduce with our own combine function rather than tl.sum: tl.sum is a @jit function of
    # triton.language itself, which the CPU interpreter can call only if triton was first imported
    # with TRITON_INTERPRET=1; these two are built with this module, so tests can turn the
    # interpreter on for this module alone. Same reduction on the GPU.
    return tl.reduce(x, axis, _add)


@triton.jit
def gather_or_fill_rows_kernel(
    src_ptr, idx_ptr, fill_ptr, pos_ptr, bad_ptr, out_ptr,
    total_rows, n_idx, src_rows, limit, upper, D,
    HEAD: tl.constexpr, HAS_FILL: tl.constexpr, HAS_POS: tl.constexpr, POS_BY_SRC: tl.constexpr,
    HAS_BAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < total_rows
    col_ok = cols < D
    out_per_batch = HEAD + n_idx
    b = rows // out_per_batch
    r = rows - b * out_per_batch  # output row inside its batch
    body = r >= HEAD
    j = tl.load(idx_ptr + b * n_idx + (r - HEAD), mask=row_ok & body, other=0).to(tl.int64)
    in_src = (j >= 0) & (j < limit)
    take_src = (~body) | in_src
    take_fill = body & (j >= limit) & (j < upper)
    poison = body & ~(in_src | take_fill)
    src_row = tl.where(body, HEAD + j, r)

    tile_ok = row_ok[:, None] & col_ok[None, :]
    out_ty = out_ptr.dtype.element_ty
    vals = tl.load(src_ptr + (b * src_rows + src_row)[:, None] * D + cols[None, :],
                   mask=tile_ok & take_src[:, None], other=0.0).to(tl.float32)
    if HAS_FILL:
        fill = tl.load(fill_ptr + cols, mask=col_ok, other=0.0).to(out_ty).to(tl.float32)
        vals = tl.where(take_fill[:, None], fill[None, :], vals)
    if HAS_POS:
        if POS_BY_SRC:
            pos_row = j
            pos_ok = in_src
        else:
            pos_row = r
            pos_ok = row_ok
        # rounded to the output dtype first: the same two roundings as the torch reference
        pos = tl.load(pos_ptr + pos_row[:, None] * D + cols[None, :], mask=tile_ok & pos_ok[:, None], other=0.0)
        vals = vals + pos.to(out_ty).to(tl.float32)
    if HAS_BAD:
        bad = tl.load(bad_ptr + b, mask=row_ok, other=0) != 0
        poison = poison | bad
    vals = tl.where(poison[:, None], float("nan"), vals)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], vals.to(out_ty), mask=tile_ok)


@triton.jit
def masked_row_sum_kernel(
    grad_ptr, idx_ptr, partial_ptr, L, K, D, n_chunks,
    HEAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """partial[b, chunk, :] = sum of grad[b, HEAD + i, :] over i in the chunk with K <= idx[b, i] < L."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc = tl.full([BLOCK_D], 0.0, tl.float32)  # builtin (tl.zeros is a triton.language @jit: see _row_sum)
    for start in range(0, CHUNK, BLOCK_R):
        i = chunk * CHUNK + start + tl.arange(0, BLOCK_R)
        ok = i < L
        j = tl.load(idx_ptr + b * L + i, mask=ok, other=0)
        masked = ok & (j >= K) & (j < L)
        g = tl.load(grad_ptr + ((b * (HEAD + L) + HEAD + i) * D)[:, None] + cols[None, :],
                    mask=masked[:, None] & col_ok[None, :], other=0.0)
        acc += _row_sum(g.to(tl.float32), 0)
    tl.store(partial_ptr + (b * n_chunks + chunk) * D + cols, acc, mask=col_ok)


@triton.jit
def patchify_gather_kernel(
    imgs_ptr, idx_ptr, out_ptr, total_rows, K, L, grid_w, H, W, P,
    C: tl.constexpr, PATCH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """out[b, k, (c, r, q)] = imgs[b, c, hh*p + r, ww*p + q] with (hh, ww) = divmod(idx[b, k], grid_w)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < total_rows
    b = rows // K
    j = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    valid = (j >= 0) & (j < L)
    hh = j // grid_w
    ww = j - hh * grid_w
    e = tl.arange(0, BLOCK_P)
    e_ok = e < P
    c = e // (PATCH * PATCH)
    rem = e - c * (PATCH * PATCH)
    r = rem // PATCH
    q = rem - r * PATCH
    offs = ((b * C)[:, None] + c[None, :]) * H * W + ((hh * PATCH)[:, None] + r[None, :]) * W \
        + (ww * PATCH)[:, None] + q[None, :]
    tile_ok = row_ok[:, None] & e_ok[None, :]
    vals = tl.load(imgs_ptr + offs, mask=tile_ok & valid[:, None], other=0.0).to(tl.float32)
    vals = tl.where(valid[:, None], vals, float("nan"))
    tl.store(out_ptr + rows[:, None] * P + e[None, :], vals.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _normalised_target_and_pred(pred_ptr, imgs_ptr, rows, active, L, grid_w, H, W, P, inv_P, inv_P_minus_1,
                                C: tl.constexpr, PATCH: tl.constexpr, NORM_PIX: tl.constexpr,
                                BLOCK_P: tl.constexpr):
    """Loads pred rows and their target patches in the official (row, col, channel) order."""
    b = rows // L
    l = rows - b * L
    hh = l // grid_w
    ww = l - hh * grid_w
    e = tl.arange(0, BLOCK_P)
    e_ok = e < P
    c = e % C
    rq = e // C
    r = rq // PATCH
    q = rq - r * PATCH
    offs = ((b * C)[:, None] + c[None, :]) * H * W + ((hh * PATCH)[:, None] + r[None, :]) * W \
        + (ww * PATCH)[:, None] + q[None, :]
    ld = active[:, None] & e_ok[None, :]
    target = tl.load(imgs_ptr + offs, mask=ld, other=0.0).to(tl.float32)
    pred = tl.load(pred_ptr + rows[:, None] * P + e[None, :], mask=ld, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = _row_sum(target, 1) * inv_P
        dev = tl.where(ld, target - mean[:, None], 0.0)
        var = _row_sum(dev * dev, 1) * inv_P_minus_1  # unbiased, as the official code
        target = dev / tl.sqrt(var + 1.0e-6)[:, None]
    return tl.where(ld, pred - target, 0.0), e, e_ok


@triton.jit
def _loss_rows(mask_ptr, total_rows, BLOCK_R: tl.constexpr):
    """This program's rows of (B*L), which exist, their mask values, and which are removed patches."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < total_rows
    m = tl.load(mask_ptr + rows, mask=row_ok, other=0.0)
    return rows, row_ok, m, row_ok & (m != 0)


@triton.jit
def masked_patch_mse_fwd_kernel(
    pred_ptr, imgs_ptr, mask_ptr, row_loss_ptr, total_rows, L, grid_w, H, W, P, inv_P, inv_P_minus_1,
    C: tl.constexpr, PATCH: tl.constexpr, NORM_PIX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """row_loss[b*L + l] = mask[b, l] * mean_j (pred - target)^2; rows with mask 0 read nothing."""
    rows, row_ok, m, active = _loss_rows(mask_ptr, total_rows, BLOCK_R)
    err, e, e_ok = _normalised_target_and_pred(pred_ptr, imgs_ptr, rows, active, L, grid_w, H, W, P, inv_P,
                                               inv_P_minus_1, C, PATCH, NORM_PIX, BLOCK_P)
    loss = _row_sum(err * err, 1) * inv_P * m
    tl.store(row_loss_ptr + rows, loss, mask=row_ok)


@triton.jit
def masked_patch_mse_bwd_kernel(
    pred_ptr, imgs_ptr, mask_ptr, scale_ptr, grad_pred_ptr, total_rows, L, grid_w, H, W, P, inv_P,
    inv_P_minus_1,
    C: tl.constexpr, PATCH: tl.constexpr, NORM_PIX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad_pred = scale * mask * (pred - target); scale = 2 * dloss / (P * sum(mask)). Kept rows get 0."""
    rows, row_ok, m, active = _loss_rows(mask_ptr, total_rows, BLOCK_R)
    err, e, e_ok = _normalised_target_and_pred(pred_ptr, imgs_ptr, rows, active, L, grid_w, H, W, P, inv_P,
                                               inv_P_minus_1, C, PATCH, NORM_PIX, BLOCK_P)
    scale = tl.load(scale_ptr)
    grad = err * (scale * m)[:, None]
    tl.store(grad_pred_ptr + rows[:, None] * P + e[None, :], grad.to(grad_pred_ptr.dtype.element_ty),
             mask=row_ok[:, None] & e_ok[None, :])


# ---- launchers ------------------------------------------------------------------------------------

def _row_tile(D: int, elt: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps): about 8 KB of output per program, 16-byte vectors per thread.

    When padding D to the block would waste more than half the lanes (D=1280 in 1024-wide blocks:
    the second block is a quarter full; that row ran at 85% of copy bandwidth on an H100 where
    D=768/1024 ran at 93-104%), use the largest power of two >= 64 that divides D instead."""
    block_d = min(triton.next_power_of_2(D), max(16, 2048 // elt))
    padded = triton.cdiv(D, block_d) * block_d
    if padded > 1.5 * D:
        divisor = D & -D  # largest power of two dividing D
        if 64 <= divisor < block_d:
            block_d = divisor
    block_r = max(1, min(64, 8192 // (block_d * elt)))
    return block_r, block_d, 4


def gather_rows(src: Tensor, idx: Tensor, fill: Optional[Tensor], pos: Optional[Tensor], pos_by_src: bool,
                bad: Optional[Tensor], head: int, limit: int, upper: int, out: Optional[Tensor] = None) -> Tensor:
    src, idx = src.contiguous(), idx.contiguous()  # no-ops on the op path; direct callers may pass views
    fill = None if fill is None else fill.contiguous()
    pos = None if pos is None else pos.contiguous()
    B, src_rows, D = src.shape
    N = idx.shape[1]
    if out is None:  # tests pass a NaN-filled ``out`` so unwritten rows show
        out = torch.empty((B, head + N, D), device=src.device, dtype=src.dtype)
    total = B * (head + N)
    if total == 0 or D == 0:
        return out
    block_r, block_d, warps = _row_tile(D, src.element_size())
    grid = (triton.cdiv(total, block_r), triton.cdiv(D, block_d))
    dummy = src  # never read when the matching HAS_* flag is off
    gather_or_fill_rows_kernel[grid](
        src, idx, fill if fill is not None else dummy, pos if pos is not None else dummy,
        bad if bad is not None else idx, out,
        total, N, src_rows, limit, upper, D,
        HEAD=head, HAS_FILL=fill is not None, HAS_POS=pos is not None, POS_BY_SRC=pos_by_src,
        HAS_BAD=bad is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    return out


def masked_row_sum(grad: Tensor, idx: Tensor, head: int, K: int) -> Tensor:
    grad, idx = grad.contiguous(), idx.contiguous()
    B, L = idx.shape
    D = grad.shape[2]
    chunk = 64
    n_chunks = max(1, triton.cdiv(L, chunk))
    partial = torch.empty((B * n_chunks, D), device=grad.device, dtype=torch.float32)
    if B == 0 or D == 0:
        return partial.new_zeros((D,))
    block_d = min(triton.next_power_of_2(D), 256)
    grid = (B, n_chunks, triton.cdiv(D, block_d))
    masked_row_sum_kernel[grid](grad, idx, partial, L, K, D, n_chunks,
                                        HEAD=head, CHUNK=chunk, BLOCK_R=16, BLOCK_D=block_d, num_warps=4)
    return partial.sum(0)  # fixed-order reduction: deterministic


def launch_patchify_gather(imgs: Tensor, ids_keep: Tensor, patch_size: int, out: Optional[Tensor] = None) -> Tensor:
    imgs, ids_keep = imgs.contiguous(), ids_keep.contiguous()
    B, C, H, W = imgs.shape
    p = patch_size
    grid_w, L, K, P = W // p, (H // p) * (W // p), ids_keep.shape[1], C * p * p
    if out is None:
        out = torch.empty((B, K, P), device=imgs.device, dtype=imgs.dtype)
    if out.numel() == 0:
        return out
    block_p = triton.next_power_of_2(P)
    block_r = max(1, min(16, 4096 // block_p))
    patchify_gather_kernel[(triton.cdiv(B * K, block_r),)](
        imgs, ids_keep, out, B * K, K, L, grid_w, H, W, P,
        C=C, PATCH=p, BLOCK_R=block_r, BLOCK_P=block_p, num_warps=4)
    return out


def _mse_launch_args(pred: Tensor, imgs: Tensor, patch_size: int):
    B, C, H, W = imgs.shape
    p = patch_size
    L, P = (H // p) * (W // p), C * p * p
    block_p = triton.next_power_of_2(P)
    block_r = max(1, min(8, 4096 // block_p))
    grid = (triton.cdiv(B * L, block_r),)
    scalars = (B * L, L, W // p, H, W, P, 1.0 / P, 1.0 / max(P - 1, 1))
    return grid, scalars, dict(C=C, PATCH=p, BLOCK_R=block_r, BLOCK_P=block_p, num_warps=8 if block_p >= 1024 else 4)


def launch_masked_patch_mse(pred: Tensor, imgs: Tensor, mask_f32: Tensor, patch_size: int, norm_pix: bool,
                            row_loss: Optional[Tensor] = None):
    pred, imgs, mask_f32 = pred.contiguous(), imgs.contiguous(), mask_f32.contiguous()
    if row_loss is None:
        row_loss = torch.empty(mask_f32.numel(), device=pred.device, dtype=torch.float32)
    if row_loss.numel():
        grid, scalars, meta = _mse_launch_args(pred, imgs, patch_size)
        masked_patch_mse_fwd_kernel[grid](pred, imgs, mask_f32, row_loss, *scalars, NORM_PIX=norm_pix, **meta)
    return row_loss.sum() / mask_f32.sum()


def launch_masked_patch_mse_backward(grad_loss: Tensor, pred: Tensor, imgs: Tensor, mask_f32: Tensor,
                                     patch_size: int, norm_pix: bool, grad_pred: Optional[Tensor] = None) -> Tensor:
    pred, imgs, mask_f32 = pred.contiguous(), imgs.contiguous(), mask_f32.contiguous()
    P = pred.shape[2]
    scale = (grad_loss.float() * 2.0 / (P * mask_f32.sum())).reshape(1)  # stays on the device: no sync
    if grad_pred is None:
        grad_pred = torch.empty_like(pred)
    if grad_pred.numel():
        grid, scalars, meta = _mse_launch_args(pred, imgs, patch_size)
        masked_patch_mse_bwd_kernel[grid](pred, imgs, mask_f32, scale, grad_pred, *scalars,
                                                  NORM_PIX=norm_pix, **meta)
    return grad_pred


# ---- custom ops -----------------------------------------------------------------------------------
# Backwards use no atomics: ids are (parts of) permutations, so the scatter back is a gather with the inverse
# permutation. Duplicate ids, which would make that wrong, are detected on the device without a host sync and
# turn the affected gradient rows into NaN instead of passing silently.

def inverse_positions(ids: Tensor, limit: int, n_dest: int, sentinel: int) -> tuple[Tensor, Tensor]:
    """For ids (B, N): inv (B, n_dest) with inv[b, ids[b, i]] = i for 0 <= ids < limit (others = sentinel),
    and bad (B,) True where a destination is hit twice (not a permutation)."""
    B, N = ids.shape
    ids = ids.long()
    dest = torch.where((ids >= 0) & (ids < limit), ids, n_dest)  # everything else lands in a spare column
    pos = torch.arange(N, device=ids.device, dtype=torch.long).expand(B, N)
    inv = torch.full((B, n_dest + 1), sentinel, device=ids.device, dtype=torch.long)
    inv.scatter_reduce_(1, dest, pos, reduce="amin", include_self=True)  # deterministic even with repeats
    hits = torch.zeros((B, n_dest + 1), device=ids.device, dtype=torch.int32)
    hits.scatter_add_(1, dest, torch.ones_like(dest, dtype=torch.int32))
    bad = (hits[:, :n_dest] > 1).any(dim=1)
    return inv[:, :n_dest].contiguous(), bad


# Autograd of gather_visible / unshuffle_with_mask_token, shared with the CUDA ops (mae_fast.csrc.masking), which
# register them with their own backward op bound as the first argument.

def gather_visible_setup(ctx, inputs, output):
    x, ids_keep, pos = inputs
    ctx.save_for_backward(ids_keep)
    ctx.L = x.shape[1]
    ctx.pos_dtype = None if pos is None else pos.dtype


def gather_visible_backward(backward_op, ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    need_x, _, need_pos = ctx.needs_input_grad
    if not (need_x or need_pos):
        return None, None, None
    grad_x = backward_op(grad.contiguous(), ids_keep, ctx.L)
    grad_pos = grad_x.float().sum(0).to(ctx.pos_dtype) if need_pos else None
    return (grad_x if need_x else None), None, grad_pos


def unshuffle_setup(ctx, inputs, output):
    x_vis, ids_restore, mask_token, pos, cls_token = inputs
    ctx.save_for_backward(ids_restore)
    ctx.K = x_vis.shape[1] - int(cls_token)
    ctx.cls_token = cls_token
    ctx.mask_dtype = mask_token.dtype
    ctx.pos_dtype = None if pos is None else pos.dtype


def unshuffle_backward(backward_op, ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    need_x, _, need_mask, need_pos, _ = ctx.needs_input_grad
    grad_x = grad_mask = grad_pos = None
    if need_x or need_mask:
        grad_x, grad_mask = backward_op(grad.contiguous(), ids_restore, ctx.K, ctx.cls_token)
        grad_mask = grad_mask.to(ctx.mask_dtype) if need_mask else None
        grad_x = grad_x if need_x else None
    if need_pos:
        grad_pos = grad.float().sum(0).to(ctx.pos_dtype)
    return grad_x, None, grad_mask, grad_pos, None


def gather_visible_fake(x, ids_keep, pos):
    return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]))


def gather_visible_backward_fake(grad, ids_keep, L):
    return grad.new_empty((grad.shape[0], L, grad.shape[2]))


def unshuffle_fake(x_vis, ids_restore, mask_token, pos, cls_token):
    return x_vis.new_empty((x_vis.shape[0], int(cls_token) + ids_restore.shape[1], x_vis.shape[2]))


def unshuffle_backward_fake(grad, ids_restore, K, cls_token):
    return (grad.new_empty((grad.shape[0], int(cls_token) + K, grad.shape[2])),
            grad.new_empty((grad.shape[2],), dtype=torch.float32))


@torch.library.custom_op("mae_fast::triton_gather_visible", mutates_args=())
def gather_visible_op(x: Tensor, ids_keep: Tensor, pos: Optional[Tensor]) -> Tensor:
    L = x.shape[1]
    return gather_rows(x, ids_keep, None, pos, True, None, 0, L, L)


@torch.library.custom_op("mae_fast::triton_gather_visible_backward", mutates_args=())
def gather_visible_backward_op(grad: Tensor, ids_keep: Tensor, L: int) -> Tensor:
    K = ids_keep.shape[1]
    inv, bad = inverse_positions(ids_keep, L, L, sentinel=K)  # sentinel K -> zero row
    return gather_rows(grad, inv, None, None, False, bad, 0, K, K + 1)


@torch.library.custom_op("mae_fast::triton_unshuffle", mutates_args=())
def unshuffle_op(x_vis: Tensor, ids_restore: Tensor, mask_token: Tensor, pos: Optional[Tensor],
                 cls_token: bool) -> Tensor:
    head = int(cls_token)
    K, L = x_vis.shape[1] - head, ids_restore.shape[1]
    return gather_rows(x_vis, ids_restore, mask_token, pos, False, None, head, K, L)


@torch.library.custom_op("mae_fast::triton_unshuffle_backward", mutates_args=())
def unshuffle_backward_op(grad: Tensor, ids_restore: Tensor, K: int, cls_token: bool) -> tuple[Tensor, Tensor]:
    head = int(cls_token)
    L = ids_restore.shape[1]
    inv, bad = inverse_positions(ids_restore, K, K, sentinel=L)  # sentinel L -> zero row
    return gather_rows(grad, inv, None, None, False, bad, head, L, L + 1), masked_row_sum(grad, ids_restore, head, K)


gather_visible_op.register_fake(gather_visible_fake)
gather_visible_backward_op.register_fake(gather_visible_backward_fake)
unshuffle_op.register_fake(unshuffle_fake)
unshuffle_backward_op.register_fake(unshuffle_backward_fake)
gather_visible_op.register_autograd(functools.partial(gather_visible_backward, gather_visible_backward_op),
                                    setup_context=gather_visible_setup)
unshuffle_op.register_autograd(functools.partial(unshuffle_backward, unshuffle_backward_op),
                               setup_context=unshuffle_setup)


@torch.library.custom_op("mae_fast::triton_patchify_gather", mutates_args=())
def patchify_gather_op(imgs: Tensor, ids_keep: Tensor, patch_size: int) -> Tensor:
    return launch_patchify_gather(imgs, ids_keep, patch_size)


@patchify_gather_op.register_fake
def _(imgs, ids_keep, patch_size):
    C = imgs.shape[1]
    return imgs.new_empty((imgs.shape[0], ids_keep.shape[1], C * patch_size * patch_size))


def _patchify_gather_setup(ctx, inputs, output):
    imgs, ids_keep, patch_size = inputs
    ctx.save_for_backward(ids_keep)
    ctx.img_shape, ctx.patch_size = tuple(imgs.shape), patch_size


def _patchify_gather_backward(ctx, grad):
    # Images rarely need a gradient: plain torch. scatter_add onto zeros adds exactly once per kept
    # patch (distinct ids), so it is deterministic; repeated ids get the sum, as the reference.
    (ids_keep,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    B, C, H, W = ctx.img_shape
    p = ctx.patch_size
    h, w = H // p, W // p
    P = grad.shape[2]
    full = grad.new_zeros((B, h * w, P), dtype=torch.float32)
    full.scatter_add_(1, ids_keep.long().unsqueeze(-1).expand(-1, -1, P), grad.float())
    g = full.reshape(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
    return g.to(grad.dtype), None, None


patchify_gather_op.register_autograd(_patchify_gather_backward, setup_context=_patchify_gather_setup)


@torch.library.custom_op("mae_fast::triton_masked_patch_mse", mutates_args=())
def masked_patch_mse_op(pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int, norm_pix: bool) -> Tensor:
    return launch_masked_patch_mse(pred, imgs, mask, patch_size, norm_pix)


@masked_patch_mse_op.register_fake
def _(pred, imgs, mask, patch_size, norm_pix):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("mae_fast::triton_masked_patch_mse_backward", mutates_args=())
def masked_patch_mse_backward_op(grad_loss: Tensor, pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int,
                                 norm_pix: bool) -> Tensor:
    return launch_masked_patch_mse_backward(grad_loss, pred, imgs, mask, patch_size, norm_pix)


@masked_patch_mse_backward_op.register_fake
def _(grad_loss, pred, imgs, mask, patch_size, norm_pix):
    return torch.empty_like(pred)


def _mse_setup(ctx, inputs, output):
    pred, imgs, mask, patch_size, norm_pix = inputs
    ctx.save_for_backward(pred, imgs, mask)
    ctx.patch_size, ctx.norm_pix = patch_size, norm_pix


def _mse_backward(ctx, grad):
    pred, imgs, mask = ctx.saved_tensors
    grad_pred = None
    if ctx.needs_input_grad[0]:
        grad_pred = masked_patch_mse_backward_op(grad, pred, imgs, mask, ctx.patch_size, ctx.norm_pix)
    return grad_pred, None, None, None, None  # imgs/mask gradients: the backend refuses inputs that need them


masked_patch_mse_op.register_autograd(_mse_backward, setup_context=_mse_setup)


# ---- entry points (the ``triton`` backends of mae_fast.ops.masking; arguments as its public functions') ----

def gather_visible(x, ids_keep, pos):
    return gather_visible_op(x.contiguous(), ids_keep.contiguous(), None if pos is None else pos.contiguous())


def unshuffle_with_mask_token(x_vis, ids_restore, mask_token, pos, cls_token):
    D = x_vis.shape[-1]
    return unshuffle_op(x_vis.contiguous(), ids_restore.contiguous(), mask_token.reshape(D).contiguous(),
                        None if pos is None else pos.contiguous(), bool(cls_token))


def patchify_gather(imgs, ids_keep, patch_size):
    return patchify_gather_op(imgs.contiguous(), ids_keep.contiguous(), int(patch_size))


def masked_patch_mse(pred, imgs, mask, patch_size, norm_pix):
    return masked_patch_mse_op(pred.contiguous(), imgs.contiguous(), mask.reshape(-1).float().contiguous(),
                               int(patch_size), bool(norm_pix))
