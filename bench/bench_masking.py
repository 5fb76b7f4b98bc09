"""Masked-token kernels vs the torch backend on MAE shapes: GB/s and fraction of copy bandwidth.

GB/s counts the minimal bytes of each op (every input byte the op needs read once, every output
byte written once; e.g. only the visible rows of x for gather_visible, only the removed patches of
pred and image for the loss), the same count for every backend. "% copy" divides by the bandwidth of
a large device-to-device copy (bytes read + written) measured in the same run. Forward times are
CUDA-graph medians (``triton.testing.do_bench_cudagraph``) with inputs rotated so the working set
exceeds L2; backward = (forward + backward) - forward, both captured the same way.

    python bench/bench_masking.py --out bench/results/masking-h100-DATE.json    # GPU table
    python bench/bench_masking.py --smoke                                       # tiny CPU config (interpreter)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

MODELS = {  # name: (patch, encoder width, decoder width)
    "ViT-B/16": (16, 768, 512),
    "ViT-L/14": (14, 1024, 512),
    "ViT-H/14": (14, 1280, 512),
}
RESOLUTIONS = (224, 476, 952)
BATCH = {224: 256, 476: 64, 952: 16}  # ~the same tokens per GPU at every resolution
MASK_RATIO = 0.75
OPS = ("patchify_gather", "gather_visible", "unshuffle_with_mask_token", "masked_patch_mse")
ROW_OPS = ("gather_visible", "unshuffle_with_mask_token")  # the ones with a CUDA backend
MIN_WORKING_SET = 256 << 20  # rotate input copies until each timed sweep touches this much


def resolution_for(res: int, patch: int) -> int:
    """476 and 952 are multiples of 14 but not 16: /16 models use the nearest multiple of 16."""
    return res if res % patch == 0 else patch * round(res / patch)


def make_case(model: str, res: int, batch: int, dtype, device) -> dict:
    p, d_enc, d_dec = MODELS[model]
    res = resolution_for(res, p)
    L = (res // p) ** 2
    K = int(L * (1 - MASK_RATIO))
    return dict(model=model, res=res, B=batch, L=L, K=K, p=p, D_enc=d_enc, D_dec=d_dec, P=3 * p * p,
                dtype=dtype, device=device)


def make_inputs(c: dict, op: str, gen: torch.Generator) -> dict:
    B, L, K, dev, dt = c["B"], c["L"], c["K"], c["device"], c["dtype"]
    noise = torch.rand(B, L, generator=gen, device=dev)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    keep = shuffle[:, :K].contiguous()

    def rnd(*s, grad=False):
        return (torch.randn(*s, generator=gen, device=dev) + 0.5).to(dt).requires_grad_(grad)

    if op == "patchify_gather":
        return dict(args=(rnd(B, 3, c["res"], c["res"]), keep, c["p"]), leaves=())
    if op == "gather_visible":
        x = rnd(B, L, c["D_enc"], grad=True)
        return dict(args=(x, keep, rnd(1, L, c["D_enc"])), leaves=(x,))
    if op == "unshuffle_with_mask_token":
        x, mt = rnd(B, 1 + K, c["D_dec"], grad=True), rnd(1, 1, c["D_dec"], grad=True)
        return dict(args=(x, restore, mt, rnd(1, 1 + L, c["D_dec"])), leaves=(x, mt))
    if op == "masked_patch_mse":
        pred = rnd(B, L, c["P"], grad=True)
        mask = torch.ones(B, L, device=dev).scatter_(1, keep, 0.0)
        return dict(args=(pred, rnd(B, 3, c["res"], c["res"]), mask, c["p"], True), leaves=(pred,))
    raise ValueError(op)


def minimal_bytes(c: dict, op: str) -> tuple[int, int]:
    """(forward bytes, backward bytes) as described in the module docstring."""
    e = c["dtype"].itemsize
    B, L, K, P = c["B"], c["L"], c["K"], c["P"]
    idx = 8
    if op == "patchify_gather":
        return 2 * B * K * P * e + B * K * idx, 0
    if op == "gather_visible":
        D = c["D_enc"]
        return 2 * B * K * D * e + L * D * e + B * K * idx, B * K * D * e + B * L * D * e + B * K * idx
    if op == "unshuffle_with_mask_token":
        D = c["D_dec"]
        fwd = B * (1 + K) * D * e + D * e + (1 + L) * D * e + B * L * idx + B * (1 + L) * D * e
        bwd = B * (1 + L) * D * e + B * (1 + K) * D * e + D * 4 + B * L * idx
        return fwd, bwd
    if op == "masked_patch_mse":
        removed = B * (L - K) * P * e
        return 2 * removed + B * L * 4, 2 * removed + B * L * 4 + B * L * P * e
    raise ValueError(op)


def call(op: str, backend: str, inp: dict):
    from mae_fast.ops import masking as M

    fn = getattr(M, op)
    kw = dict(backend=backend)
    if op != "masked_patch_mse":
        kw["check_ids"] = False  # the range check syncs with the host; inputs here are valid
    return fn(*inp["args"], **kw)


def fwd_bwd(op, backend, inp, grad_out):
    out = call(op, backend, inp)
    return torch.autograd.grad(out, inp["leaves"], grad_out)


def backward_op(op: str, backend: str, inp: dict, grad_out):
    """The kernel backends' backward custom op called directly (no autograd engine), or None."""
    if backend == "torch" or op == "patchify_gather":
        return None
    ops = torch.ops.mae_fast
    args = inp["args"]
    if op == "gather_visible":
        x, keep = args[0], args[1]
        return lambda: getattr(ops, f"{backend}_gather_visible_backward")(grad_out, keep, x.shape[1])
    if op == "unshuffle_with_mask_token":
        x_vis, restore = args[0], args[1]
        return lambda: getattr(ops, f"{backend}_unshuffle_backward")(grad_out, restore, x_vis.shape[1] - 1, True)
    if op == "masked_patch_mse":
        pred, imgs, mask, p, norm_pix = args
        flat = mask.reshape(-1).float().contiguous()
        return lambda: ops.triton_masked_patch_mse_backward(grad_out, pred, imgs, flat, p, norm_pix)
    return None


