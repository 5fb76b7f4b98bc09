"""What the Triton and CUDA masked-token backends share: inverse permutations, the torch.library
custom ops for gather_visible / unshuffle_with_mask_token built on two row primitives, and input
reasons.

A backend supplies two primitives (same semantics on both):

``gather_rows(src, idx, fill, pos, pos_by_src, bad, head, limit, upper) -> out``
    src (B, head+S, D), idx (B, N) int32/int64 -> out (B, head+N, D), dtype of src. Output row r < head
    copies src row r; body row i takes src row ``head + idx[b, i]`` when idx is in [0, limit), the
    ``fill`` row (zero if None) when idx is in [limit, upper), NaN otherwise. ``pos`` (P, D) is added,
    row ``idx`` when ``pos_by_src`` else the output row. Batches with ``bad[b]`` are NaN.
``masked_row_sum(grad, idx, head, K) -> (D,) float32``
    sum over b, i of grad[b, head + i] where K <= idx[b, i] < L, reduced in a fixed order.

Backwards never use atomics: ids are (parts of) permutations, so the scatter back is a gather with
the inverse. Duplicate ids, which would make that wrong, are detected on the device without a host
sync and turn the affected gradient rows into NaN instead of passing silently.
"""
from typing import Callable, Optional

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


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


def kernel_input_reasons(tensors: dict, ids: Optional[Tensor] = None, *, cuda_only: bool,
                         cpu_ok: Callable[[], bool] = lambda: False, cpu_why: str = "") -> list[str]:
    """Reasons shared by the kernel backends: dtypes, devices and (for CPU) whether the kernels can run."""
    out = []
    devices = {t.device for t in tensors.values() if isinstance(t, Tensor)}
    if ids is not None:
        devices.add(ids.device)
        if ids.dtype not in INDEX_DTYPES:
            out.append(f"ids dtype {ids.dtype} not int32/int64")
    if len(devices) > 1:
        out.append(f"inputs on several devices {sorted(map(str, devices))}")
    for name, t in tensors.items():
        # integer ones too: the kernels read pos_embed / mask_token in their own dtype (an int64 pos_embed with
        # bf16 rows came out without its pos rows)
        if isinstance(t, Tensor) and t.dtype not in KERNEL_DTYPES:
            out.append(f"{name} dtype {t.dtype} not float32/float16/bfloat16")
    dev = next(iter(devices)) if devices else torch.device("cpu")
    if dev.type != "cuda" and not (not cuda_only and dev.type == "cpu" and cpu_ok()):
        out.append(f"needs CUDA tensors, got {dev.type}" + (f" ({cpu_why})" if cpu_why else ""))
    return out


