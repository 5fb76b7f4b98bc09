"""Whole-step compilation in the trainer: when to compile (``compile: auto``) and how long the cold start took.

``compile: auto`` compiles on CUDA, where Inductor fuses what eager runs as separate kernels (LayerNorm, GELU,
bias and residual adds: see ``dispatch.INDUCTOR_FUSES``, which hands those ops to plain torch inside compiled
graphs) while attention and the masking kernels stay custom ops; on the CPU it stays eager (compiling costs more
than a demo-sized run gains). ``true``/``false`` force it either way.

Compilation happens lazily, in the first forward and backward: :class:`ColdStart` times that first step and says
it once, so the cold start is visible in the log and in ``result.json`` (``compile_cold_start_s``).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

__all__ = ["resolve_compile", "ColdStart"]


def resolve_compile(setting, device: torch.device) -> bool:
    """Whether the trainer compiles: ``auto`` on CUDA devices only, else the boolean given."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"compile must be auto, true or false, got {setting!r}")


class ColdStart:
    """Times the first (compiling) step; ``first_step`` reports it once and returns None afterwards."""

    def __init__(self, scope: str, say: Callable[[str], None]):
        self.scope, self.say = scope, say
        self.seconds: float | None = None
        self.t0 = time.perf_counter()

    def start(self) -> "ColdStart":
        self.t0 = time.perf_counter()
        return self

    def first_step(self) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.say(f"compile: the first step (compiling the {self.scope}) took {self.seconds:.1f} s")
        return None