def time_gpu(fn) -> tuple[float, str]:
    """Median milliseconds: CUDA graph replay when capturable, else events around eager calls (which
    then include host overhead; the returned label says which, with the capture error)."""
    import triton.testing as tt

    try:
        return tt.do_bench_cudagraph(fn, rep=25, return_mode="median"), "cudagraph"
    except Exception as e:  # noqa: BLE001 - fall back to eager timing, say so in the JSON
        torch.cuda.synchronize()
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]
        return tt.do_bench(fn, warmup=25, rep=100, return_mode="median"), f"events (capture failed: {why})"


def time_cpu(fn, reps=3) -> tuple[float, str]:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * sorted(ts)[len(ts) // 2], "perf_counter"


def copy_bandwidth(device, nbytes=2 << 30) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms, _ = time_gpu(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def max_err(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(max_err(x, y) for x, y in zip(a, b))
    diff = (a.float() - b.float()).abs()
    return float("nan") if torch.isnan(diff).any() else float(diff.max())


def bench_case(c: dict, op: str, backends: list[str], gpu: bool) -> list[dict]:
    from mae_fast.ops.dispatch import describe

    gen = torch.Generator(device=c["device"]).manual_seed(0)
    fwd_b, bwd_b = minimal_bytes(c, op)
    n_sets = max(1, math.ceil(MIN_WORKING_SET / max(fwd_b, 1))) if gpu else 1
    sets = [make_inputs(c, op, gen) for _ in range(n_sets)]
    ref_out = call(op, "torch", sets[0])
    grad_outs = [torch.randn(ref_out.shape, generator=gen, device=ref_out.device).to(ref_out.dtype) for _ in sets]
    ref_grads = fwd_bwd(op, "torch", sets[0], grad_outs[0]) if sets[0]["leaves"] else None
    rows = []
    for be in backends:
        sel_args = sets[0]["args"] + ((True,) if op == "unshuffle_with_mask_token" else ())  # + cls_token
        why = describe(op, *sel_args)
        if be not in why:
            continue
        row = dict(op=op, model=c["model"], res=c["res"], batch=c["B"], L=c["L"], K=c["K"], backend=be,
                   dtype=str(c["dtype"]).replace("torch.", ""), fwd_bytes=fwd_b, bwd_bytes=bwd_b, input_sets=n_sets)
        try:
            if why[be]:
                row["skipped"] = "; ".join(why[be])
                rows.append(row)
                continue
            out = call(op, be, sets[0])
            row["max_abs_err_fwd"] = max_err(out, ref_out)
            if ref_grads is not None:
                row["max_abs_err_grad"] = max_err(fwd_bwd(op, be, sets[0], grad_outs[0]), ref_grads)
            timer = time_gpu if gpu else time_cpu
            counter = iter(range(1 << 30))

            def fwd():
                return call(op, be, sets[next(counter) % n_sets])

            def both():
                i = next(counter) % n_sets
                return fwd_bwd(op, be, sets[i], grad_outs[i])

            row["fwd_ms"], row["timer"] = timer(fwd)
            row["fwd_GBps"] = fwd_b / row["fwd_ms"] / 1e6
            if ref_grads is not None:
                both_ms, row["fwd_bwd_timer"] = timer(both)
                row["fwd_bwd_autograd_ms"] = both_ms
                row["bwd_ms"] = max(both_ms - row["fwd_ms"], 1e-6)
                row["bwd_source"] = "(fwd+bwd through autograd) - fwd"
                direct = [backward_op(op, be, s_, g_) for s_, g_ in zip(sets, grad_outs)]
                if direct[0] is not None:
                    # kernel backends: time the backward op itself (index prep + kernels), captured in
                    # the main thread; the autograd figure above is kept alongside
                    def bwd():
                        return direct[next(counter) % n_sets]()

                    row["bwd_ms"], row["bwd_timer"] = timer(bwd)
                    row["bwd_source"] = "backward custom op called directly"
                row["bwd_GBps"] = bwd_b / row["bwd_ms"] / 1e6
        except Exception as e:  # noqa: BLE001 - one failing backend must not lose the table
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
    return rows


def add_relative(rows: list[dict], copy_gbps: float) -> None:
    base = {(r["op"], r["model"], r["res"]): r for r in rows if r["backend"] == "torch" and "fwd_ms" in r}
    for r in rows:
        t = base.get((r["op"], r["model"], r["res"]))
        for d in ("fwd", "bwd"):
            if f"{d}_GBps" in r:
                r[f"{d}_frac_copy"] = r[f"{d}_GBps"] / copy_gbps if copy_gbps else None
                if t is not None and f"{d}_ms" in t:
                    r[f"{d}_speedup_vs_torch"] = t[f"{d}_ms"] / r[f"{d}_ms"]


def table(rows: list[dict], copy_gbps: float) -> str:
    head = ("| op | model | px | B | backend | fwd µs | fwd GB/s | fwd % copy | fwd × torch "
            "| bwd µs | bwd GB/s | bwd % copy | bwd × torch |")
    lines = [f"Copy bandwidth (read+write): {copy_gbps:.0f} GB/s", "", head, "|" + "---|" * 13]

    def f(r, k, fmt, scale=1.0):
        return format(r[k] * scale, fmt) if r.get(k) is not None else "-"

    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['op']} | {r['model']} | {r['res']} | {r['batch']} | {r['backend']} | "
                         + (r.get("error") or "skipped: " + r["skipped"])[:80] + " |" + " |" * 7)
            continue
        lines.append(
            f"| {r['op']} | {r['model']} | {r['res']} | {r['batch']} | {r['backend']} | {f(r, 'fwd_ms', '.1f', 1e3)} "
            f"| {f(r, 'fwd_GBps', '.0f')} | {f(r, 'fwd_frac_copy', '.0%')} | {f(r, 'fwd_speedup_vs_torch', '.2f')} "
            f"| {f(r, 'bwd_ms', '.1f', 1e3)} | {f(r, 'bwd_GBps', '.0f')} | {f(r, 'bwd_frac_copy', '.0%')} "
            f"| {f(r, 'bwd_speedup_vs_torch', '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the rows and the table as JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU (Triton interpreter)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--res", default="476,952,224", help="comma list (the >=476 px targets first)")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--backends", default="torch,triton,cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)

    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before mae_fast is imported: Triton decorates the kernels at import
    sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # installed package first: kernels/ maps to mae_fast.kernels only there
    device = torch.device("cuda" if gpu else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        cases = [dict(make_case("ViT-B/16", 32, 2, dtype, device), model="tiny (ViT-B/16 at 32 px)")]
        cases[0].update(D_enc=64, D_dec=32)
    else:
        cases = [make_case(m, int(r), BATCH[int(r)], dtype, device)
                 for r in args.res.split(",") for m in args.models.split(",")]
    copy_gbps = copy_bandwidth(device) if gpu else 0.0
    backends = args.backends.split(",")
    meta = dict(device=torch.cuda.get_device_name() if gpu else "cpu (Triton interpreter)",
                torch=torch.__version__, triton=__import__("triton").__version__, smoke=args.smoke,
                copy_GBps=copy_gbps, mask_ratio=MASK_RATIO, dtype=args.dtype, batch_by_res=BATCH,
                date=time.strftime("%Y-%m-%d"), bytes="minimal: inputs read once, outputs written once")
    rows = []
    for c in cases:
        for op in args.ops.split(","):
            wanted = [b for b in backends if b != "cuda" or op in ROW_OPS]
            rows += bench_case(c, op, wanted, gpu)
            if gpu:
                torch.cuda.empty_cache()
            print(f"done {op} {c['model']} {c['res']}px", file=sys.stderr, flush=True)
        add_relative(rows, copy_gbps)
        md = table(rows, copy_gbps)
        if args.out:  # after every case: a cut-short run still leaves its rows
            with open(args.out, "w") as fh:
                json.dump(dict(meta=meta, rows=rows, markdown=md), fh, indent=1)
    print(md)
    bad = [r for r in rows if "error" in r or (r.get("max_abs_err_fwd") != r.get("max_abs_err_fwd"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
