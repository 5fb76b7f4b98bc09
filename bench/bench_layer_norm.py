"""Fused residual add + LayerNorm (Triton) vs the eager sequence (add, fp32 LayerNorm, cast) on ViT shapes.

Both run what a pre-norm block under bf16 autocast runs: an fp32 residual stream ``x``, a bf16 branch, the
norm's output in bf16 for the next matmul. ``add_layer_norm``: ``x_mid = x + branch; y = norm(x_mid)``;
``layer_norm``: ``y = norm(x)``. Backward gets a bf16 ``dy`` and, for ``add_layer_norm``, an fp32 gradient
into ``x_mid`` from the stream's later use (the block's second residual add).

Bytes: each implementation is charged what its own sequence of ops reads and writes, every op reading its
inputs once and writing its outputs once (per element, N = rows x D; row statistics and parameters extra):

    add_layer_norm fwd   eager: add 4+2 -> 4, LayerNorm 4 -> 4, cast 4 -> 2        = 24 B
                         fused: x 4 + branch 2 -> x_mid 4 + y 2                    = 12 B
    add_layer_norm bwd   eager: cast-back 2 -> 4, LN bwd 4+4 -> 4, grad sum 4+4 -> 4,
                                branch cast 4 -> 2                                 = 36 B
                         fused: dy 2 + d_x_mid 4 + x_mid 4 -> dx 4 + dbranch 2     = 16 B (+ partial rows)
    layer_norm fwd       eager: LayerNorm 4 -> 4, cast 4 -> 2 = 14 B;  fused: 4 -> 2 = 6 B
    layer_norm bwd       eager: cast-back 2 -> 4, LN bwd 4+4 -> 4 = 18 B; fused: dy 2 + x 4 -> dx 4 = 10 B

``--inductor`` adds ``torch.compile`` (inductor) of the eager sequence, charged the fused byte counts (what a
complete fusion would move). Each row reports both counts, the time (median of CUDA-event timings after warm-up, L2 flushed between runs:
``triton.testing.do_bench``), the achieved bandwidth on its own bytes (``GBps``) and the eager byte count
over the time (``eager_equiv_GBps``: what the unfused sequence would need to match it), and the GPU time alone
(``fwd_kernel_ms``, ``fwd_bwd_kernel_ms``: kernels summed from ``torch.profiler``): far below the timed
time means the host (dispatch and launches) is the bottleneck, not the kernels. Backward time is
(forward + backward) - forward. The Triton backend is experimental on GPUs until verified; this script
sets ``MAE_FAST_TRITON_UNVERIFIED=1`` for itself and records correctness against the eager result.

    python bench/bench_layer_norm.py --out bench/results/layer-norm-h100-DATE.json    # GPU
    python bench/bench_layer_norm.py --smoke                                           # CPU: correctness only
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

SHAPES = {  # name: (rows, D)
    "ViT-H/14 476px enc": (24 * 290, 1280),
    "ViT-H/14 476px dec": (24 * 1157, 512),
    "ViT-B/16 224px enc": (256 * 50, 768),
}
SMOKE_SHAPES = {"tiny": (2 * 9, 40), "tiny odd": (7, 100)}
OPS = ("add_layer_norm", "layer_norm")
ELEMENT_BYTES = {  # (op, direction, impl): bytes per element, as in the module docstring
    ("add_layer_norm", "fwd", "eager"): 24, ("add_layer_norm", "fwd", "fused"): 12,
    ("add_layer_norm", "bwd", "eager"): 36, ("add_layer_norm", "bwd", "fused"): 16,
    ("layer_norm", "fwd", "eager"): 14, ("layer_norm", "fwd", "fused"): 6,
    ("layer_norm", "bwd", "eager"): 18, ("layer_norm", "bwd", "fused"): 10,
}
IMPLS = {"eager": "torch", "fused": "triton"}  # implementation: the ops backend it runs


def traffic(op: str, direction: str, impl: str, rows: int, D: int, partial_rows: int = 0) -> int:
    """Bytes read + written (see the module docstring): elements, row statistics (mean and rstd, fp32; the
    eager backward reads them too), parameters (fp32 weight and bias read, their grads written), and for the
    fused backward its partial dweight/dbias rows (written, then read by the reduction)."""
    n = rows * D
    stats = 8 * rows
    params = 8 * D if direction == "fwd" else 16 * D
    partials = 2 * 2 * 4 * partial_rows * D if (direction == "bwd" and impl == "fused") else 0
    per_element = ELEMENT_BYTES[(op, direction, "fused" if impl == "inductor" else impl)]
    return per_element * n + stats + params + partials


def make_inputs(rows: int, D: int, device, gen: torch.Generator) -> dict:
    from torch import nn

    def rnd(*shape, dtype=torch.float32, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale + shift).to(dtype)

    norm = nn.LayerNorm(D, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.copy_(rnd(D, scale=0.5, shift=1.0))
        norm.bias.copy_(rnd(D, scale=0.3))
    return dict(norm=norm, x=rnd(rows, D, scale=2.0, shift=0.3), branch=rnd(rows, D, dtype=torch.bfloat16),
                dy=rnd(rows, D, dtype=torch.bfloat16), d_x_mid=rnd(rows, D, scale=0.5))


def forward(op: str, backend: str, inp: dict, x=None, branch=None):
    from mae_fast import ops

    x = inp["x"] if x is None else x
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        if op == "layer_norm":
            return (ops.layer_norm(x, inp["norm"], backend=backend),)
        x_mid, y = ops.add_layer_norm(x, inp["branch"] if branch is None else branch, inp["norm"], backend=backend)
        return y, x_mid


def forward_backward(op: str, backend: str, inp: dict, fwd=None):
    """Gradients (x, [branch], weight, bias) of the op's outputs given dy (and d_x_mid); ``fwd(x, branch)``
    replaces :func:`forward` (a compiled one)."""
    x = inp["x"].detach().requires_grad_()
    leaves = [x]
    branch = None
    if op == "add_layer_norm":
        branch = inp["branch"].detach().requires_grad_()
        leaves.append(branch)
    norm = inp["norm"]
    leaves += [norm.weight, norm.bias]
    outs = fwd(x, branch) if fwd is not None else forward(op, backend, inp, x, branch)
    grads = [inp["dy"], inp["d_x_mid"]][:len(outs)]
    return torch.autograd.grad(outs, leaves, grads)


def max_err(a, b) -> float:
    errs = [(s.float() - t.float()).abs().max().item() if s.numel() else 0.0 for s, t in zip(a, b)]
    return float("nan") if any(e != e for e in errs) else max(errs)


def rel_err(a, b) -> float:
    """Largest per-tensor error relative to the tensor's largest eager value."""
    out = 0.0
    for s, t in zip(a, b):
        if s.numel():
            out = max(out, ((s.float() - t.float()).abs().max() / t.float().abs().max().clamp_min(1e-12)).item())
    return out


