"""The op layer: every hot operation of the model, each dispatched to the best backend that can run it.

One file per op (``attention``, ``masking``, ``layer_norm``, ``lean``, ``hog``): the public function, its input
checks, the plain-torch reference and the backends it registers; their kernels live in ``mae_fast.kernels``
(Triton) and ``mae_fast.csrc`` (CUDA). See :mod:`mae_fast.ops.dispatch` for how backends are chosen and how to
force one.
"""
from . import dispatch, platform
from .attention import attention, attention_reference
from .dispatch import PRIORITY, NoBackendError, auto_order, backends_for, describe, select_backend, use_backend
from .hog import hog
from .layer_norm import add_layer_norm, layer_norm
from .lean import layer_norm_linear, layer_norm_mlp, residual_layer_norm_mlp
from .masking import (
    gather_visible,
    masked_patch_mse,
    patchify,
    patchify_gather,
    unpatchify,
    unshuffle_with_mask_token,
)

OPS = ("attention", "gather_visible", "unshuffle_with_mask_token", "patchify_gather", "masked_patch_mse", "layer_norm",
       "add_layer_norm", "hog")

__all__ = [
    "OPS", "PRIORITY", "attention", "attention_reference", "gather_visible", "unshuffle_with_mask_token",
    "patchify_gather", "masked_patch_mse", "patchify", "unpatchify", "layer_norm_linear", "layer_norm_mlp",
    "residual_layer_norm_mlp", "layer_norm", "add_layer_norm", "hog",
    "NoBackendError", "auto_order", "backends_for", "describe", "select_backend", "use_backend",
]
