"""Stochastic depth that skips the dropped samples' work (DINOv2's ``drop_add_residual_stochastic_depth``).

timm's ``DropPath`` runs a block's residual branch on every sample and multiplies the dropped ones by zero (the
kept ones by ``1 / (1 - r)``). Here the branch runs only on the kept samples' rows and is added back into the
stream with ``index_add``, scaled by ``B / kept``: the same expectation, ``r`` of the branch's work saved.

How many samples are kept: ``B (1 - r)`` rounded down or up at random with the probability of its fraction
(DINOv2 truncates, which drops more than ``r`` of a small batch; a fixed rounding would never drop at small
``r``), so each sample is kept with probability ``1 - r`` exactly, as under timm's per-sample draws, and the
``B / kept`` scale keeps the expectation of every row at ``x + branch(x)`` whatever the count drawn.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["drop_add_residual", "efficient_drop_path", "drop_path_rates"]


def _kept_count(batch: int, rate: float) -> int:
    want = batch * (1.0 - rate)
    low = math.floor(want)
    frac = want - low
    if frac > 0 and torch._guards.detect_fake_mode() is not None:  # shapes only (memory estimates): the larger
        return max(1, min(batch, low + 1))
    extra = int(frac > 0 and float(torch.rand(())) < frac)
    return max(1, min(batch, low + extra))


def drop_add_residual(x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], rate: float,
                      training: bool = True) -> torch.Tensor:
    """``x + branch(x)`` with stochastic depth at ``rate`` over the first (sample) dimension: the branch runs on
    a random subset of the samples (``kept`` of ``B``) and is added to their rows times ``B / kept``; the other
    rows pass unchanged. Outside training, or at rate 0, the plain ``x + branch(x)``."""
    if not training or rate <= 0.0:
        return x + branch(x)
    if rate >= 1.0:
        return x
    B = x.shape[0]
    kept = _kept_count(B, rate)
    if kept == B:
        return x + branch(x)
    rows = torch.randperm(B, device=x.device)[:kept]
    residual = branch(x[rows])
    return torch.index_add(x, 0, rows, residual.to(x.dtype), alpha=B / kept)


class _EfficientDropPath:
    """Mixed into a timm ``Block``'s class: its forward with :func:`drop_add_residual` on both branches."""

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        if attn_mask is not None or is_causal:  # a mask per sample row would need the same subset: timm's path
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = drop_add_residual(x, lambda y: self.ls1(self.attn(self.norm1(y))), self.sample_drop_ratio1, self.training)
        return drop_add_residual(x, lambda y: self.ls2(self.mlp(self.norm2(y))), self.sample_drop_ratio2,
                                 self.training)


_CLASSES: dict[type, type] = {}


def _efficient_class(cls: type) -> type:
    if issubclass(cls, _EfficientDropPath):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"EfficientDropPath{cls.__name__}", (_EfficientDropPath, cls), {})
    return _CLASSES[cls]


def drop_path_rates(encoder: nn.Module) -> list[tuple[float, float]]:
    """Each block's (attention, MLP) stochastic-depth rates, from timm ``DropPath`` modules or efficient blocks."""
    out = []
    for blk in encoder.blocks:
        if isinstance(blk, _EfficientDropPath):
            out.append((blk.sample_drop_ratio1, blk.sample_drop_ratio2))
        else:
            out.append(tuple(float(getattr(getattr(blk, n, None), "drop_prob", 0.0) or 0.0)
                             for n in ("drop_path1", "drop_path2")))
    return out


def efficient_drop_path(encoder: nn.Module) -> nn.Module:
    """Turn the timm ``DropPath`` modules of ``encoder.blocks`` (timm ``Block``s) into :func:`drop_add_residual`
    at the same rates, in place: each block's class becomes a subclass with that forward (same parameters, same
    state dict, same output outside training). Returns ``encoder``."""
    for blk, (r1, r2) in zip(encoder.blocks, drop_path_rates(encoder)):
        missing = [n for n in ("norm1", "attn", "ls1", "norm2", "mlp", "ls2") if not hasattr(blk, n)]
        if missing:
            raise ValueError(f"efficient drop path needs timm Blocks (norm1, attn, ls1, norm2, mlp, ls2); "
                             f"{type(blk).__name__} lacks {', '.join(missing)}")
        blk.__class__ = _efficient_class(type(blk))
        blk.sample_drop_ratio1, blk.sample_drop_ratio2 = r1, r2
        blk.drop_path1, blk.drop_path2 = nn.Identity(), nn.Identity()
    return encoder
