"""Activation memory, measured on any device: the bytes autograd keeps from a forward for its backward."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["saved_tensor_bytes"]


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.nn.Module] = ()) -> tuple[object, int]:
    """Run ``fn()`` and return (its result, bytes of the unique storages saved for backward).

    Storages are counted once however many views of them are saved; parameters of the ``exclude`` modules
    are left out (they are resident anyway), but copies of them, such as autocast's low-precision weights,
    count. Recomputation inside ``torch.utils.checkpoint`` regions is not seen by this hook.
    """
    params = {p.untyped_storage().data_ptr() for m in exclude for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())