def time_ms(fn) -> float:
    import triton.testing as tt

    return tt.do_bench(fn, warmup=25, rep=100, return_mode="median")


def device_time_ms(events, iters: int) -> float:
    """Summed GPU time of the profiled kernels (and memsets/copies) per iteration: what the device spent,
    without the host gaps between launches that ``time_ms`` includes when the host is the bottleneck."""
    us = sum(e.device_time for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    return us / iters / 1e3


def kernel_ms(fn, iters: int = 20) -> float:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return device_time_ms(prof.events(), iters)


def partial_rows(rows: int, D: int, device) -> int:
    from mae_fast.kernels import layer_norm as k

    block_r = k._tile(D, backward=True)[0]
    return k._backward_programs(rows, block_r, device, None)[0]


def bench_shape(name: str, rows: int, D: int, ops_: list[str], device, timed: bool,
                inductor: bool = False) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    inp = make_inputs(rows, D, device, gen)
    n_part = partial_rows(rows, D, device)
    out = []
    for op in ops_:
        ref_fwd = forward(op, "torch", inp)
        ref_grads = forward_backward(op, "torch", inp)
        impls = dict(IMPLS, **({"inductor": "torch"} if inductor else {}))
        for impl, backend in impls.items():
            compiled = None
            if impl == "inductor":
                compiled = torch.compile(lambda x, branch, op=op: forward(op, "torch", inp, x, branch))
            row = dict(op=op, shape=name, rows=rows, D=D, impl=impl, backend=backend,
                       stream="float32", branch="bfloat16" if op == "add_layer_norm" else None, y="bfloat16",
                       fwd_bytes=traffic(op, "fwd", impl, rows, D),
                       bwd_bytes=traffic(op, "bwd", impl, rows, D, n_part),
                       eager_fwd_bytes=traffic(op, "fwd", "eager", rows, D),
                       eager_bwd_bytes=traffic(op, "bwd", "eager", rows, D))
            try:
                def fwd(op=op, backend=backend, compiled=compiled):
                    return compiled(inp["x"], inp["branch"]) if compiled else forward(op, backend, inp)

                def both(op=op, backend=backend, compiled=compiled):
                    return forward_backward(op, backend, inp, compiled)

                got, grads = fwd(), both()
                row["max_abs_err_fwd"] = max_err(got, ref_fwd)
                row["max_rel_err_fwd"] = rel_err(got, ref_fwd)
                row["max_rel_err_grad"] = rel_err(grads, ref_grads)
                if timed:
                    fwd_ms, both_ms = time_ms(fwd), time_ms(both)
                    bwd_ms = max(both_ms - fwd_ms, 1e-6)
                    row.update(fwd_ms=fwd_ms, fwd_bwd_ms=both_ms, bwd_ms=bwd_ms,
                               fwd_GBps=row["fwd_bytes"] / fwd_ms / 1e6, bwd_GBps=row["bwd_bytes"] / bwd_ms / 1e6,
                               fwd_eager_equiv_GBps=row["eager_fwd_bytes"] / fwd_ms / 1e6,
                               bwd_eager_equiv_GBps=row["eager_bwd_bytes"] / bwd_ms / 1e6)
                    try:  # GPU time alone: far below the timed ms means launches (host) bound the op
                        row.update(fwd_kernel_ms=kernel_ms(fwd), fwd_bwd_kernel_ms=kernel_ms(both))
                        row["host_bound_fwd"] = row["fwd_kernel_ms"] < 0.5 * fwd_ms
                    except Exception as e:  # noqa: BLE001 - a profiler failure must not lose the timings
                        row["kernel_ms_error"] = f"{type(e).__name__}: {e}"[:300]
            except Exception as e:  # noqa: BLE001 - one failing implementation must not lose the table
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            out.append(row)
    base = {r["op"]: r for r in out if r["impl"] == "eager" and "fwd_ms" in r}
    for r in out:
        b = base.get(r["op"])
        if b is not None and "fwd_ms" in r:
            r["fwd_speedup_vs_eager"] = b["fwd_ms"] / r["fwd_ms"]
            r["bwd_speedup_vs_eager"] = b["bwd_ms"] / r["bwd_ms"]
            r["fwd_bwd_speedup_vs_eager"] = b["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return out


def table(rows: list[dict], timed: bool) -> str:
    if not timed:
        head = "| op | shape | impl | fwd bytes | bwd bytes | fwd rel err | grad rel err |"
        lines = [head, "|" + "---|" * 7]
        for r in rows:
            lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {r['fwd_bytes']} | {r['bwd_bytes']} | "
                         + (r.get("error", "")[:80] or f"{r['max_rel_err_fwd']:.2e} | {r['max_rel_err_grad']:.2e}")
                         + " |")
        return "\n".join(lines)
    head = ("| op | shape | impl | fwd MB | fwd µs | fwd GB/s | fwd × eager | bwd MB | bwd µs | bwd GB/s "
            "| bwd × eager | fwd+bwd × eager | GPU µs fwd, fwd+bwd |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {r['error'][:100]} |" + " |" * 8)
            continue
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['impl']} | {r['fwd_bytes'] / 1e6:.1f} | {r['fwd_ms'] * 1e3:.1f} "
            f"| {r['fwd_GBps']:.0f} | {r.get('fwd_speedup_vs_eager', float('nan')):.2f} | {r['bwd_bytes'] / 1e6:.1f} "
            f"| {r['bwd_ms'] * 1e3:.1f} | {r['bwd_GBps']:.0f} | {r.get('bwd_speedup_vs_eager', float('nan')):.2f} "
            f"| {r.get('fwd_bwd_speedup_vs_eager', float('nan')):.2f} "
            f"| {r.get('fwd_kernel_ms', float('nan')) * 1e3:.1f}, {r.get('fwd_bwd_kernel_ms', float('nan')) * 1e3:.1f} |")
    return "\n".join(lines)


