"""Memory-lean LayerNorm -> Linear and LayerNorm -> MLP for pre-norm transformer blocks.

Eager PyTorch keeps, per block, the LayerNorm input *and* the low-precision copy of its output that the
next matmul saves, and for the MLP both the fc1 output and the GELU output (4x wide each). These ops keep
only the block input (plus per-row mean and rstd) and the fc1 pre-activation, and recompute the normalised
input and the GELU in backward: about a third less activation memory for two cheap elementwise passes.

``residual_layer_norm_mlp`` also takes the residual add in front of the MLP: under autocast the mid-block
stream ``x + branch`` is fp32 while the attention branch is bf16, so keeping ``branch`` (2 bytes/element)
and the block input ``x`` (already kept for the attention half) instead of ``x + branch`` (4 bytes) saves
half of that tensor, for one more add in backward.

Numerics follow eager autocast exactly in forward (LayerNorm in fp32, matmuls in the autocast dtype) and
match it to rounding in backward. Reference -> autograd.Function -> functional API.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mae_fast.kernels import layer_norm as triton_layer_norm

from .dispatch import NoBackendError, select_backend
from .layer_norm import compute_dtype as _compute_dtype

__all__ = ["layer_norm_linear", "layer_norm_mlp", "residual_layer_norm_mlp", "layer_norm_linear_reference",
           "layer_norm_mlp_reference", "residual_layer_norm_mlp_reference"]


# ---- references ---------------------------------------------------------------------------------

def layer_norm_linear_reference(x, norm_weight, norm_bias, eps, weight, bias):
    return F.linear(F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps), weight, bias)


def layer_norm_mlp_reference(x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    h = F.linear(F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps), fc1_weight, fc1_bias)
    return F.linear(F.gelu(h), fc2_weight, fc2_bias)


def residual_layer_norm_mlp_reference(x, branch, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight,
                                      fc2_bias):
    x_mid = x + branch
    return x_mid + layer_norm_mlp_reference(x_mid, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight,
                                            fc2_bias)


# ---- shared pieces ------------------------------------------------------------------------------

def _norm(x, norm_weight, norm_bias, eps, amp):
    """(normalised x, mean, rstd) in eager autocast's precision: fp32 under autocast, else x's dtype."""
    if amp is not None:
        x, norm_weight = x.float(), norm_weight.float() if norm_weight is not None else None
        norm_bias = norm_bias.float() if norm_bias is not None else None
    return torch.native_layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)


def _cast(t, amp):
    return t if amp is None or t is None else t.to(amp)


def _rows(t):
    return t.reshape(-1, t.shape[-1])


def _linear_grads(grad_out, inp, weight, bias, need_input=True):
    """(d input, d weight, d bias) of y = inp @ weight.T + bias, all 2-D, in the matmul dtype."""
    d_inp = grad_out @ weight if need_input else None
    d_w = grad_out.t() @ inp
    low = grad_out.dtype in (torch.float16, torch.bfloat16)
    d_b = grad_out.sum(0, dtype=torch.float32 if low else grad_out.dtype) if bias is not None else None
    return d_inp, d_w, d_b


def _norm_backward(d_normed, x, mean, rstd, norm_weight, norm_bias, amp):
    xin = x.float() if amp is not None else x
    w = norm_weight.float() if (amp is not None and norm_weight is not None) else norm_weight
    b = norm_bias.float() if (amp is not None and norm_bias is not None) else norm_bias
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        d_normed.to(xin.dtype), xin, x.shape[-1:], mean, rstd, w, b,
        [True, norm_weight is not None, norm_bias is not None])
    return dx.to(x.dtype), dw, db


def _param_grad(g, p):
    return None if g is None or p is None else g.to(p.dtype)


def _fused_norm_ops(x, branch, norm_weight, norm_bias, eps, amp):
    """The Triton (add +) LayerNorm kernels module when dispatch picks it for these inputs, else None."""
    out_dtype = amp or x.dtype
    op, args = ("layer_norm", (x, norm_weight, norm_bias, eps, out_dtype)) if branch is None else \
        ("add_layer_norm", (x, branch, norm_weight, norm_bias, eps, out_dtype))
    try:
        if select_backend(op, "auto", *args).name != "triton":
            return None
    except NoBackendError:
        return None
    return triton_layer_norm


def _fused_forward(fused, x, branch, norm_weight, norm_bias, eps, amp):
    """(normalised input in the matmul dtype, x_mid or None, mean, rstd) from the fused kernel."""
    y, x_mid, mean, rstd = fused.add_layer_norm_fwd_op(x, branch, norm_weight, norm_bias, eps, amp or x.dtype)
    return y, (x_mid if branch is not None else None), mean, rstd


def _fused_backward(fused, d_in, x_norm, mean, rstd, norm_weight, norm_bias, d_x_mid=None, branch_dtype=None):
    """(dx, dbranch, d norm weight, d norm bias) from the fused kernel (dbranch is dx in the stream's dtype)."""
    dx, dbranch, dw, db = fused.add_layer_norm_bwd_op(d_in, d_x_mid, x_norm, mean, rstd, norm_weight, norm_bias,
                                                      branch_dtype, norm_weight is not None, norm_bias is not None)
    if branch_dtype == x_norm.dtype:
        dbranch = dx  # same dtype as the stream: the op returns a placeholder (as its own autograd does)
    return dx, dbranch, (dw if norm_weight is not None else None), (db if norm_bias is not None else None)


# ---- LayerNorm -> Linear -------------------------------------------------------------------------

class _LayerNormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias):
        amp = _compute_dtype(x)
        fused = _fused_norm_ops(x, None, norm_weight, norm_bias, eps, amp)
        with torch.autocast(x.device.type, enabled=False):
            if fused is not None:
                normed_c, _, mean, rstd = _fused_forward(fused, x, None, norm_weight, norm_bias, eps, amp)
            else:
                normed, mean, rstd = _norm(x, norm_weight, norm_bias, eps, amp)
                normed_c = _cast(normed, amp)
            y = F.linear(normed_c, _cast(weight, amp), _cast(bias, amp))
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight, bias)
        ctx.eps, ctx.amp, ctx.fused = eps, amp, fused is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, mean, rstd, norm_weight, norm_bias, weight, bias = ctx.saved_tensors
        amp, fused = ctx.amp, triton_layer_norm if ctx.fused else None
        with torch.autocast(x.device.type, enabled=False):
            if fused is not None:  # recomputed, not stored
                inp = _rows(_fused_forward(fused, x, None, norm_weight, norm_bias, ctx.eps, amp)[0])
            else:
                inp = _rows(_cast(_norm(x, norm_weight, norm_bias, ctx.eps, amp)[0], amp))
            g = _rows(grad_y).to(inp.dtype)
            d_in, d_w, d_b = _linear_grads(g, inp, _cast(weight, amp), bias)
            if fused is not None:
                dx, _, dnw, dnb = _fused_backward(fused, d_in.reshape(x.shape), x, mean, rstd, norm_weight, norm_bias)
            else:
                dx, dnw, dnb = _norm_backward(d_in.reshape(x.shape), x, mean, rstd, norm_weight, norm_bias, amp)
        return dx, _param_grad(dnw, norm_weight), _param_grad(dnb, norm_bias), None, d_w.to(weight.dtype), \
            _param_grad(d_b, bias)


