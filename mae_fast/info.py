"""``python -m mae_fast.info``: device, versions, and which backend of each op can run here."""
from __future__ import annotations

import importlib
import os
import platform
import sys

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
    if op == "hog":
        return (imgs, 16, 9, 8, 0)
    return (x[..., :768], imgs, torch.ones(1, 196, device=device), 16, True)


def _video_decoding() -> str:
    from .data.video import torchcodec_unusable_reason

    why_not = torchcodec_unusable_reason()
    pyav = _version("av")
    if why_not is None:
        return f"auto -> torchcodec {_version('torchcodec')} (PyAV {pyav})"
    return f"auto -> PyAV {pyav}; torchcodec no: {why_not}"


def _attention_tiling() -> str:
    """How the Triton attention that ``ops.attention`` launches tiles a head dim that is not a power of two."""
    from .kernels import flash_attention as fa

    tiles = " + ".join(str(t) for t in fa.head_dim_tiles(80) if t)
    others = ", ".join(t for t in fa.TILINGS if t != fa.DEFAULT_TILING)
    return (f"{fa.DEFAULT_TILING} (default): head dim 80 -> {tiles} columns; launch options: {others}; "
            f"tuned configs: {len(fa.tuned_table())}")


def _attention_prefs() -> str:
    """Where auto's attention measurements come from and which GPUs they cover."""
    import warnings

    from .ops.attention import PREFS_PATH, attention_prefs

    path = os.environ.get("MAE_FAST_ATTENTION_PREFS", str(PREFS_PATH))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said in the line itself
        devices = sorted(attention_prefs().get("devices", {}))
    if not devices:
        return f"none measured in {path}: auto ranks attention backends in their default order"
    return f"measured on {', '.join(devices)} ({path})"


def report() -> str:
    from . import __version__, ops

    lines = [f"mae_fast {__version__}", f"python {platform.python_version()} on {platform.machine()}"]
    for mod in ("torch", "triton", "timm", "xformers", "flash_attn"):
        lines.append(f"{mod:<12} {_version(mod)}")
    lines.append(f"{'video':<12} {_video_decoding()}")
    lines.append(f"{'fa tiling':<12} {_attention_tiling()}")
    lines.append(f"{'attn prefs':<12} {_attention_prefs()}")
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


def attention_shapes(model: str, img_size: int | None = None, mask_ratio: float = 0.75) -> dict:
    """The attention calls one training step of ``model`` makes: {"encoder"/"decoder": (tokens, heads,
    head_dim)}, read from the model built on the meta device (no weights are allocated)."""
    from .models.registry import create_model

    with torch.device("meta"):
        m = create_model(model, **({"img_size": img_size} if img_size is not None else {}))
    enc, dec = m.blocks[0].attn.num_heads, m.decoder_blocks[0].attn.num_heads
    return {"encoder": (max(1, m.num_visible(mask_ratio)) + 1, enc, m.embed_dim // enc),
            "decoder": (m.num_patches + 1, dec, m.decoder_embed_dim // dec)}


def model_report(model: str, img_size: int | None = None, mask_ratio: float = 0.75) -> str:
    """Which attention backend ``auto`` picks for this model's encoder and decoder, in training (with
    gradients) and inference, on every device here, with every backend's reasons."""
    from . import ops

    shapes = attention_shapes(model, img_size, mask_ratio)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    lines = [f"attention in {model}" + (f" at {img_size} px" if img_size else "") + f", mask ratio {mask_ratio}:"]
    for device in devices:
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
        for part, (n, h, d) in shapes.items():
            q = torch.randn(1, n, h, d, device=device, dtype=dt)
            picks = []
            for train in (True, False):
                t = q.detach().requires_grad_(train)
                try:
                    picks.append(("train" if train else "inference") + " -> "
                                 + ops.select_backend("attention", "auto", t, t, t, None, None, None).name)
                except ops.NoBackendError:
                    picks.append(("train" if train else "inference") + " -> none")
            lines.append(f"  {device} {part:<8} {n} tokens x {h} heads x head dim {d}: " + ", ".join(picks))
            for name, why in ops.describe("attention", q, q, q, None, None, None).items():
                lines.append(f"      {name:<10} {'ok' if not why else 'no: ' + '; '.join(why)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="mae-fast info", description=__doc__)
    ap.add_argument("--model", help="also show the attention backend auto picks for this registered model's "
                                    "encoder and decoder (e.g. mae_vit_huge_patch14)")
    ap.add_argument("--img-size", type=int, help="with --model: image size (default: the model's)")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    args = ap.parse_args(argv)
    models_part = None
    if args.model:  # checked before the device report, so a bad value is one line and exit code 2
        from .models.registry import list_models

        if args.model not in list_models():
            print(f"mae-fast info: unknown model {args.model!r}; available: {', '.join(list_models())}",
                  file=sys.stderr)
            return 2
        try:
            if not 0.0 <= args.mask_ratio < 1.0:
                raise ValueError(f"mask_ratio must be in [0, 1), got {args.mask_ratio}")
            models_part = model_report(args.model, args.img_size, args.mask_ratio)
        except ValueError as e:  # an img_size not a positive multiple of the patch
            print(f"mae-fast info: {args.model}: {e}", file=sys.stderr)
            return 2
    print(report())
    if models_part is not None:
        print("\n" + models_part)
    return 0


if __name__ == "__main__":
    sys.exit(main())
