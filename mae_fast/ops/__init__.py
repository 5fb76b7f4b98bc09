"""The op layer: every hot operation of the model, each dispatched to the best backend that can run it.

See :mod:`mae_fast.ops.dispatch` for how backends are chosen and how to force one.
"""
from .attention import attention, attention_reference
from .layer_norm import add_layer_norm, layer_norm
from .lean import layer_norm_linear, layer_norm_mlp, residual_layer_norm_mlp
from . import dispatch
from .dispatch import NoBackendError, backends_for, describe, select_backend
from .masking import (
    gather_visible,
    masked_patch_mse,
    patchify,
    patchify_gather,
    unpatchify,
    unshuffle_with_mask_token,
)

# The Triton/CUDA/third-party backends register now, not at the first call: that call may be inside
# torch.compile(fullgraph=True), which cannot trace an import.
dispatch.load_optional_backends()

OPS = ("attention", "gather_visible", "unshuffle_with_mask_token", "patchify_gather", "masked_patch_mse", "layer_norm",
       "add_layer_norm")

__all__ = [
    "OPS", "attention", "attention_reference", "gather_visible", "unshuffle_with_mask_token",
    "patchify_gather", "masked_patch_mse", "patchify", "unpatchify", "layer_norm_linear", "layer_norm_mlp",
    "residual_layer_norm_mlp", "layer_norm", "add_layer_norm",
    "NoBackendError", "backends_for", "describe", "select_backend",
]
