"""What the machine can run: the one place that answers "is Triton usable", "are Triton kernels running in the
CPU interpreter" and "may this kernel run on this GPU".

Triton decides between compiled kernels and its CPU interpreter when a kernel is decorated, i.e. when
``mae_fast.kernels.*`` is imported, so ``TRITON_INTERPRET=1`` must be set before importing mae_fast
(tests/conftest.py does so on machines without a GPU). Kernels are never re-decorated: :func:`interpreter` is
true only while the variable is set *and* the kernels were built by the interpreter.
"""
from __future__ import annotations

import os

__all__ = ["TRITON_UNAVAILABLE", "KERNELS_INTERPRETED", "triton_unavailable", "interpreter", "unverified_allowed",
           "gpu_verified"]

try:
    import triton  # noqa: F401
except ImportError as _e:  # pragma: no cover - triton ships with torch on Linux
    TRITON_UNAVAILABLE: str | None = f"triton not installed ({_e})"
    KERNELS_INTERPRETED = False
else:
    TRITON_UNAVAILABLE = None
    from mae_fast.kernels import masking as _masking_kernels

    KERNELS_INTERPRETED = type(_masking_kernels.gather_or_fill_rows_kernel).__name__ == "InterpretedFunction"


def triton_unavailable() -> str | None:
    """Why Triton cannot be used at all (None: it can); a backend's ``available`` check."""
    return TRITON_UNAVAILABLE


def interpreter() -> bool:
    """Triton kernels run on CPU tensors, in the Triton interpreter (TRITON_INTERPRET=1, as when they were built)."""
    return KERNELS_INTERPRETED and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unverified_allowed() -> bool:
    """MAE_FAST_TRITON_UNVERIFIED=1: run Triton kernels on GPUs where they have not passed the GPU tests."""
    return os.environ.get("MAE_FAST_TRITON_UNVERIFIED", "0") == "1"


def gpu_verified(verified: bool) -> bool:
    """A Triton kernel takes CUDA tensors when it passed the GPU tests (``verified``) or the user opted in."""
    return verified or unverified_allowed()