def define_row_ops(prefix: str, gather_rows: Callable, masked_row_sum: Callable):
    """Custom ops ``mae_fast::{prefix}_gather_visible`` and ``..._unshuffle`` (with their backward ops and
    autograd) on top of a backend's two primitives. Returns (gather_visible_op, unshuffle_op)."""

    # ---- gather_visible ------------------------------------------------------------------------
    @torch.library.custom_op(f"mae_fast::{prefix}_gather_visible", mutates_args=())
    def gather_visible_op(x: Tensor, ids_keep: Tensor, pos: Optional[Tensor]) -> Tensor:
        L = x.shape[1]
        return gather_rows(x, ids_keep, None, pos, True, None, 0, L, L)

    @gather_visible_op.register_fake
    def _(x, ids_keep, pos):
        return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]))

    @torch.library.custom_op(f"mae_fast::{prefix}_gather_visible_backward", mutates_args=())
    def gather_visible_backward_op(grad: Tensor, ids_keep: Tensor, L: int) -> Tensor:
        K = ids_keep.shape[1]
        inv, bad = inverse_positions(ids_keep, L, L, sentinel=K)  # sentinel K -> zero row
        return gather_rows(grad, inv, None, None, False, bad, 0, K, K + 1)

    @gather_visible_backward_op.register_fake
    def _(grad, ids_keep, L):
        return grad.new_empty((grad.shape[0], L, grad.shape[2]))

    def gather_setup(ctx, inputs, output):
        x, ids_keep, pos = inputs
        ctx.save_for_backward(ids_keep)
        ctx.L = x.shape[1]
        ctx.pos_dtype = None if pos is None else pos.dtype

    def gather_backward(ctx, grad):
        (ids_keep,) = ctx.saved_tensors
        need_x, _, need_pos = ctx.needs_input_grad
        if not (need_x or need_pos):
            return None, None, None
        grad_x = gather_visible_backward_op(grad.contiguous(), ids_keep, ctx.L)
        grad_pos = grad_x.float().sum(0).to(ctx.pos_dtype) if need_pos else None
        return (grad_x if need_x else None), None, grad_pos

    torch.library.register_autograd(f"mae_fast::{prefix}_gather_visible", gather_backward,
                                    setup_context=gather_setup)

    # ---- unshuffle_with_mask_token -------------------------------------------------------------
    @torch.library.custom_op(f"mae_fast::{prefix}_unshuffle", mutates_args=())
    def unshuffle_op(x_vis: Tensor, ids_restore: Tensor, mask_token: Tensor, pos: Optional[Tensor],
                     cls_token: bool) -> Tensor:
        head = int(cls_token)
        K, L = x_vis.shape[1] - head, ids_restore.shape[1]
        return gather_rows(x_vis, ids_restore, mask_token, pos, False, None, head, K, L)

    @unshuffle_op.register_fake
    def _(x_vis, ids_restore, mask_token, pos, cls_token):
        return x_vis.new_empty((x_vis.shape[0], int(cls_token) + ids_restore.shape[1], x_vis.shape[2]))

    @torch.library.custom_op(f"mae_fast::{prefix}_unshuffle_backward", mutates_args=())
    def unshuffle_backward_op(grad: Tensor, ids_restore: Tensor, K: int, cls_token: bool) -> tuple[Tensor, Tensor]:
        head = int(cls_token)
        L = ids_restore.shape[1]
        inv, bad = inverse_positions(ids_restore, K, K, sentinel=L)  # sentinel L -> zero row
        grad_x_vis = gather_rows(grad, inv, None, None, False, bad, head, L, L + 1)
        grad_mask_token = masked_row_sum(grad, ids_restore, head, K)
        return grad_x_vis, grad_mask_token

    @unshuffle_backward_op.register_fake
    def _(grad, ids_restore, K, cls_token):
        return (grad.new_empty((grad.shape[0], int(cls_token) + K, grad.shape[2])),
                grad.new_empty((grad.shape[2],), dtype=torch.float32))

    def unshuffle_setup(ctx, inputs, output):
        x_vis, ids_restore, mask_token, pos, cls_token = inputs
        ctx.save_for_backward(ids_restore)
        ctx.K = x_vis.shape[1] - int(cls_token)
        ctx.cls_token = cls_token
        ctx.mask_dtype = mask_token.dtype
        ctx.pos_dtype = None if pos is None else pos.dtype

    def unshuffle_backward(ctx, grad):
        (ids_restore,) = ctx.saved_tensors
        need_x, _, need_mask, need_pos, _ = ctx.needs_input_grad
        grad_x = grad_mask = grad_pos = None
        if need_x or need_mask:
            grad_x, grad_mask = unshuffle_backward_op(grad.contiguous(), ids_restore, ctx.K, ctx.cls_token)
            grad_mask = grad_mask.to(ctx.mask_dtype) if need_mask else None
            grad_x = grad_x if need_x else None
        if need_pos:
            grad_pos = grad.float().sum(0).to(ctx.pos_dtype)
        return grad_x, None, grad_mask, grad_pos, None

    torch.library.register_autograd(f"mae_fast::{prefix}_unshuffle", unshuffle_backward,
                                    setup_context=unshuffle_setup)
    return gather_visible_op, unshuffle_op


def gather_visible_reasons(x, ids_keep, pos, **kw) -> list[str]:
    return kernel_input_reasons({"x": x, "pos_embed": pos}, ids_keep, **kw)


def unshuffle_reasons(x_vis, ids_restore, mask_token, pos, cls_token, **kw) -> list[str]:
    return kernel_input_reasons({"x_vis": x_vis, "mask_token": mask_token, "pos_embed": pos}, ids_restore, **kw)


def call_gather_visible(op, x, ids_keep, pos):
    return op(x.contiguous(), ids_keep.contiguous(), None if pos is None else pos.contiguous())


def call_unshuffle(op, x_vis, ids_restore, mask_token, pos, cls_token):
    D = x_vis.shape[-1]
    return op(x_vis.contiguous(), ids_restore.contiguous(), mask_token.reshape(D).contiguous(),
              None if pos is None else pos.contiguous(), bool(cls_token))


def on_cuda(*args, **kwargs) -> bool:
    first = next((a for a in args if isinstance(a, Tensor)), None)
    return first is not None and first.device.type == "cuda"
