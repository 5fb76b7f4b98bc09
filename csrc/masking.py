"""The masked-token CUDA extension (``masking.cu``, ``masking.cpp``): its build, and its ``torch.library`` custom ops
for gather_visible and unshuffle_with_mask_token (the ``cuda`` backend of :mod:`mae_fast.ops.masking`).

The extension is never needed to install mae_fast. It is compiled with ``torch.utils.cpp_extension.load`` the
first time the backend is asked whether it can run (so a failed build becomes a reason, not a crash) and cached
in ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later processes load the cached build in
about a second.

Environment:
  ``MAE_FAST_BUILD_CUDA=1``  build when this module is imported (ahead of time); with
                             ``python -m mae_fast.csrc.masking`` it builds and reports where.
  ``MAE_FAST_BUILD_CUDA=0``  never build: the backend only reports itself unavailable.
  ``TORCH_CUDA_ARCH_LIST``   the architectures to build for (default: those of the visible GPUs);
                             set it (e.g. "9.0") to build on a machine without a GPU.

The custom ops share their autograd (inverse permutations instead of atomics) with the Triton ones in
:mod:`mae_fast.kernels.masking`; only the two row primitives differ.
"""
import functools
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from mae_fast.kernels import masking as triton_masking

if __name__ == "__main__":  # ``python -m``: run the imported module's main, whose custom ops are registered once
    from mae_fast.csrc.masking import main as _main

    sys.exit(_main())

EXTENSION_NAME = "mae_fast_masking_cuda"
SOURCE_DIR = Path(__file__).resolve().parent
_module = None
_build_error: Optional[str] = None


# ---- build --------------------------------------------------------------------------------------

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

    home = _cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolkit found (nvcc and cuda_runtime.h; set CUDA_HOME)")
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    _module = cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(SOURCE_DIR / "masking.cpp"), str(SOURCE_DIR / "masking.cu")],
        extra_include_paths=[str(SOURCE_DIR)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"],
        verbose=verbose,
    )
    return _module


def loaded() -> bool:
    """The extension is loaded in this process (built ahead of time, or asked for by name)."""
    return _module is not None


def _build_switch() -> str:
    return os.environ.get("MAE_FAST_BUILD_CUDA", "").strip()


def unavailable() -> Optional[str]:
    """Why the extension cannot run at all (None: it can). Builds it on the first call."""
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


# ---- launchers (same semantics as mae_fast.kernels.masking.gather_rows / masked_row_sum) ------------

def gather_rows(src: Tensor, idx: Tensor, fill: Optional[Tensor], pos: Optional[Tensor], pos_by_src: bool,
                bad: Optional[Tensor], head: int, limit: int, upper: int) -> Tensor:
    ext = build()
    # the kernel takes fill/pos in the dtype of src: the rounding the torch reference applies too
    fill = None if fill is None else fill.to(src.dtype).contiguous()
    pos = None if pos is None else pos.to(src.dtype).contiguous()
    return ext.gather_or_fill_rows(src, idx, fill, pos, pos_by_src, bad, head, limit, upper)


def masked_row_sum(grad: Tensor, idx: Tensor, head: int, K: int) -> Tensor:
    return build().masked_row_partial_sums(grad, idx, head, K).sum(0)  # fixed-order reduction


# ---- custom ops ---------------------------------------------------------------------------------

@torch.library.custom_op("mae_fast::cuda_gather_visible", mutates_args=())
def gather_visible_op(x: Tensor, ids_keep: Tensor, pos: Optional[Tensor]) -> Tensor:
    L = x.shape[1]
    return gather_rows(x, ids_keep, None, pos, True, None, 0, L, L)


@torch.library.custom_op("mae_fast::cuda_gather_visible_backward", mutates_args=())
def gather_visible_backward_op(grad: Tensor, ids_keep: Tensor, L: int) -> Tensor:
    K = ids_keep.shape[1]
    inv, bad = triton_masking.inverse_positions(ids_keep, L, L, sentinel=K)  # sentinel K -> zero row
    return gather_rows(grad, inv, None, None, False, bad, 0, K, K + 1)


@torch.library.custom_op("mae_fast::cuda_unshuffle", mutates_args=())
def unshuffle_op(x_vis: Tensor, ids_restore: Tensor, mask_token: Tensor, pos: Optional[Tensor],
                 cls_token: bool) -> Tensor:
    head = int(cls_token)
    K, L = x_vis.shape[1] - head, ids_restore.shape[1]
    return gather_rows(x_vis, ids_restore, mask_token, pos, False, None, head, K, L)


@torch.library.custom_op("mae_fast::cuda_unshuffle_backward", mutates_args=())
def unshuffle_backward_op(grad: Tensor, ids_restore: Tensor, K: int, cls_token: bool) -> tuple[Tensor, Tensor]:
    head = int(cls_token)
    L = ids_restore.shape[1]
    inv, bad = triton_masking.inverse_positions(ids_restore, K, K, sentinel=L)  # sentinel L -> zero row
    return gather_rows(grad, inv, None, None, False, bad, head, L, L + 1), masked_row_sum(grad, ids_restore, head, K)


gather_visible_op.register_fake(triton_masking.gather_visible_fake)
gather_visible_backward_op.register_fake(triton_masking.gather_visible_backward_fake)
unshuffle_op.register_fake(triton_masking.unshuffle_fake)
unshuffle_backward_op.register_fake(triton_masking.unshuffle_backward_fake)
gather_visible_op.register_autograd(functools.partial(triton_masking.gather_visible_backward,
                                                      gather_visible_backward_op),
                                    setup_context=triton_masking.gather_visible_setup)
unshuffle_op.register_autograd(functools.partial(triton_masking.unshuffle_backward, unshuffle_backward_op),
                               setup_context=triton_masking.unshuffle_setup)


# ---- entry points (the ``cuda`` backends of mae_fast.ops.masking) --------------------------------

def gather_visible(x, ids_keep, pos):
    return gather_visible_op(x.contiguous(), ids_keep.contiguous(), None if pos is None else pos.contiguous())


def unshuffle_with_mask_token(x_vis, ids_restore, mask_token, pos, cls_token):
    D = x_vis.shape[-1]
    return unshuffle_op(x_vis.contiguous(), ids_restore.contiguous(), mask_token.reshape(D).contiguous(),
                        None if pos is None else pos.contiguous(), bool(cls_token))


if _build_switch() == "1":
    try:  # ahead of time, at import; a failure must not break dispatch for the other backends
        build()
    except Exception as e:  # noqa: BLE001
        _build_error = f"CUDA extension failed to build: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}"
        warnings.warn(f"mae_fast: MAE_FAST_BUILD_CUDA=1 but {_build_error}")


def main() -> int:
    """``MAE_FAST_BUILD_CUDA=1 python -m mae_fast.csrc.masking``: build now, print where."""
    try:
        ext = build(verbose="-v" in sys.argv)
    except Exception as e:
        print(f"mae_fast: CUDA extension build failed: {e}", file=sys.stderr)
        return 1
    print(f"mae_fast: CUDA extension {EXTENSION_NAME} ready: {ext.__file__}")
    return 0
