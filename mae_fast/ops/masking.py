"""Masked-token ops: gathering visible tokens, restoring the decoder sequence, patchifying and the loss.

Public functions validate their inputs (shapes, dtypes, devices and, unless ``check_ids=False``, the
index range), then dispatch to a backend (``dispatch.PRIORITY``): ``triton`` (:mod:`mae_fast.kernels.masking`),
``cuda`` (gather_visible and unshuffle_with_mask_token; :mod:`mae_fast.csrc.masking`, compiled on first use) and
``torch``, the reference every kernel is tested against.
"""
from __future__ import annotations

import torch

from mae_fast.csrc import masking as cuda_masking
from mae_fast.kernels import masking as triton_masking

from . import platform
from .dispatch import Backend, check_tensor, raise_if, register_backend, select_backend

__all__ = [
    "patchify",
    "unpatchify",
    "gather_visible",
    "unshuffle_with_mask_token",
    "patchify_gather",
    "masked_patch_mse",
]

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


# ---- layouts (official MAE order) ---------------------------------------------------------------

def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), pixels ordered (row, col, channel) as in official MAE."""
    B, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int], in_chans: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify` for a (h, w) grid of patches."""
    B = x.shape[0]
    p, (h, w) = patch_size, grid
    x = x.reshape(B, h, w, p, p, in_chans)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, in_chans, h * p, w * p)


# ---- validation ---------------------------------------------------------------------------------

def _check_ids(op: str, ids: torch.Tensor, batch: int, upper: int, device, check_range: bool) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{op}: ids must be a tensor of int64/int32 indices, got {type(ids).__name__}")
    problems = check_tensor("ids", ids, ndim=2, dtypes=INDEX_DTYPES)
    raise_if(problems, op, TypeError if ids.dtype not in INDEX_DTYPES else ValueError)
    if ids.shape[0] != batch:
        raise ValueError(f"{op}: ids batch {ids.shape[0]} != input batch {batch}")
    if ids.device != device:
        raise ValueError(f"{op}: ids on {ids.device} but input on {device}")
    if check_range and ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= upper:
            raise IndexError(f"{op}: ids must lie in [0, {upper}), got values in [{lo}, {hi}]")


def _pos_rows(op: str, pos_embed, rows: int, dim: int, x: torch.Tensor) -> torch.Tensor | None:
    if pos_embed is None:
        return None
    if not isinstance(pos_embed, torch.Tensor):
        raise TypeError(f"{op}: pos_embed must be a tensor, got {type(pos_embed).__name__}")
    pe = pos_embed[0] if pos_embed.dim() == 3 else pos_embed
    if pos_embed.dim() == 3 and pos_embed.shape[0] != 1:
        raise ValueError(f"{op}: pos_embed must be (1, N, D) or (N, D), got {tuple(pos_embed.shape)}")
    if tuple(pe.shape) != (rows, dim):
        raise ValueError(f"{op}: pos_embed must hold {rows} rows of width {dim}, got {tuple(pos_embed.shape)}")
    if pe.device != x.device:
        raise ValueError(f"{op}: pos_embed on {pe.device} but input on {x.device}")
    return pe


def _float_input(op: str, name: str, t, ndim: int) -> None:
    problems = check_tensor(name, t, ndim=ndim, dtypes=FLOATS)
    raise_if(problems, op, TypeError if isinstance(t, torch.Tensor) and t.dtype not in FLOATS else ValueError)


# ---- torch reference backend --------------------------------------------------------------------

def _gather_visible_torch(x, ids_keep, pos):
    idx = ids_keep.long().unsqueeze(-1).expand(-1, -1, x.shape[-1])
    out = torch.gather(x, 1, idx)
    if pos is not None:
        out = out + torch.gather(pos.to(out.dtype).unsqueeze(0).expand(x.shape[0], -1, -1), 1, idx)
    return out


def _unshuffle_torch(x_vis, ids_restore, mask_token, pos, cls_token):
    B, L = ids_restore.shape
    D = x_vis.shape[-1]
    body = x_vis[:, 1:] if cls_token else x_vis
    K = body.shape[1]
    tokens = torch.cat([body, mask_token.reshape(1, 1, D).to(x_vis.dtype).expand(B, L - K, D)], dim=1)
    out = torch.gather(tokens, 1, ids_restore.long().unsqueeze(-1).expand(-1, -1, D))
    if cls_token:
        out = torch.cat([x_vis[:, :1], out], dim=1)
    if pos is not None:
        out = out + pos.to(out.dtype)
    return out


def _patchify_gather_torch(imgs, ids_keep, patch_size):
    B, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    # (B, L, C*p*p), channel-major inside a patch: the flattening order of the conv weight
    patches = imgs.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
    return torch.gather(patches, 1, ids_keep.long().unsqueeze(-1).expand(-1, -1, C * p * p))


def _masked_patch_mse_torch(pred, imgs, mask, patch_size, norm_pix):
    target = patchify(imgs, patch_size).float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred.float() - target).pow(2).mean(dim=-1)
    mask = mask.float()
    return (loss * mask).sum() / mask.sum()


