"""Step time of a packed mixed-resolution batch against padding every image to the largest size.

    python bench/bench_packing.py                                   # 3 x 224 px + 1 x 476 px, a ViT-Ti/14 MAE
    python bench/bench_packing.py --out bench/results/packing-cpu-<date>.json
    python bench/bench_packing.py --sizes 32 32 32 64 --model mae_vit_demo_patch8 --repeats 1   # seconds

One training step (forward with ``mask_ratio``, backward) of the same images three ways, interleaved (A B C, B C A,
...: bench/_timing.py) so that load on a shared machine hits them alike, each timed ``--repeats`` times (median):

- ``packed``: ``forward_packed``, every image at its own size, the visible tokens of all in one sequence;
- ``padded``: every image zero-padded to the largest size, one dense batch (what a fixed-size batch costs);
- ``per_image``: each image through the model alone (the loss weighted as the packed one), for reference.

Before timing, the packed loss must equal the per-image losses weighted by their removed patches.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mae_fast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import compare, report  # noqa: E402

# a narrow decoder keeps the CPU run short; the encoder is the registered model's
DECODER = dict(decoder_embed_dim=192, decoder_depth=2, decoder_num_heads=3)


def build(model: str, sizes: list[int], small_decoder: bool):
    torch.manual_seed(0)
    kw = dict(img_size=max(sizes), **(DECODER if small_decoder else {}))
    return mae_fast.create_model(model, **kw).train()


def images_and_noise(model, sizes: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p = model.patch_size
    imgs = [torch.randn(3, s, s, generator=g) for s in sizes]
    noise = [torch.rand(1, (s // p) ** 2, generator=g) for s in sizes]
    return imgs, noise


def packed_step(model, imgs, noise, r):
    loss = model.forward_packed(imgs, r, noise).loss
    loss.backward()
    return loss.detach()


def padded_step(model, imgs, noise, r):
    big = max(im.shape[-1] for im in imgs)
    batch = torch.stack([F.pad(im, (0, big - im.shape[-1], 0, big - im.shape[-2])) for im in imgs])
    L = (big // model.patch_size) ** 2
    g = torch.Generator().manual_seed(1)
    loss = model(batch, r, torch.rand(len(imgs), L, generator=g), masked_only=True).loss
    loss.backward()
    return loss.detach()


def per_image_step(model, imgs, noise, r):
    removed = [nz.shape[1] - model.num_visible(r, nz.shape[1]) for nz in noise]
    total = sum(removed)
    out = 0.0
    for im, nz, m in zip(imgs, noise, removed):
        loss = model(im[None], r, nz, masked_only=True).loss * (m / total)
        loss.backward()
        out += loss.detach()
    return out


def timed(fn, model, *args) -> float:
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    fn(model, *args)
    return time.perf_counter() - t


def run(model_name: str, sizes: list[int], mask_ratio: float, repeats: int, small_decoder: bool) -> dict:
    model = build(model_name, sizes, small_decoder)
    imgs, noise = images_and_noise(model, sizes)
    with torch.no_grad():
        a = model.forward_packed(imgs, mask_ratio, noise).loss
    removed = [nz.shape[1] - model.num_visible(mask_ratio, nz.shape[1]) for nz in noise]
    with torch.no_grad():
        ref = sum(model(im[None], mask_ratio, nz).loss * m for im, nz, m in zip(imgs, noise, removed)) / sum(removed)
    if not torch.allclose(a, ref, rtol=1e-4, atol=1e-5):
        raise SystemExit(f"packed loss {float(a)} != per-image {float(ref)}")
    arms = {"packed": packed_step, "padded": padded_step, "per_image": per_image_step}
    record, med = compare({k: (lambda fn=fn: timed(fn, model, imgs, noise, mask_ratio)) for k, fn in arms.items()},
                          repeats)
    p = model.patch_size
    tokens = {"packed": sum((s // p) ** 2 for s in sizes), "padded": len(sizes) * (max(sizes) // p) ** 2}
    return {"model": model_name, "decoder": DECODER if small_decoder else "registered", "sizes": sizes,
            "mask_ratio": mask_ratio, "patches": tokens, **record,
            "speedup_packed_vs_padded": round(med["padded"] / med["packed"], 3),
            "speedup_packed_vs_per_image": round(med["per_image"] / med["packed"], 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mae_vit_tiny_patch14")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 224, 224, 476])
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--registered-decoder", action="store_true", help="the model's own decoder (slower)")
    ap.add_argument("--threads", type=int, default=0,
                    help="intra-op threads (0: torch's default); 1 on a shared, oversubscribed CPU, where threads "
                         "that wait on each other at every op swamp the many small ops of the packed path")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    report(run(a.model, a.sizes, a.mask_ratio, a.repeats, not a.registered_decoder),
           ("patches", "step_s", "speedup_packed_vs_padded", "speedup_packed_vs_per_image"), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
