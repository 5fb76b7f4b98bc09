"""CUDA backend ("cuda") for gather_visible and unshuffle_with_mask_token; sources in ``mae_fast.csrc``.

The extension is never needed to install mae_fast. It is compiled with
``torch.utils.cpp_extension.load`` the first time the backend is asked whether it can run (so a
failed build becomes a reason, not a crash) and cached in ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``); later processes load the cached build in about a second.

Environment:
  ``MAE_FAST_BUILD_CUDA=1``  build when this module is imported (ahead of time); with
                             ``python -m mae_fast.ops._cuda_masking`` it builds and reports where.
  ``MAE_FAST_BUILD_CUDA=0``  never build: the backend only reports itself unavailable.
  ``TORCH_CUDA_ARCH_LIST``   the architectures to build for (default: those of the visible GPUs);
                             set it (e.g. "9.0") to build on a machine without a GPU.

``auto`` ranks this backend after ``triton`` until the extension is loaded in the process (so nothing
is compiled unless asked for, or Triton is missing) and ahead of it afterwards (see ``_priority``);
always ahead of ``torch`` on CUDA tensors. Choose it explicitly with ``backend="cuda"``.
"""
import os
import shutil
import sys
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _masking_common as common
from .dispatch import Backend, register_backend

EXTENSION_NAME = "mae_fast_masking_cuda"
_module = None
_build_error: Optional[str] = None


def _cuda_home() -> Optional[str]:
    """A CUDA toolkit root holding both bin/nvcc and include/cuda_runtime.h (torch's own guess can be a
    directory that only has an nvcc wrapper, e.g. /usr/local)."""
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  "/usr/local/cuda", os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and \
                os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def build(verbose: bool = False):
    """Compile (or load the cached build of) the extension and return the module; raises on failure."""
    global _module
    if _module is not None:
        return _module
    from torch.utils import cpp_extension

    from mae_fast.csrc import SOURCE_DIR

    home = _cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolkit found (nvcc and cuda_runtime.h; set CUDA_HOME)")
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    sources = [str(SOURCE_DIR / "masking.cpp"), str(SOURCE_DIR / "masking.cu")]
    _module = cpp_extension.load(
        name=EXTENSION_NAME,
        sources=sources,
        extra_include_paths=[str(SOURCE_DIR)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"],
        verbose=verbose,
    )
    return _module


def _build_switch() -> str:
    return os.environ.get("MAE_FAST_BUILD_CUDA", "").strip()


def _available() -> Optional[str]:
    """Why the backend cannot run at all (None: it can). Builds the extension on first call."""
    global _build_error
    if _module is not None:
        return None
    if not torch.cuda.is_available():
        return "CUDA not available"
    if _build_switch() == "0":
        return "CUDA extension build disabled by MAE_FAST_BUILD_CUDA=0"
    if _build_error is not None:
        return _build_error
    try:
        build()
    except Exception as e:  # compiler missing or source broken: report, don't crash auto dispatch
        _build_error = f"CUDA extension failed to build: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}"
        return _build_error
    return None


# ---- primitives (see _masking_common) -------------------------------------------------------------

def gather_rows(src: Tensor, idx: Tensor, fill: Optional[Tensor], pos: Optional[Tensor], pos_by_src: bool,
                bad: Optional[Tensor], head: int, limit: int, upper: int) -> Tensor:
    ext = build()
    # the kernel takes fill/pos in the dtype of src: the rounding the torch reference applies too
    fill = None if fill is None else fill.to(src.dtype).contiguous()
    pos = None if pos is None else pos.to(src.dtype).contiguous()
    return ext.gather_or_fill_rows(src, idx, fill, pos, pos_by_src, bad, head, limit, upper)


def masked_row_sum(grad: Tensor, idx: Tensor, head: int, K: int) -> Tensor:
    return build().masked_row_partial_sums(grad, idx, head, K).sum(0)  # fixed-order reduction


gather_visible_op, unshuffle_op = common.define_row_ops("cuda", gather_rows, masked_row_sum)


def _gather_visible(x, ids_keep, pos):
    return common.call_gather_visible(gather_visible_op, x, ids_keep, pos)


def _unshuffle(x_vis, ids_restore, mask_token, pos, cls_token):
    return common.call_unshuffle(unshuffle_op, x_vis, ids_restore, mask_token, pos, cls_token)


def _gather_visible_reasons(x, ids_keep, pos):
    return common.gather_visible_reasons(x, ids_keep, pos, cuda_only=True)


def _unshuffle_reasons(x_vis, ids_restore, mask_token, pos, cls_token):
    return common.unshuffle_reasons(x_vis, ids_restore, mask_token, pos, cls_token, cuda_only=True)


def _priority(*args, **kwargs) -> float:
    """On CUDA tensors: ahead of triton (10) once the extension is loaded in this process (built ahead
    of time, or asked for by name): on an H100 its forward reached 92-95% of copy bandwidth for
    unshuffle_with_mask_token where Triton reached 76-78%
    (bench/results/masking-h100-2026-11-22.json). Until then after triton, so ``auto`` never starts
    a compile by itself while Triton can run. Always behind torch (1000) on CPU tensors."""
    if not common.on_cuda(*args):
        return 3000.0
    return 5.0 if _module is not None else 50.0


register_backend(Backend(op="gather_visible", name="cuda", fn=_gather_visible, reasons=_gather_visible_reasons,
                         priority=_priority, available=_available))
register_backend(Backend(op="unshuffle_with_mask_token", name="cuda", fn=_unshuffle, reasons=_unshuffle_reasons,
                         priority=_priority, available=_available))

if _build_switch() == "1" and __name__ != "__main__":
    try:  # ahead of time, at import; a failure must not break dispatch for the other backends
        build()
    except Exception as e:  # noqa: BLE001
        _build_error = f"CUDA extension failed to build: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}"
        warnings.warn(f"mae_fast: MAE_FAST_BUILD_CUDA=1 but {_build_error}")


def main() -> int:
    """``MAE_FAST_BUILD_CUDA=1 python -m mae_fast.ops._cuda_masking``: build now, print where."""
    try:
        ext = build(verbose="-v" in sys.argv)
    except Exception as e:
        print(f"mae_fast: CUDA extension build failed: {e}", file=sys.stderr)
        return 1
    print(f"mae_fast: CUDA extension {EXTENSION_NAME} ready: {ext.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