# ---- LayerNorm -> fc1 -> GELU -> fc2 -------------------------------------------------------------

def _mlp_forward(x, norm_weight, norm_bias, eps, w1, b1, w2, b2, amp, normed_c=None, stats=None):
    """(MLP output, mean, rstd, fc1 pre-activation): what the MLP Functions compute and keep. ``normed_c`` and
    ``stats`` (mean, rstd): the normalised input in the matmul dtype when the fused kernel already made it."""
    if normed_c is None:
        normed, mean, rstd = _norm(x, norm_weight, norm_bias, eps, amp)
        normed_c = _cast(normed, amp)
    else:
        mean, rstd = stats
    h = F.linear(normed_c, _cast(w1, amp), _cast(b1, amp))
    return F.linear(F.gelu(h), _cast(w2, amp), _cast(b2, amp)), mean, rstd, h


def _mlp_input_grads(grad_y, normed_c, h, w1, b1, w2, b2, amp):
    """(d normalised input, d w1, d b1, d w2, d b2), recomputing the GELU; ``normed_c`` as fc1 saw it."""
    h2 = _rows(h)
    g = _rows(grad_y).to(h2.dtype)
    d_act, d_w2, d_b2 = _linear_grads(g, F.gelu(h2), _cast(w2, amp), b2)
    d_h = torch.ops.aten.gelu_backward(d_act, h2)
    d_in, d_w1, d_b1 = _linear_grads(d_h, _rows(normed_c), _cast(w1, amp), b1)
    return d_in, d_w1.to(w1.dtype), _param_grad(d_b1, b1), d_w2.to(w2.dtype), _param_grad(d_b2, b2)


