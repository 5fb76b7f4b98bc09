"""Where one training step spends its time: kernel time by category for mae_fast and the reference.

    python bench/profile_step.py --model mae_vit_huge_patch14 --img-size 476 --batch 24
    python bench/profile_step.py --smoke          # CPU, ViT-S/16 at 112 px

Profiles a few steps (after warm-up) of each implementation with torch.profiler and sums device time
(CUDA kernels, or CPU operator self time on the CPU) into categories: matmul, attention, norm, elementwise,
copy/cast, optimizer, other. The table shows ms per step and the difference to the reference, which is
what to attack next; ``--trace`` also writes a Chrome trace per implementation.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402

# first match wins; patterns cover CUDA kernel names and aten operator names
CATEGORIES = [
    ("optimizer", r"adam|multi_tensor|foreach|_fused_"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|sdp)|softmax"),
    ("matmul", r"gemm|sm90_xmma|cutlass|nvjet|\bmm\b|aten::mm|addmm|aten::bmm|matmul|linear|conv"),
    ("norm", r"layer_norm|layernorm|native_layer_norm"),
    ("copy/cast", r"copy|cast|_to_copy|convert|transpose|cat|gather|index|embedding|clone|contiguous"),
    ("elementwise", r"elementwise|vectorized|gelu|add|mul|div|sqrt|sub|pow|exp|where|fill|reduce|sum|mean|var"),
]


def categorize(name: str) -> str:
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def profile_impl(stepper, steps: int, device: torch.device, trace: str | None = None) -> dict:
    for _ in range(2):
        stepper()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            stepper()
    if trace:
        prof.export_chrome_trace(trace)
    per_cat, per_name = defaultdict(float), defaultdict(float)
    for ev in prof.key_averages():
        if device.type == "cuda":
            us = getattr(ev, "self_device_time_total", 0.0) or 0.0
        else:
            us = ev.self_cpu_time_total if ev.key.startswith("aten::") else 0.0
        if us <= 0:
            continue
        per_cat[categorize(ev.key)] += us / steps / 1e3
        per_name[ev.key] += us / steps / 1e3
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:15]
    return dict(ms_per_step=dict(per_cat), total_ms=sum(per_cat.values()), top=top)


PROFILED = ("mae_fast", "mae_fast_lean", "reference", "hf_vitmae")  # what e2e.build_models builds


def run(name: str, img_size: int, batch: int, device: torch.device, steps: int, impls, trace_dir=None) -> dict:
    models = e2e.build_models(name, img_size, device, with_hf="hf_vitmae" in impls)
    e2e.check_same_loss(models, device)
    out = {}
    for kind in impls:
        st = e2e.Stepper(kind, models[kind], batch, device, False)
        trace = str(Path(trace_dir) / f"trace-{kind}.json") if trace_dir else None
        out[kind] = profile_impl(st, steps, device, trace)
        del st
    return dict(model=name, img_size=img_size, batch=batch, device=str(device) if device.type == "cpu"
                else torch.cuda.get_device_name(), torch=torch.__version__, date=datetime.date.today().isoformat(),
                results=out)


def table(res: dict) -> str:
    impls = list(res["results"])
    cats = [c for c, _ in CATEGORIES] + ["other"]
    head = "| category | " + " | ".join(f"{k} ms" for k in impls) + " | mae_fast - reference |"
    lines = [head, "|" + "---|" * (len(impls) + 2)]
    for c in cats + ["total"]:
        vals = [res["results"][k]["total_ms"] if c == "total" else res["results"][k]["ms_per_step"].get(c, 0.0)
                for k in impls]
        diff = ""
        if "mae_fast" in impls and "reference" in impls:
            diff = f"{vals[impls.index('mae_fast')] - vals[impls.index('reference')]:+.2f}"
        lines.append(f"| {c} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {diff} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, ViT-S/16 at 112 px, batch 8")
    ap.add_argument("--model", default="mae_vit_huge_patch14")
    ap.add_argument("--img-size", type=int, default=476)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--impls", default="mae_fast,mae_fast_lean,reference")
    ap.add_argument("--trace-dir", default=None, help="write a Chrome trace per implementation here")
    ap.add_argument("--out", default=None, help="write JSON here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.model, args.img_size, args.batch = "mae_vit_small_patch16", 112, 8
    impls = [s for s in args.impls.split(",") if s]
    unknown = sorted(set(impls) - set(PROFILED))
    if unknown or not impls:  # before the models are built and checked, which takes a while at ViT-H
        ap.error(f"--impls {','.join(unknown) or args.impls!r}: unknown (known: {', '.join(PROFILED)})")
    res = run(args.model, args.img_size, args.batch, device, args.steps, impls, args.trace_dir)
    print(f"{res['model']} {res['img_size']} px, batch {res['batch']}, {res['device']}: device ms per step\n")
    print(table(res))
    for k, r in res["results"].items():
        print(f"\n{k}: top kernels/ops (ms per step)")
        for n, ms in r["top"][:10]:
            print(f"  {ms:8.2f}  {n[:110]}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
