"""Per-patch histograms of oriented gradients (MaskFeat's HOG target) in one Triton pass over the image.

One program takes ``BLOCK_CELLS`` cells of one (image, channel): for each pixel of a cell it reads the 3x3
neighbourhood (reflect padding at the border), forms the Sobel gradients, their magnitude (times the optional
Gaussian window) and the unsigned orientation bin, then sums the magnitudes per bin over the cell, L2-normalises
the cell's histogram and writes it straight into the per-patch layout ``(B, L, C * bins * r * r)`` with
``r = patch_size // cell`` (order inside a patch: channel, bin, cell row, cell column).

The bin is found without ``atan2``: the gradient is folded into the upper half plane (orientation modulo pi)
and ``bin = #{k in 1..bins-1 : angle >= k * pi / bins}``, each test a sign of a cross product with the boundary
direction ``(cos k pi / bins, sin k pi / bins)``. Away from the boundaries (a set of measure zero) this is
``floor(angle * bins / pi)`` exactly.

No backward: a reconstruction target is a constant. Read top to bottom: kernel -> launcher -> custom op (with a
fake) -> entry function. Checks, the torch reference and the backend registration are in :mod:`mae_fast.ops.hog`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["hog_forward", "hog_op", "hog", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_alloc = torch.empty  # tests swap in a NaN-filling allocator so unwritten elements show


# ---- kernel -------------------------------------------------------------------------------------

@triton.jit
def _hog_kernel(
    X, OUT, DIRS, WIN,
    C, H, W, n_cells_w, n_cells, grid_w, r, L, D,
    stride_b, stride_c, stride_h, stride_w,
    BINS: tl.constexpr, CELL: tl.constexpr, WIN_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_CELLS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    bc = tl.program_id(0)
    b = (bc // C).to(tl.int64)
    c = bc % C
    cells = tl.program_id(1) * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)
    cell_ok = cells < n_cells
    ci = cells // n_cells_w
    cj = cells - ci * n_cells_w
    p = tl.arange(0, BLOCK_P)
    p_ok = p < CELL * CELL
    y = ci[:, None] * CELL + (p // CELL)[None, :]
    x = cj[:, None] * CELL + (p % CELL)[None, :]
    mask = cell_ok[:, None] & p_ok[None, :]
    # reflect padding by one pixel: row -1 is row 1, row H is row H - 2
    ym = tl.where(y == 0, 1, y - 1)
    yp = tl.where(y == H - 1, H - 2, y + 1)
    xm = tl.where(x == 0, 1, x - 1)
    xp = tl.where(x == W - 1, W - 2, x + 1)
    base = X + b * stride_b + c * stride_c
    rm, r0, rp = ym * stride_h, y * stride_h, yp * stride_h
    cm, c0, cp = xm * stride_w, x * stride_w, xp * stride_w
    nw = tl.load(base + rm + cm, mask=mask, other=0.0).to(tl.float32)
    nn = tl.load(base + rm + c0, mask=mask, other=0.0).to(tl.float32)
    ne = tl.load(base + rm + cp, mask=mask, other=0.0).to(tl.float32)
    ww = tl.load(base + r0 + cm, mask=mask, other=0.0).to(tl.float32)
    ee = tl.load(base + r0 + cp, mask=mask, other=0.0).to(tl.float32)
    sw = tl.load(base + rp + cm, mask=mask, other=0.0).to(tl.float32)
    ss = tl.load(base + rp + c0, mask=mask, other=0.0).to(tl.float32)
    se = tl.load(base + rp + cp, mask=mask, other=0.0).to(tl.float32)
    gx = (ne + 2.0 * ee + se) - (nw + 2.0 * ww + sw)  # Sobel: right minus left
    gy = (sw + 2.0 * ss + se) - (nw + 2.0 * nn + ne)  # bottom minus top
    mag = tl.sqrt(gx * gx + gy * gy)
    if HAS_WINDOW:
        mag = mag * tl.load(WIN + y % WIN_SIZE, mask=mask, other=0.0) * tl.load(WIN + x % WIN_SIZE, mask=mask,
                                                                                   other=0.0)
    mag = tl.where(mask, mag, 0.0)
    # orientation modulo pi: fold the gradient into the upper half plane (angle in [0, pi))
    flip = (gy < 0.0) | ((gy == 0.0) & (gx < 0.0))
    ux = tl.where(flip, -gx, gx)
    uy = tl.where(flip, -gy, gy)
    bins = tl.zeros((BLOCK_CELLS, BLOCK_P), dtype=tl.int32)
    for k in tl.static_range(BINS - 1):
        cos_k = tl.load(DIRS + 2 * k)
        sin_k = tl.load(DIRS + 2 * k + 1)
        bins += (cos_k * uy - sin_k * ux >= 0.0).to(tl.int32)
    # exactly vertical (gx == 0, e.g. on the border columns): pi / 2, not a rounded cos(pi / 2) either side of it
    bins = tl.where((ux == 0.0) & (uy > 0.0), BINS // 2, bins)
    sumsq = tl.zeros((BLOCK_CELLS,), dtype=tl.float32)
    for k in tl.static_range(BINS):
        h = tl.sum(tl.where(bins == k, mag, 0.0), axis=1)
        sumsq += h * h
    inv = 1.0 / tl.maximum(tl.sqrt(sumsq), 1e-12)  # F.normalize's eps
    patch = (ci // r) * grid_w + cj // r
    out_base = OUT + b * L * D + patch.to(tl.int64) * D + (ci % r) * r + cj % r
    for k in tl.static_range(BINS):
        h = tl.sum(tl.where(bins == k, mag, 0.0), axis=1)
        tl.store(out_base + (c * BINS + k) * r * r, h * inv, mask=cell_ok)


# ---- launcher -----------------------------------------------------------------------------------

def _directions(bins: int, device) -> Tensor:
    """(cos, sin) of the bin boundaries k * pi / bins, k = 1 .. bins - 1 (one dummy row when there are none)."""
    ks = torch.arange(1, max(bins, 2), dtype=torch.float64) * math.pi / bins
    return torch.stack([ks.cos(), ks.sin()], dim=1).to(torch.float32).reshape(-1).to(device)


def gaussian_window(size: int, device=None) -> Tensor:
    """1-D weights of MaskFeat's Gaussian window (std ``size // 2``, summing to 1): pixel (y, x) of the image is
    weighted by ``w[y % size] * w[x % size]``, a 2-D Gaussian over every ``size`` x ``size`` tile."""
    n = torch.arange(size, dtype=torch.float64)
    w = torch.exp(-0.5 * ((n - n.mean()) / (size // 2)) ** 2)
    return (w / w.sum()).to(torch.float32).to(device)


def hog_forward(imgs: Tensor, patch_size: int, bins: int, cell: int, window: int) -> Tensor:
    """(B, L, C * bins * (patch_size // cell)**2) fp32 histograms; inputs checked by :func:`mae_fast.ops.hog`."""
    B, C, H, W = imgs.shape
    r = patch_size // cell
    grid_w = W // patch_size
    L, D = (H // patch_size) * grid_w, C * bins * r * r
    out = _alloc((B, L, D), dtype=torch.float32, device=imgs.device)
    n_cells_w = W // cell
    n_cells = (H // cell) * n_cells_w
    if out.numel() == 0:
        return out
    block_p = triton.next_power_of_2(cell * cell)
    block_cells = max(1, min(64, 2048 // block_p))
    dirs = _directions(bins, imgs.device)
    win = gaussian_window(window, imgs.device) if window else dirs
    _hog_kernel[(B * C, triton.cdiv(n_cells, block_cells))](
        imgs, out, dirs, win,
        C, H, W, n_cells_w, n_cells, grid_w, r, L, D,
        imgs.stride(0), imgs.stride(1), imgs.stride(2), imgs.stride(3),
        BINS=bins, CELL=cell, WIN_SIZE=max(window, 1), HAS_WINDOW=bool(window),
        BLOCK_CELLS=block_cells, BLOCK_P=block_p, num_warps=4,
    )
    return out


# ---- custom op ----------------------------------------------------------------------------------

@torch.library.custom_op("mae_fast::hog", mutates_args=())
def hog_op(imgs: Tensor, patch_size: int, bins: int, cell: int, window: int) -> Tensor:
    return hog_forward(imgs, patch_size, bins, cell, window)


@hog_op.register_fake
def _(imgs, patch_size, bins, cell, window):
    B, C, H, W = imgs.shape
    r = patch_size // cell
    return imgs.new_empty((B, (H // patch_size) * (W // patch_size), C * bins * r * r), dtype=torch.float32)


# ---- entry point (the ``triton`` backend of mae_fast.ops.hog; arguments as its select_backend call's) ----------

def hog(imgs, patch_size, bins, cell, window):
    return hog_op(imgs, patch_size, bins, cell, window)
