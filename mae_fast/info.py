"""``python -m mae_fast.info``: device, versions, and which backend of each op can run here."""
from __future__ import annotations

import importlib
import platform

import torch


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "installed")
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable"
        return f"not available ({type(e).__name__})"


def _probe_inputs(op: str, device: torch.device):
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    if op == "attention":
        q = torch.randn(1, 197, 12, 64, generator=g).to(device, dt)
        return (q, q, q, None, None, None)
    if op in ("layer_norm", "add_layer_norm"):  # an fp32 residual stream, the branch and output in the matmul dtype
        x, w = torch.randn(1, 197, 768, generator=g).to(device), torch.ones(768, device=device)
        norm = (w, torch.zeros_like(w), 1e-6, dt)
        return (x, *norm) if op == "layer_norm" else (x, x.to(dt), *norm)
    ids = torch.randperm(196, generator=g)[None].to(device)
    x = torch.randn(1, 196, 768, generator=g).to(device, dt)
    if op == "gather_visible":
        return (x, ids[:, :49], None)
    if op == "unshuffle_with_mask_token":
        return (x[:, :50], torch.argsort(ids, 1), x[0, 0], None, True)
    imgs = torch.randn(1, 3, 224, 224, generator=g).to(device, dt)
    if op == "patchify_gather":
        return (imgs, ids[:, :49], 16)
    return (x[..., :768], imgs, torch.ones(1, 196, device=device), 16, True)


def _video_decoding() -> str:
    from .data.video import torchcodec_unusable_reason

    why_not = torchcodec_unusable_reason()
    pyav = _version("av")
    if why_not is None:
        return f"auto -> torchcodec {_version('torchcodec')} (PyAV {pyav})"
    return f"auto -> PyAV {pyav}; torchcodec no: {why_not}"


def report() -> str:
    from . import __version__, ops

    lines = [f"mae_fast {__version__}", f"python {platform.python_version()} on {platform.machine()}"]
    for mod in ("torch", "triton", "timm", "xformers", "flash_attn"):
        lines.append(f"{mod:<12} {_version(mod)}")
    lines.append(f"{'video':<12} {_video_decoding()}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        lines.append(f"cuda device  {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    else:
        lines.append("cuda device  none")
    for device in devices:
        lines.append(f"\nbackends on {device} (ViT-B/16 224px probe inputs):")
        for op in ops.OPS:
            args = _probe_inputs(op, device)
            reasons = ops.describe(op, *args)
            try:
                chosen = ops.select_backend(op, "auto", *args).name
            except ops.NoBackendError:
                chosen = "none"
            lines.append(f"  {op:<26} auto -> {chosen}")
            for name, why in reasons.items():
                lines.append(f"      {name:<10} {'ok' if not why else 'no: ' + '; '.join(why)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    main()