def _always(*args, **kwargs):
    return []


# ---- kernel backends: what they cannot take ----------------------------------------------------------

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel_reasons(tensors: dict, ids=None, *, interpreter_ok: bool) -> list[str]:
    """Dtypes and devices the kernels take; CPU tensors only in the Triton interpreter (``interpreter_ok``)."""
    out = []
    devices = {t.device for t in tensors.values() if isinstance(t, torch.Tensor)}
    if ids is not None:
        devices.add(ids.device)
        if ids.dtype not in INDEX_DTYPES:
            out.append(f"ids dtype {ids.dtype} not int32/int64")
    if len(devices) > 1:
        out.append(f"inputs on several devices {sorted(map(str, devices))}")
    for name, t in tensors.items():
        # integer ones too: the kernels read pos_embed / mask_token in their own dtype (an int64 pos_embed with
        # bf16 rows came out without its pos rows)
        if isinstance(t, torch.Tensor) and t.dtype not in KERNEL_DTYPES:
            out.append(f"{name} dtype {t.dtype} not float32/float16/bfloat16")
    dev = next(iter(devices)) if devices else torch.device("cpu")
    if dev.type != "cuda" and not (interpreter_ok and dev.type == "cpu" and platform.interpreter()):
        why = " (Triton runs CPU tensors only under TRITON_INTERPRET=1 set before mae_fast is imported)" \
            if interpreter_ok else ""
        out.append(f"needs CUDA tensors, got {dev.type}{why}")
    return out


def _gather_visible_reasons(x, ids_keep, pos, interpreter_ok=True):
    return _kernel_reasons({"x": x, "pos_embed": pos}, ids_keep, interpreter_ok=interpreter_ok)


def _unshuffle_reasons(x_vis, ids_restore, mask_token, pos, cls_token, interpreter_ok=True):
    return _kernel_reasons({"x_vis": x_vis, "mask_token": mask_token, "pos_embed": pos}, ids_restore,
                           interpreter_ok=interpreter_ok)


def _cuda_gather_visible_reasons(x, ids_keep, pos):
    return _gather_visible_reasons(x, ids_keep, pos, interpreter_ok=False)


def _cuda_unshuffle_reasons(x_vis, ids_restore, mask_token, pos, cls_token):
    return _unshuffle_reasons(x_vis, ids_restore, mask_token, pos, cls_token, interpreter_ok=False)


def _patchify_gather_reasons(imgs, ids_keep, patch_size):
    return _kernel_reasons({"imgs": imgs}, ids_keep, interpreter_ok=True)


def _masked_patch_mse_reasons(pred, imgs, mask, patch_size, norm_pix):
    out = _kernel_reasons({"pred": pred, "imgs": imgs}, None, interpreter_ok=True)
    if mask.device != pred.device:
        out.append("mask on another device")
    if imgs.requires_grad:
        out.append("imgs requires grad (the kernel differentiates pred only)")
    if mask.requires_grad:
        out.append("mask requires grad (the kernel differentiates pred only)")
    return out


def _cuda_loaded(*args) -> bool:
    """The CUDA extension beats Triton on unshuffle_with_mask_token (bench/results/masking-*.json), but ``auto``
    never starts a compile by itself: it prefers the extension once it is loaded (built ahead of time with
    MAE_FAST_BUILD_CUDA=1, or asked for by name), and otherwise tries it after Triton."""
    return cuda_masking.loaded()


# ---- registration (order: dispatch.PRIORITY) -------------------------------------------------------------

for _op, _torch_fn, _triton_fn, _triton_why in (
    ("gather_visible", _gather_visible_torch, triton_masking.gather_visible, _gather_visible_reasons),
    ("unshuffle_with_mask_token", _unshuffle_torch, triton_masking.unshuffle_with_mask_token, _unshuffle_reasons),
    ("patchify_gather", _patchify_gather_torch, triton_masking.patchify_gather, _patchify_gather_reasons),
    ("masked_patch_mse", _masked_patch_mse_torch, triton_masking.masked_patch_mse, _masked_patch_mse_reasons),
):
    register_backend(Backend(op=_op, name="triton", fn=_triton_fn, reasons=_triton_why,
                             available=platform.triton_unavailable, gpu=True))
    register_backend(Backend(op=_op, name="torch", fn=_torch_fn, reasons=_always))
register_backend(Backend(op="gather_visible", name="cuda", fn=cuda_masking.gather_visible,
                         reasons=_cuda_gather_visible_reasons, available=cuda_masking.unavailable, gpu=True,
                         preferred=_cuda_loaded))
register_backend(Backend(op="unshuffle_with_mask_token", name="cuda", fn=cuda_masking.unshuffle_with_mask_token,
                         reasons=_cuda_unshuffle_reasons, available=cuda_masking.unavailable, gpu=True,
                         preferred=_cuda_loaded))