def _mlp_backward(grad_y, x, mean, rstd, h, norm_weight, norm_bias, eps, w1, b1, w2, b2, amp):
    """(dx, d norm weight, d norm bias, d w1, d b1, d w2, d b2), recomputing the normalised x and the GELU."""
    normed_c = _cast(_norm(x, norm_weight, norm_bias, eps, amp)[0], amp)
    d_in, *d_fc = _mlp_input_grads(grad_y, normed_c, h, w1, b1, w2, b2, amp)
    dx, dnw, dnb = _norm_backward(d_in.reshape(x.shape), x, mean, rstd, norm_weight, norm_bias, amp)
    return (dx, _param_grad(dnw, norm_weight), _param_grad(dnb, norm_bias), *d_fc)


class _LayerNormMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
        amp = _compute_dtype(x)
        fused = _fused_norm_ops(x, None, norm_weight, norm_bias, eps, amp)
        with torch.autocast(x.device.type, enabled=False):
            normed_c = stats = None
            if fused is not None:
                normed_c, _, *stats = _fused_forward(fused, x, None, norm_weight, norm_bias, eps, amp)
            y, mean, rstd, h = _mlp_forward(x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight,
                                            fc2_bias, amp, normed_c, stats)
        ctx.save_for_backward(x, mean, rstd, h, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        ctx.eps, ctx.amp, ctx.fused = eps, amp, fused is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, mean, rstd, h, nw, nb, *fc = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            if not ctx.fused:
                dx, dnw, dnb, *d_fc = _mlp_backward(grad_y, x, mean, rstd, h, nw, nb, ctx.eps, *fc, ctx.amp)
            else:
                fused = triton_layer_norm
                normed_c = _fused_forward(fused, x, None, nw, nb, ctx.eps, ctx.amp)[0]
                d_in, *d_fc = _mlp_input_grads(grad_y, normed_c, h, *fc, ctx.amp)
                dx, _, dnw, dnb = _fused_backward(fused, d_in.reshape(x.shape), x, mean, rstd, nw, nb)
        return dx, dnw, dnb, None, *d_fc


# ---- (x + branch) + LayerNorm -> fc1 -> GELU -> fc2 ---------------------------------------------

class _ResidualLayerNormMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, branch, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
        amp = _compute_dtype(x)
        fused = _fused_norm_ops(x, branch, norm_weight, norm_bias, eps, amp)
        with torch.autocast(x.device.type, enabled=False):
            normed_c = stats = None
            if fused is not None:  # the add, the LayerNorm and the cast in one pass
                normed_c, x_mid, *stats = _fused_forward(fused, x, branch, norm_weight, norm_bias, eps, amp)
            else:
                x_mid = x + branch  # type promotion as in eager: fp32 stream + bf16 branch -> fp32
            y, mean, rstd, h = _mlp_forward(x_mid, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight,
                                            fc2_bias, amp, normed_c, stats)
            out = x_mid + y
        # x_mid is not kept: x (kept anyway by the attention half of the block) and the narrower branch are
        ctx.save_for_backward(x, branch, mean, rstd, h, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
                              fc2_bias)
        ctx.eps, ctx.amp, ctx.y_dtype, ctx.fused = eps, amp, y.dtype, fused is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, branch, mean, rstd, h, nw, nb, *fc = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            if not ctx.fused:
                x_mid = x + branch  # the forward's add, so bit-identical
                dx_mlp, dnw, dnb, *d_fc = _mlp_backward(grad_out.to(ctx.y_dtype), x_mid, mean, rstd, h, nw, nb,
                                                        ctx.eps, *fc, ctx.amp)
                d_mid = grad_out.to(x_mid.dtype) + dx_mlp
                return d_mid.to(x.dtype), d_mid.to(branch.dtype), dnw, dnb, None, *d_fc
            fused = triton_layer_norm
            normed_c, x_mid, _, _ = _fused_forward(fused, x, branch, nw, nb, ctx.eps, ctx.amp)
            d_in, *d_fc = _mlp_input_grads(grad_out.to(ctx.y_dtype), normed_c, h, *fc, ctx.amp)
            # the LayerNorm backward and the residual path's gradient into x_mid, in one pass
            d_mid, d_branch, dnw, dnb = _fused_backward(fused, d_in.reshape(x.shape), x_mid, mean, rstd, nw, nb,
                                                        d_x_mid=grad_out, branch_dtype=branch.dtype)
        return d_mid.to(x.dtype), d_branch, dnw, dnb, None, *d_fc


# ---- functional API -----------------------------------------------------------------------------

def _check(op, x, norm, weight):
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"{op}: x must be a (..., D) tensor with at least 2 dims")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be floating point, got {x.dtype}")
    D = x.shape[-1]
    norm_weight = norm.weight
    if norm_weight is not None and tuple(norm_weight.shape) != (D,):
        raise ValueError(f"{op}: norm weight must be ({D},), got {tuple(norm_weight.shape)}")
    shape = tuple(getattr(norm, "normalized_shape", ()))
    if shape != (D,):  # a norm without weight has nothing else to check: it would normalise over x's last dim
        raise ValueError(f"{op}: norm normalises over {shape} but x's last dim is {D} "
                         f"(a LayerNorm over the last dim of x is needed)")
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"{op}: weight must be (out, {D}), got {tuple(weight.shape)}")


