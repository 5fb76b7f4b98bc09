"""Process-group setup and model wrapping: DDP for models that fit, FSDP2 (``fully_shard``) otherwise.

Launched by ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the run joins a
process group (NCCL on CUDA, gloo on the CPU); started plainly it is a world of one and nothing is
wrapped. State dicts are always taken whole through ``torch.distributed.checkpoint.state_dict`` so a
checkpoint from any layout loads into any other.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(request: str = "auto") -> torch.device:
    if request not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {request!r}")
    if request == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is available")
    if request == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def setup(device_request: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; choose this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = pick_device(device_request)
    if world <= 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if base.type == "cuda" else base
        return DistInfo(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if base.type == "cuda":
        index = cuda_index_for(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = base
    here = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
        here = True
    return DistInfo(rank, dist.get_world_size(), local_rank, dev, here)


def cuda_index_for(local_rank: int, visible: int) -> int:
    """This process's GPU: the one at LOCAL_RANK among those it sees (torchrun; SLURM tasks that see the
    node's GPUs), or the only one it sees (SLURM with one GPU bound per task)."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but this process sees {visible} GPUs: start one process per "
                           "GPU (torchrun --nproc_per_node, or SLURM tasks_per_node = gpus_per_node)")
    return local_rank


def teardown(info: DistInfo, finished: bool = True) -> None:
    """Leave the process group this process joined. After a finished run, first a barrier: gloo frees a
    collective's work on its worker thread, which takes the GIL to release the tensors, and if that happens
    while the interpreter shuts down the process aborts ("terminate called without an active exception").
    The barrier's wait releases the GIL, so the last collective's work is freed before exit. Not after an
    error: another rank may never reach the barrier."""
    if info.initialized_here and dist.is_initialized():
        if finished:
            barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device_request: str = "auto", finished_on: tuple = ()):
    """``setup`` on entry, ``teardown`` on exit: the run counts as finished when the body returns or raises one of
    ``finished_on`` (errors every rank raises at the same step, so all of them reach teardown's barrier)."""
    info = setup(device_request)
    finished = False
    try:
        yield info
        finished = True
    except finished_on:
        finished = True
        raise
    finally:
        teardown(info, finished)


def _fits_replicated(model: nn.Module, device: torch.device) -> bool:
    """DDP keeps params, grads and two AdamW moments in fp32 on every rank: 16 bytes/param, plus room."""
    if device.type != "cuda":
        return True
    need = 16 * sum(p.numel() for p in model.parameters())
    total = torch.cuda.get_device_properties(device).total_memory
    return need < 0.35 * total


def choose_strategy(request: str, model: nn.Module, info: DistInfo) -> str:
    if request not in ("auto", "ddp", "fsdp", "none"):
        raise ValueError(f"distributed must be auto, ddp, fsdp or none, got {request!r}")
    if not info.enabled:
        return "none"
    if request == "auto":
        return "ddp" if _fits_replicated(model, info.device) else "fsdp"
    return request


def shard_model(model: nn.Module, mp_dtype: torch.dtype | None = None, mesh=None) -> nn.Module:
    """FSDP2: shard each transformer block, then the root (which keeps embeddings, norms, heads); over
    ``mesh`` (default: every rank of the default process group)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 warns when a module returns a view (an in-place op on it would skip the hook that all-gathers
    # for backward). A Linear with bias on (B, N, D) input returns one (addmm, then a view), so every block and
    # the root would warn; nothing here modifies their outputs in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \((FSDPBlock|FSDPMaskedAutoencoderViT)\) "
                                              r"returned a view tensor")
    kwargs = {} if mesh is None else {"mesh": mesh}
    if mp_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32)
    for name in ("blocks", "decoder_blocks"):
        for block in getattr(model, name, []):
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def wrap_model(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """Returns the module to call for training. With FSDP2 it is ``model`` itself (sharded in place)."""
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp":
        return shard_model(model)
    raise ValueError(f"unknown strategy {strategy!r}")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def full_state_dicts(model: nn.Module, optimizer=None) -> tuple[dict, dict | None]:
    """Whole (unsharded, CPU) model and optimizer state dicts; complete on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
    opts = StateDictOptions(full_state_dict=True, cpu_offload=sharded)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=opts), None
    msd, osd = get_state_dict(model, optimizer, options=opts)
    if not sharded:
        msd = {k: v.detach().cpu().clone() for k, v in msd.items()}
        osd = _to_cpu(osd)
    return msd, osd


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _plain_name(key: str) -> str:
    """A state-dict key without the prefixes DDP and torch.compile add."""
    return ".".join(part for part in key.split(".") if part not in ("module", "_orig_mod"))


def load_full_state_dicts(model: nn.Module, optimizer, model_state: dict, optim_state: dict | None) -> None:
    """Load whole state dicts (every rank passes them) into a plain, DDP-wrapped or sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    # strict=True in torch 2.14 refuses unexpected keys but loads a dict that lacks some without a word
    wanted = {_plain_name(k) for k in model.state_dict(keep_vars=True)}
    missing = sorted(wanted - {_plain_name(k) for k in model_state})
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise RuntimeError(f"the state dict lacks {len(missing)} of the model's entries: {', '.join(missing[:5])}{more}")
    opts = StateDictOptions(full_state_dict=True, strict=True)
    if optimizer is None or optim_state is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, model_state, options=opts)
        return
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=opts)