# bf16 output: a couple of ulps of the largest value; gradients through bf16 dy: looser
SMOKE_TOLERANCE = dict(fwd=2 * 2 ** -8, grad=2e-2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the rows and the table as JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter), no timing")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list from {list(SHAPES)}")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--inductor", action="store_true", help="also torch.compile (inductor) of the eager sequence")
    args = ap.parse_args(argv)

    gpu = torch.cuda.is_available() and not args.smoke
    env = {"MAE_FAST_TRITON_UNVERIFIED": "1"}  # the point is to measure the experimental kernel
    if not gpu:
        env["TRITON_INTERPRET"] = "1"  # before mae_fast is imported: Triton decorates the kernels at import
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return _run(args, gpu)
    finally:  # main() is also called in-process by the smoke test: leave the environment as found
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run(args, gpu: bool) -> int:
    from mae_fast.ops.layer_norm import GPU_VERIFIED

    device = torch.device("cuda" if gpu else "cpu")
    shapes = SMOKE_SHAPES if not gpu else {k: SHAPES[k] for k in args.shapes.split(",")}
    meta = dict(device=torch.cuda.get_device_name() if gpu else "cpu (Triton interpreter; correctness only)",
                torch=torch.__version__, triton=__import__("triton").__version__, smoke=not gpu,
                gpu_verified=GPU_VERIFIED, date=time.strftime("%Y-%m-%d"),
                timer="triton.testing.do_bench median (CUDA events, L2 flushed), warmup 25 ms, rep 100 ms",
                bytes="per implementation: each of its ops reads its inputs once and writes its outputs once",
                element_bytes={f"{k[0]} {k[1]} {k[2]}": v for k, v in ELEMENT_BYTES.items()})
    rows = []
    for name, (n_rows, D) in shapes.items():
        rows += bench_shape(name, n_rows, D, args.ops.split(","), device, timed=gpu, inductor=args.inductor)
        if gpu:
            torch.cuda.empty_cache()
        print(f"done {name}", file=sys.stderr, flush=True)
        md = table(rows, gpu)
        if args.out:  # after every shape: a cut-short run still leaves its rows
            with open(args.out, "w") as fh:
                json.dump(dict(meta=meta, rows=rows, markdown=md), fh, indent=1)
    print(md)
    bad = [r for r in rows if "error" in r or not (r["max_rel_err_fwd"] <= SMOKE_TOLERANCE["fwd"]
                                                  and r["max_rel_err_grad"] <= SMOKE_TOLERANCE["grad"])]
    for r in bad:
        why = r.get("error") or (r["max_rel_err_fwd"], r["max_rel_err_grad"])
        print(f"FAILED {r['op']} {r['shape']} {r['impl']}: {why}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