def layer_norm_linear(x, norm: torch.nn.LayerNorm, linear: torch.nn.Linear) -> torch.Tensor:
    """``linear(norm(x))`` keeping only ``x`` (and row statistics) for backward."""
    _check("layer_norm_linear", x, norm, linear.weight)
    return _LayerNormLinear.apply(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)


def _check_mlp(op, x, norm, fc1_weight, fc2_weight):
    _check(op, x, norm, fc1_weight)
    if fc2_weight.dim() != 2 or fc2_weight.shape[1] != fc1_weight.shape[0]:
        raise ValueError(f"{op}: fc2 takes {fc2_weight.shape[-1]} inputs but fc1 gives {fc1_weight.shape[0]}")


def layer_norm_mlp(x, norm: torch.nn.LayerNorm, fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> torch.Tensor:
    """``fc2(gelu(fc1(norm(x))))`` keeping only ``x`` and the fc1 output for backward."""
    _check_mlp("layer_norm_mlp", x, norm, fc1.weight, fc2.weight)
    return _LayerNormMlp.apply(x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias)


def residual_layer_norm_mlp(x, branch, norm: torch.nn.LayerNorm, fc1: torch.nn.Linear,
                            fc2: torch.nn.Linear) -> torch.Tensor:
    """``x_mid + fc2(gelu(fc1(norm(x_mid))))`` with ``x_mid = x + branch``, the second half of a pre-norm block.

    Keeps ``x`` and ``branch`` (in its own dtype) for backward instead of ``x_mid``, and the fc1 output."""
    op = "residual_layer_norm_mlp"
    _check_mlp(op, x, norm, fc1.weight, fc2.weight)
    if not isinstance(branch, torch.Tensor) or branch.shape != x.shape:
        got = tuple(branch.shape) if isinstance(branch, torch.Tensor) else type(branch).__name__
        raise ValueError(f"{op}: branch must have x's shape {tuple(x.shape)}, got {got}")
    if branch.device != x.device:
        raise ValueError(f"{op}: branch is on {branch.device} but x on {x.device}")
    if fc2.weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: fc2 must give {x.shape[-1]} outputs for the residual add, "
                         f"gives {fc2.weight.shape[0]}")
    return _ResidualLayerNormMlp.apply(x, branch, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias,
                                       fc2.weight, fc2.bias)
