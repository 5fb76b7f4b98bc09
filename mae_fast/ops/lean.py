"""Memory-lean LayerNorm -> Linear and LayerNorm -> MLP for pre-norm transformer blocks.

Eager PyTorch keeps, per block, the LayerNorm input *and* the low-precision copy of its output that the
next matmul saves, and for the MLP both the fc1 output and the GELU output (4x wide each). These ops keep
only the block input (plus per-row mean and rstd) and the fc1 pre-activation, and recompute the normalised
input and the GELU in backward: about a third less activation memory for two cheap elementwise passes.

Numerics follow eager autocast exactly in forward (LayerNorm in fp32, matmuls in the autocast dtype) and
match it to rounding in backward. Reference -> autograd.Function -> functional API.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["layer_norm_linear", "layer_norm_mlp", "layer_norm_linear_reference", "layer_norm_mlp_reference"]


# ---- references ---------------------------------------------------------------------------------

def layer_norm_linear_reference(x, norm_weight, norm_bias, eps, weight, bias):
    return F.linear(F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps), weight, bias)


def layer_norm_mlp_reference(x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    h = F.linear(F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps), fc1_weight, fc1_bias)
    return F.linear(F.gelu(h), fc2_weight, fc2_bias)


# ---- shared pieces ------------------------------------------------------------------------------

def _compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype when autocast is on for x's device (what eager matmuls would use), else None."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


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


# ---- LayerNorm -> Linear -------------------------------------------------------------------------

class _LayerNormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias):
        amp = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            normed, mean, rstd = _norm(x, norm_weight, norm_bias, eps, amp)
            y = F.linear(_cast(normed, amp), _cast(weight, amp), _cast(bias, amp))
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight, bias)
        ctx.eps, ctx.amp = eps, amp
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, mean, rstd, norm_weight, norm_bias, weight, bias = ctx.saved_tensors
        amp = ctx.amp
        with torch.autocast(x.device.type, enabled=False):
            normed = _norm(x, norm_weight, norm_bias, ctx.eps, amp)[0]  # recomputed, not stored
            inp = _rows(_cast(normed, amp))
            g = _rows(grad_y).to(inp.dtype)
            d_in, d_w, d_b = _linear_grads(g, inp, _cast(weight, amp), bias)
            dx, dnw, dnb = _norm_backward(d_in.reshape(x.shape), x, mean, rstd, norm_weight, norm_bias, amp)
        return dx, _param_grad(dnw, norm_weight), _param_grad(dnb, norm_bias), None, d_w.to(weight.dtype), \
            _param_grad(d_b, bias)


# ---- LayerNorm -> fc1 -> GELU -> fc2 -------------------------------------------------------------

class _LayerNormMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
        amp = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            normed, mean, rstd = _norm(x, norm_weight, norm_bias, eps, amp)
            h = F.linear(_cast(normed, amp), _cast(fc1_weight, amp), _cast(fc1_bias, amp))
            y = F.linear(F.gelu(h), _cast(fc2_weight, amp), _cast(fc2_bias, amp))
        ctx.save_for_backward(x, mean, rstd, h, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        ctx.eps, ctx.amp = eps, amp
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, mean, rstd, h, norm_weight, norm_bias, w1, b1, w2, b2 = ctx.saved_tensors
        amp = ctx.amp
        with torch.autocast(x.device.type, enabled=False):
            h2 = _rows(h)
            g = _rows(grad_y).to(h2.dtype)
            d_act, d_w2, d_b2 = _linear_grads(g, F.gelu(h2), _cast(w2, amp), b2)  # GELU recomputed
            d_h = torch.ops.aten.gelu_backward(d_act, h2)
            normed = _rows(_cast(_norm(x, norm_weight, norm_bias, ctx.eps, amp)[0], amp))  # recomputed
            d_in, d_w1, d_b1 = _linear_grads(d_h, normed, _cast(w1, amp), b1)
            dx, dnw, dnb = _norm_backward(d_in.reshape(x.shape), x, mean, rstd, norm_weight, norm_bias, amp)
        return (dx, _param_grad(dnw, norm_weight), _param_grad(dnb, norm_bias), None,
                d_w1.to(w1.dtype), _param_grad(d_b1, b1), d_w2.to(w2.dtype), _param_grad(d_b2, b2))


# ---- functional API -----------------------------------------------------------------------------

def _check(op, x, norm_weight, weight):
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"{op}: x must be a (..., D) tensor with at least 2 dims")
    D = x.shape[-1]
    if norm_weight is not None and tuple(norm_weight.shape) != (D,):
        raise ValueError(f"{op}: norm weight must be ({D},), got {tuple(norm_weight.shape)}")
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"{op}: weight must be (out, {D}), got {tuple(weight.shape)}")


def layer_norm_linear(x, norm: torch.nn.LayerNorm, linear: torch.nn.Linear) -> torch.Tensor:
    """``linear(norm(x))`` keeping only ``x`` (and row statistics) for backward."""
    _check("layer_norm_linear", x, norm.weight, linear.weight)
    return _LayerNormLinear.apply(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)


def layer_norm_mlp(x, norm: torch.nn.LayerNorm, fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> torch.Tensor:
    """``fc2(gelu(fc1(norm(x))))`` keeping only ``x`` and the fc1 output for backward."""
    _check("layer_norm_mlp", x, norm.weight, fc1.weight)
    if fc2.weight.shape[1] != fc1.weight.shape[0]:
        raise ValueError(f"layer_norm_mlp: fc2 takes {fc2.weight.shape[1]} inputs but fc1 gives {fc1.weight.shape[0]}")
    return _LayerNormMlp.apply(x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
