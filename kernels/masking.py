"""Triton kernels for the masked-token ops (launchers and autograd: ``mae_fast.ops._triton_masking``).

Four kernels, each a single pass over the bytes it must touch:

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
import triton
import triton.language as tl


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
