"""Finetuning step time with stochastic depth: timm's DropPath against the efficient form (kept samples only).

    python bench/bench_drop_path.py                                   # ViT-B/16, 224 px, batch 8, r = 0.3
    python bench/bench_drop_path.py --out bench/results/drop-path-cpu-<date>.json
    python bench/bench_drop_path.py --model vit_tiny_patch16_224 --batch 4 --repeats 1   # seconds

One training step (forward, cross-entropy, backward) of a timm ViT classifier, in these modes, interleaved
(A B C, B C A, ...: bench/_timing.py) so that load on a shared machine hits them alike, each timed ``--repeats``
times (median):

- ``none``: no stochastic depth;
- ``timm-linear`` / ``efficient-linear``: finetuning's rates (linear from 0 to r over the blocks, timm's rule);
- ``timm-uniform`` / ``efficient-uniform``: r in every block, where the saving should be about r of the blocks'
  work (timm computes every sample's branch whatever r is).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import compare, report  # noqa: E402


def build(model: str, img_size: int, rate: float, mode: str, uniform: bool):
    import timm

    from mae_fast.models.drop_path import efficient_drop_path

    torch.manual_seed(0)
    m = timm.create_model(model, pretrained=False, img_size=img_size, drop_path_rate=0.0 if mode == "none" else rate)
    if uniform and mode != "none":
        from timm.layers import DropPath

        for blk in m.blocks:
            blk.drop_path1, blk.drop_path2 = DropPath(rate), DropPath(rate)
    if mode == "efficient":
        efficient_drop_path(m)
    return m.train()


def step(m, x, y) -> float:
    t = time.perf_counter()
    loss = F.cross_entropy(m(x), y)
    loss.backward()
    m.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def run(model: str, img_size: int, batch: int, rate: float, repeats: int) -> dict:
    modes = {"none": ("none", False), "timm-linear": ("timm", False), "efficient-linear": ("efficient", False),
             "timm-uniform": ("timm", True), "efficient-uniform": ("efficient", True)}
    models = {k: build(model, img_size, rate, *v) for k, v in modes.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, generator=g)
    y = torch.randint(0, models["none"].num_classes, (batch,), generator=g)

    def stepper(m):
        seeds = itertools.count(100)

        def one():  # every mode's n-th step drops the same samples (the same seed)
            torch.manual_seed(next(seeds))
            return step(m, x, y)
        return one

    record, med = compare({k: stepper(m) for k, m in models.items()}, repeats)
    return {"model": model, "img_size": img_size, "batch": batch, "rate": rate, **record,
            "speedup_linear": round(med["timm-linear"] / med["efficient-linear"], 3),
            "speedup_uniform": round(med["timm-uniform"] / med["efficient-uniform"], 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rate", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default; 1 on a shared CPU)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    report(run(a.model, a.img_size, a.batch, a.rate, a.repeats), ("step_s", "speedup_linear", "speedup_uniform"), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
