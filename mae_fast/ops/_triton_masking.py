"""Triton backend ("triton") for the four masked-token ops; kernels in ``mae_fast.kernels.masking``.

Order: launchers -> custom ops (fakes, autograd) -> backend registration. On CUDA tensors ``auto`` ranks
this backend ahead of ``torch``; on CPU tensors it can only run under the Triton interpreter
(TRITON_INTERPRET=1 set before the kernels are imported) and ``auto`` still prefers ``torch`` there.
"""
import os
from typing import Optional

import torch
from torch import Tensor

from . import _masking_common as common
from .dispatch import Backend, register_backend

try:
    import triton

    from mae_fast.kernels import masking as kernels  # looked up at call time: tests may reload it
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - triton is a Linux dependency
    triton = kernels = None
    _IMPORT_ERROR = f"triton not importable ({e})"


def kernels_interpreted() -> bool:
    """True when the kernels were built by the Triton interpreter (they then run on CPU tensors)."""
    return kernels is not None and type(kernels.gather_or_fill_rows_kernel).__name__ == "InterpretedFunction"


def interpreter_active() -> bool:
    """CPU tensors are taken only while TRITON_INTERPRET=1 is set *and* the kernels were built by the
    interpreter, so a test that turns the interpreter on for itself does not leak CPU support to others."""
    return kernels_interpreted() and os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    kernels.gather_or_fill_rows_kernel[grid](
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
    kernels.masked_row_sum_kernel[grid](grad, idx, partial, L, K, D, n_chunks,
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
    kernels.patchify_gather_kernel[(triton.cdiv(B * K, block_r),)](
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
        kernels.masked_patch_mse_fwd_kernel[grid](pred, imgs, mask_f32, row_loss, *scalars, NORM_PIX=norm_pix, **meta)
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
        kernels.masked_patch_mse_bwd_kernel[grid](pred, imgs, mask_f32, scale, grad_pred, *scalars,
                                                  NORM_PIX=norm_pix, **meta)
    return grad_pred


# ---- custom ops -----------------------------------------------------------------------------------

gather_visible_op, unshuffle_op = common.define_row_ops("triton", gather_rows, masked_row_sum)


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


torch.library.register_autograd("mae_fast::triton_patchify_gather", _patchify_gather_backward,
                                setup_context=_patchify_gather_setup)


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
    return grad_pred, None, None, None, None  # imgs/mask gradients: refused in reasons


torch.library.register_autograd("mae_fast::triton_masked_patch_mse", _mse_backward, setup_context=_mse_setup)


# ---- backend functions (receive exactly the args of the public API's select_backend call) ----------

def _gather_visible(x, ids_keep, pos):
    return common.call_gather_visible(gather_visible_op, x, ids_keep, pos)


def _unshuffle(x_vis, ids_restore, mask_token, pos, cls_token):
    return common.call_unshuffle(unshuffle_op, x_vis, ids_restore, mask_token, pos, cls_token)


def _patchify_gather(imgs, ids_keep, patch_size):
    return patchify_gather_op(imgs.contiguous(), ids_keep.contiguous(), int(patch_size))


def _masked_patch_mse(pred, imgs, mask, patch_size, norm_pix):
    return masked_patch_mse_op(pred.contiguous(), imgs.contiguous(), mask.reshape(-1).float().contiguous(),
                               int(patch_size), bool(norm_pix))


# ---- reasons, priority, registration ----------------------------------------------------------------

_CPU_WHY = "Triton runs CPU tensors only under TRITON_INTERPRET=1 set before mae_fast.kernels.masking is imported"


def _kw():
    return dict(cuda_only=False, cpu_ok=lambda: interpreter_active(), cpu_why=_CPU_WHY)


def _gather_visible_reasons(x, ids_keep, pos):
    return common.gather_visible_reasons(x, ids_keep, pos, **_kw())


def _unshuffle_reasons(x_vis, ids_restore, mask_token, pos, cls_token):
    return common.unshuffle_reasons(x_vis, ids_restore, mask_token, pos, cls_token, **_kw())


def _patchify_gather_reasons(imgs, ids_keep, patch_size):
    return common.kernel_input_reasons({"imgs": imgs}, ids_keep, **_kw())


def _masked_patch_mse_reasons(pred, imgs, mask, patch_size, norm_pix):
    out = common.kernel_input_reasons({"pred": pred, "imgs": imgs}, None, **_kw())
    if mask.device != pred.device:
        out.append("mask on another device")
    if imgs.requires_grad:
        out.append("imgs requires grad (the kernel differentiates pred only)")
    if mask.requires_grad:
        out.append("mask requires grad (the kernel differentiates pred only)")
    return out


def _priority(*args, **kwargs) -> float:
    """Ahead of torch (1000) on CUDA tensors; behind it on CPU, where only the interpreter runs."""
    return 10.0 if common.on_cuda(*args) else 2000.0


def _available():
    return _IMPORT_ERROR


for _op, _fn, _why in (
    ("gather_visible", _gather_visible, _gather_visible_reasons),
    ("unshuffle_with_mask_token", _unshuffle, _unshuffle_reasons),
    ("patchify_gather", _patchify_gather, _patchify_gather_reasons),
    ("masked_patch_mse", _masked_patch_mse, _masked_patch_mse_reasons),
):
    register_backend(Backend(op=_op, name="triton", fn=_fn, reasons=_why, priority=_priority, available=_available))
