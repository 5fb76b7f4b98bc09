"""LARS, the optimizer of MAE's linear probe (layer-wise adaptive rate scaling, You et al. 2017).

Each weight matrix (ndim > 1) gets its step rescaled by ``trust_coefficient * ||w|| / ||g + wd * w||`` (1 when
either norm is 0); biases and other 1-D parameters take plain momentum SGD without weight decay.
"""
from __future__ import annotations

import torch

__all__ = ["LARS"]


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        for name, v in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum),
                        ("trust_coefficient", trust_coefficient)):
            if v < 0:
                raise ValueError(f"LARS: {name} must be >= 0, got {v}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:  # weights: decay and trust ratio; biases and norms: neither
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * w_norm / u_norm, torch.ones_like(w_norm))
                    update = update * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss
