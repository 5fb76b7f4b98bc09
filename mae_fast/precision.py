"""FP8 matmuls for training (``precision: fp8``) through torchao's float8 training, bf16 autocast elsewhere.

``torchao.float8.convert_to_float8_training`` swaps chosen ``nn.Linear`` modules for ``Float8Linear``: each
forward casts its input and weight to float8 e4m3 (and, in backward, the output gradient to e5m2) with dynamic
per-tensor scales and runs the three matmuls through ``torch._scaled_mm``. The casts cost a pass over each operand,
so only linears wide enough for the faster matmul to pay for them are converted: :func:`fp8_filter` takes the
encoder blocks' ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` whose narrower side is at least
``min_width`` (``fp8_min_width``, default 1024: ViT-L and ViT-H, not ViT-B's 768 nor the decoder's 512), with both
sides multiples of 16 (what ``_scaled_mm`` accepts). The patch embedding, the decoder and the prediction head stay
bf16.

Only linears called as modules run in FP8: the lean-activations path (``lean_activations``) and the encoder's last
block under ``first_query`` read the weights directly and stay bf16 there (same loss, less gain).

``emulate=True`` (torchao's emulation: the same casts, matmuls in high precision) runs on CPUs and on GPUs without
FP8 tensor cores (compute capability below 8.9); :func:`fp8_emulated` decides it per device.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["FP8_TARGETS", "fp8_unavailable", "check_min_width", "fp8_filter", "fp8_linear_names", "convert_fp8",
           "fp8_emulated", "FP8_MIN_TORCHAO", "FP8_PEAK_FLOPS", "fp8_peak_flops", "fp8_summary"]

FP8_MIN_TORCHAO = (0, 15)  # torchao.float8's convert_to_float8_training / Float8LinearConfig(emulate=...) API
# encoder blocks only ("decoder_blocks.N." does not match): fully-qualified names as in MaskedAutoencoderViT
FP8_TARGETS = re.compile(r"^blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))$")


def fp8_unavailable() -> str | None:
    """Why ``precision: fp8`` cannot run here (None: it can): torchao missing or too old for this torch."""
    try:
        import torchao
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # noqa: F401
    except Exception as e:  # noqa: BLE001 - an ImportError, or a torchao built for another torch failing to load
        return f"precision fp8 needs torchao (pip install \"mae_fast[fp8]\"): {type(e).__name__}: {e}"
    version = tuple(int(p) for p in re.findall(r"\d+", torchao.__version__)[:2])
    if version < FP8_MIN_TORCHAO:
        return f"precision fp8 needs torchao >= {'.'.join(map(str, FP8_MIN_TORCHAO))}, found {torchao.__version__}"
    return None


def check_min_width(min_width) -> str | None:
    """Why ``min_width`` is no valid ``fp8_min_width`` (None: it is)."""
    if isinstance(min_width, bool) or not isinstance(min_width, int) or min_width < 16:
        return f"fp8_min_width must be an integer >= 16, got {min_width!r}"
    return None


def fp8_filter(min_width: int) -> Callable[[nn.Module, str], bool]:
    """``module_filter_fn`` for ``convert_to_float8_training``: the encoder's qkv/proj/fc1/fc2 linears whose
    narrower side is at least ``min_width`` and whose sides are multiples of 16."""
    if (why := check_min_width(min_width)) is not None:
        raise ValueError(why)

    def wanted(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or not FP8_TARGETS.match(fqn):
            return False
        n_in, n_out = module.in_features, module.out_features
        return min(n_in, n_out) >= min_width and n_in % 16 == 0 and n_out % 16 == 0
    return wanted


def fp8_linear_names(model: nn.Module, min_width: int) -> list[str]:
    """The linears :func:`convert_fp8` would convert (no torchao needed)."""
    wanted = fp8_filter(min_width)
    return [name for name, m in model.named_modules() if wanted(m, name)]


def fp8_emulated(device: torch.device | str) -> bool:
    """torchao's emulation (high-precision matmuls) where the device has no FP8 tensor cores (CPU, < sm_89)."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) < (8, 9)


def convert_fp8(model: nn.Module, min_width: int, *, emulate: bool | None = None,
                device: torch.device | str | None = None) -> list[str]:
    """Swap the wide encoder linears of ``model`` for torchao ``Float8Linear`` in place; returns their names.

    ``emulate``: torchao's emulation (None: :func:`fp8_emulated` of ``device``, or of the model's parameters).
    Convert before wrapping the model for DDP/FSDP and before building the optimizer (the parameters stay the
    same tensors, so an optimizer built earlier would also do)."""
    why = fp8_unavailable()
    if why:
        raise RuntimeError(why)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if emulate is None:
        param = next(model.parameters(), None)
        emulate = fp8_emulated(device if device is not None else (param.device if param is not None else "cpu"))
    names = fp8_linear_names(model, min_width)
    if names:
        convert_to_float8_training(model, module_filter_fn=fp8_filter(min_width),
                                   config=Float8LinearConfig(emulate=emulate))
    return names


# dense FP8 tensor-core peaks (datasheets, no sparsity): reported beside MFU, which stays against the bf16 peak
FP8_PEAK_FLOPS = (("H200", 1979e12), ("H100", 1979e12), ("GH200", 1979e12), ("B200", 4500e12))


def fp8_peak_flops(device: torch.device | str) -> float | None:
    """The FP8 dense peak FLOP/s of a known GPU (None: CPU or unknown)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((val for key, val in FP8_PEAK_FLOPS if key in name), None)


def fp8_summary(model: nn.Module, device: torch.device | str) -> str:
    """One line for the run's header: what runs in FP8 and the FP8 peak beside the bf16 one MFU is measured by."""
    names = getattr(model, "fp8_linears", None)
    if names is None:
        return ""
    peak = fp8_peak_flops(device)
    rate = f"FP8 peak {peak / 1e12:.0f} TFLOP/s" if peak else "no FP8 peak known for this device"
    mode = "emulated" if fp8_emulated(device) else "tensor cores"
    return (f"fp8 ({mode}): {len(names)} encoder linears as Float8Linear; {rate} (MFU stays against the bf16 "
            f"peak)")