# ---- functional API -----------------------------------------------------------------------------

def gather_visible(x, ids_keep, pos_embed=None, *, backend: str = "auto", check_ids: bool = True):
    """Rows of ``x`` (B, L, D) at ``ids_keep`` (B, K), plus ``pos_embed`` (L, D) gathered alike.

    Returns (B, K, D). Differentiable in ``x``.
    """
    op = "gather_visible"
    _float_input(op, "x", x, 3)
    B, L, D = x.shape
    _check_ids(op, ids_keep, B, L, x.device, check_ids)
    pos = _pos_rows(op, pos_embed, L, D, x)
    impl = select_backend(op, backend, x, ids_keep, pos)
    return impl.fn(x, ids_keep, pos)


def unshuffle_with_mask_token(x_vis, ids_restore, mask_token, pos_embed=None, *, cls_token: bool = True,
                              backend: str = "auto", check_ids: bool = True):
    """The MAE decoder input: visible tokens back in place, mask tokens elsewhere, plus ``pos_embed``.

    ``x_vis`` is (B, 1+K, D) with the cls token first (or (B, K, D) with ``cls_token=False``),
    ``ids_restore`` (B, L) the official inverse permutation: position i takes visible row
    ``ids_restore[i]`` when it is < K, else the mask token. Returns (B, 1+L, D) (or (B, L, D)).
    """
    op = "unshuffle_with_mask_token"
    _float_input(op, "x_vis", x_vis, 3)
    B, Kc, D = x_vis.shape
    K = Kc - (1 if cls_token else 0)
    if K < 0:
        raise ValueError(f"{op}: x_vis has no rows but cls_token=True")
    if not isinstance(ids_restore, torch.Tensor) or ids_restore.dim() != 2:
        raise ValueError(f"{op}: ids_restore must be (B, L)")
    L = ids_restore.shape[1]
    if K > L:
        raise ValueError(f"{op}: {K} visible tokens but only {L} positions in ids_restore")
    _check_ids(op, ids_restore, B, L, x_vis.device, check_ids)
    if not isinstance(mask_token, torch.Tensor) or mask_token.numel() != D:
        raise ValueError(f"{op}: mask_token must hold {D} values (shape (1, 1, D) or (D,))")
    if mask_token.device != x_vis.device:
        raise ValueError(f"{op}: mask_token on {mask_token.device} but x_vis on {x_vis.device}")
    pos = _pos_rows(op, pos_embed, L + (1 if cls_token else 0), D, x_vis)
    impl = select_backend(op, backend, x_vis, ids_restore, mask_token, pos, cls_token)
    return impl.fn(x_vis, ids_restore, mask_token, pos, cls_token)


def _check_image(op: str, imgs, patch_size: int):
    _float_input(op, "imgs", imgs, 4)
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
        raise ValueError(f"{op}: patch_size must be a positive int, got {patch_size!r}")
    B, C, H, W = imgs.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"{op}: image size {H}x{W} is not divisible by patch size {patch_size}")
    return B, C, H // patch_size, W // patch_size


def patchify_gather(imgs, ids_keep, patch_size: int, *, backend: str = "auto", check_ids: bool = True):
    """Pixels of the visible patches only: (B, C, H, W) -> (B, K, C*p*p).

    Pixels inside a patch are ordered (channel, row, col), the flattening of a Conv2d patch-embedding
    weight, so ``out @ proj.weight.flatten(1).T + proj.bias`` equals the conv on those patches.
    """
    op = "patchify_gather"
    B, C, h, w = _check_image(op, imgs, patch_size)
    _check_ids(op, ids_keep, B, h * w, imgs.device, check_ids)
    impl = select_backend(op, backend, imgs, ids_keep, patch_size)
    return impl.fn(imgs, ids_keep, patch_size)


def masked_patch_mse(pred, imgs, mask, patch_size: int, norm_pix: bool = True, *, backend: str = "auto"):
    """The MAE loss: mean squared error per patch, averaged over the removed patches (mask == 1).

    ``pred`` is (B, L, p*p*C) in the official patchify order; with ``norm_pix`` each target patch is
    normalised by its mean and unbiased variance (+1e-6). Returns a float32 scalar.
    """
    op = "masked_patch_mse"
    B, C, h, w = _check_image(op, imgs, patch_size)
    _float_input(op, "pred", pred, 3)
    L, P = h * w, patch_size * patch_size * C
    if tuple(pred.shape) != (B, L, P):
        raise ValueError(f"{op}: pred must be (B, L, p*p*C) = {(B, L, P)}, got {tuple(pred.shape)}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, L):
        raise ValueError(f"{op}: mask must be (B, L) = {(B, L)}")
    if mask.device != pred.device or imgs.device != pred.device:
        raise ValueError(f"{op}: pred, imgs and mask must share a device")
    impl = select_backend(op, backend, pred, imgs, mask, patch_size, norm_pix)
    return impl.fn(pred, imgs, mask, patch_size, norm_pix)
