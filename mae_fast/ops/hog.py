"""Histograms of oriented gradients per patch: the HOG reconstruction target of MaskFeat (Wei et al. 2022).

``hog(imgs, patch_size)`` -> ``(B, L, C * bins * (patch_size // cell)**2)`` fp32, patches in the model's
(row-major) order. The definition, as MaskFeat's:

- gradients per colour channel (no grey conversion) by 3x3 Sobel filters, with one pixel of reflect padding;
- magnitude ``sqrt(gx^2 + gy^2)``, optionally times a Gaussian window (``window`` pixels wide, std
  ``window // 2``, tiled over the image; 0: off);
- unsigned orientation (the gradient's angle modulo pi), hard-assigned to ``bins`` equal bins over [0, pi);
- per ``cell`` x ``cell`` cell and channel, the sum of the magnitudes in each bin, L2-normalised over the bins
  (``F.normalize``: divided by ``max(norm, 1e-12)``);
- a patch's vector is its cells' histograms in the order (channel, bin, cell row, cell column).

Backends (see :mod:`mae_fast.ops.dispatch`; op ``hog``): ``triton`` (:mod:`mae_fast.kernels.hog`, one pass; on
CUDA tensors refused until it passes the GPU tests, ``MAE_FAST_TRITON_UNVERIFIED=1`` runs it anyway) and
``torch`` (the reference below). No gradient: a target is a constant.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mae_fast.kernels import hog as triton_hog

from . import platform
from .dispatch import Backend, raise_if, register_backend, select_backend

__all__ = ["hog", "hog_reference", "hog_width", "GPU_VERIFIED"]

# On CUDA tensors the kernel runs only with MAE_FAST_TRITON_UNVERIFIED=1 until tests/ops/test_hog.py passes on a GPU.
GPU_VERIFIED = False


def hog_width(patch_size: int, in_chans: int = 3, bins: int = 9, cell: int = 8) -> int:
    """Features per patch: channels x bins x cells per patch."""
    return in_chans * bins * (patch_size // cell) ** 2


# ---- torch backend (the reference the Triton kernel is tested against) ------------------------------------------

def hog_reference(imgs: torch.Tensor, patch_size: int, bins: int = 9, cell: int = 8, window: int = 0) -> torch.Tensor:
    """The definition above in plain torch (fp32; fp64 inputs: fp64)."""
    dtype = torch.float64 if imgs.dtype == torch.float64 else torch.float32
    B, C, H, W = imgs.shape
    x = F.pad(imgs.to(dtype), (1, 1, 1, 1), mode="reflect")

    def at(dy, dx):  # the neighbour (dy, dx) of every pixel
        return x[:, :, 1 + dy:1 + dy + H, 1 + dx:1 + dx + W]

    # Sobel, summed as the kernel sums them: on the border rows (columns) the reflected neighbours make gy (gx)
    # exactly 0, an orientation of exactly 0 (pi / 2), never a rounding error either side of a bin boundary
    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))  # right minus left
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))  # bottom minus top
    mag = torch.sqrt(gx * gx + gy * gy)
    if window:
        w = triton_hog.gaussian_window(window, imgs.device).to(dtype)
        wy, wx = w[torch.arange(H, device=imgs.device) % window], w[torch.arange(W, device=imgs.device) % window]
        mag = mag * wy[:, None] * wx[None, :]
    angle = torch.remainder(torch.atan2(gy, gx), math.pi)
    idx = torch.floor(angle * (bins / math.pi)).long().clamp_(0, bins - 1)
    hist = F.one_hot(idx, bins).to(dtype) * mag[..., None]                      # (B, C, H, W, bins)
    hist = hist.view(B, C, H // cell, cell, W // cell, cell, bins).sum(dim=(3, 5))  # (B, C, Hc, Wc, bins)
    hist = F.normalize(hist, p=2, dim=-1)
    r, gh, gw = patch_size // cell, H // patch_size, W // patch_size
    hist = hist.view(B, C, gh, r, gw, r, bins).permute(0, 2, 4, 1, 6, 3, 5)  # (B, gh, gw, C, bins, r, r)
    return hist.reshape(B, gh * gw, C * bins * r * r)


def _always(*args, **kwargs):
    return []


def triton_hog_reasons(imgs, patch_size, bins, cell, window) -> list[str]:
    out = []
    if imgs.device.type == "cuda":
        if not platform.gpu_verified(GPU_VERIFIED):
            out.append("not yet verified on a GPU (MAE_FAST_TRITON_UNVERIFIED=1 runs it)")
    elif imgs.device.type != "cpu" or not platform.interpreter():
        out.append("needs a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1 for the interpreter)")
    if imgs.dtype not in triton_hog.SUPPORTED_DTYPES:
        out.append(f"imgs dtype {imgs.dtype} not supported")
    if cell * cell > 4096:
        out.append(f"cell {cell} too large for one tile (at most 64)")
    return out


register_backend(Backend(op="hog", name="triton", fn=triton_hog.hog, reasons=triton_hog_reasons,
                         available=platform.triton_unavailable, gpu=True))
register_backend(Backend(op="hog", name="torch", fn=hog_reference, reasons=_always))


# ---- functional API -----------------------------------------------------------------------------

def _check(imgs, patch_size, bins, cell, window) -> None:
    if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4:
        raise ValueError(f"hog: imgs must be a (B, C, H, W) tensor, got {getattr(imgs, 'shape', type(imgs).__name__)}")
    problems = []
    if not imgs.is_floating_point():
        problems.append(f"imgs must be floating point, got {imgs.dtype}")
    for name, v in (("patch_size", patch_size), ("bins", bins), ("cell", cell)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            problems.append(f"{name} must be a positive integer, got {v!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        problems.append(f"window must be an integer >= 0 (0: no Gaussian window), got {window!r}")
    raise_if(problems, "hog")
    H, W = imgs.shape[-2:]
    if patch_size % cell:
        problems.append(f"patch_size {patch_size} is not a multiple of the cell size {cell}")
    if H % patch_size or W % patch_size:
        problems.append(f"image {H}x{W} is not a multiple of patch_size {patch_size}")
    if H < 2 or W < 2:
        problems.append(f"image {H}x{W} is too small for a 3x3 gradient (at least 2x2)")
    if window and (H % window or W % window):
        problems.append(f"image {H}x{W} is not a multiple of the Gaussian window {window}")
    raise_if(problems, "hog")


@torch.no_grad()
def hog(imgs: torch.Tensor, patch_size: int, *, bins: int = 9, cell: int = 8, window: int = 0,
        backend: str = "auto") -> torch.Tensor:
    """Per-patch HOG of ``imgs`` (B, C, H, W): ``(B, L, C * bins * (patch_size // cell)**2)`` fp32 (definition in
    the module docstring)."""
    _check(imgs, patch_size, bins, cell, window)
    args = (imgs, patch_size, bins, cell, window)
    return select_backend("hog", backend, *args).fn(*args)
