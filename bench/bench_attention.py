"""Attention throughput on the MAE shape table: Triton vs every SDPA kernel (and flash-attn 2/4, xformers if present).

TFLOP/s counts 4*B*H*N^2*D for forward and 2.5x that for backward (sum of N_i^2 for packed sequences).
Times are ``triton.testing.do_bench`` medians on GPU. Usage:

    python bench/bench_attention.py --out bench/results/attention-h100-DATE.json     # full table (GPU)
    python bench/bench_attention.py --smoke                                           # tiny CPU config
    python bench/bench_attention.py --tune --out tune.json                            # launch-config sweep
    python bench/bench_attention.py --write-prefs bench/results/attention-h100-DATE.json  # preference table

``--check`` also compares Triton's output and gradients with an fp32 reference on every row.
``--tilings wrap equal`` adds ``triton:wrap`` / ``triton:equal`` (the kernels' ``tiling`` launch parameter: wrapped
tail columns, 32-column tiles) as more backends on the rows whose tiling they change, timed (and checked) in the
same run as the default tiling. ``--tune`` times every ``candidate_configs`` entry; ``--pick-configs T --save-tuned``
writes the fastest into the tuned table the launcher reads first.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESOLUTIONS = (224, 476, 952)
PATCHES = (14, 16)
ENCODER_HEAD_DIMS = (64, 80, 88, 128)
DECODER_HEAD_DIM = 32
HEADS = 16
MASK_RATIO = 0.75
TOKENS_PER_CONFIG = 8192  # batch * seqlen; x16 heads = 131k token-heads, enough to fill an H100
REFERENCE_MAX_SEQLEN = 290
SDPA_KERNELS = {"sdpa:flash": "FLASH_ATTENTION", "sdpa:cudnn": "CUDNN_ATTENTION",
                "sdpa:efficient": "EFFICIENT_ATTENTION"}
PACKED_LENGTHS = (1157, 290, 290, 871, 65, 211, 1157, 50)  # a multi-resolution masked-encoder pack


def mae_shapes() -> list[dict]:
    """Encoder (masked pretraining, unmasked finetune) and decoder rows for every resolution and patch."""
    rows = []
    for res in RESOLUTIONS:
        for patch in PATCHES:
            n = (res // patch) ** 2
            visible = int(n * (1 - MASK_RATIO))
            for hd in ENCODER_HEAD_DIMS:
                rows.append(dict(name=f"enc-masked {res}px/p{patch}", seqlen=visible + 1, head_dim=hd))
                rows.append(dict(name=f"enc-finetune {res}px/p{patch}", seqlen=n + 1, head_dim=hd))
            rows.append(dict(name=f"decoder {res}px/p{patch}", seqlen=n + 1, head_dim=DECODER_HEAD_DIM))
    for hd in (DECODER_HEAD_DIM, *ENCODER_HEAD_DIMS):
        rows.append(dict(name="packed multi-res", seqlen=max(PACKED_LENGTHS), head_dim=hd, packed=True))
    for r in rows:
        r["heads"] = HEADS
        if r.get("packed"):
            r["batch"] = max(1, round(TOKENS_PER_CONFIG / sum(PACKED_LENGTHS)))
        else:
            r["batch"] = max(1, round(TOKENS_PER_CONFIG / r["seqlen"]))
    return rows


def fwd_flops(row) -> float:
    lengths = (list(PACKED_LENGTHS) * row["batch"]) if row.get("packed") else [row["seqlen"]] * row["batch"]
    return 4.0 * row["heads"] * row["head_dim"] * sum(n * n for n in lengths)


def make_inputs(row, device, dtype):
    h, d = row["heads"], row["head_dim"]
    if row.get("packed"):
        lengths = list(PACKED_LENGTHS) * row["batch"]
        total = sum(lengths)
        cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
        qkv = [torch.randn(total, h, d, device=device, dtype=dtype) for _ in range(3)]
        return qkv, cu, max(lengths)
    qkv = [torch.randn(row["batch"], row["seqlen"], h, d, device=device, dtype=dtype) for _ in range(3)]
    return qkv, None, row["seqlen"]


# ---- backends -----------------------------------------------------------------------------------

def _sdpa_call(kernel_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, kernel_name)

    def dense(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2)).transpose(1, 2)

    def call(q, k, v, cu, max_seqlen):
        if cu is None:
            return dense(q, k, v)
        cs = cu.tolist()
        return torch.cat([dense(q[None, a:b], k[None, a:b], v[None, a:b])[0] for a, b in zip(cs, cs[1:])], 0)

    return call


def _triton_call(tiling, q, k, v, cu, m):
    from mae_fast.kernels.flash_attention import flash_attention

    return flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=m, tiling=tiling)


def backends(device, include_reference, include_triton=True, tilings=()):
    """name -> fn(q, k, v, cu_seqlens, max_seqlen); ``tilings``: more Triton tilings, as ``triton:<tiling>``."""
    out = {}
    if include_triton:
        out["triton"] = functools.partial(_triton_call, None)  # the library's tiling and configs
        for tiling in tilings:
            out[f"triton:{tiling}"] = functools.partial(_triton_call, tiling)
    if device.type == "cuda":
        for name, kernel in SDPA_KERNELS.items():
            out[name] = _sdpa_call(kernel)
    else:
        out["sdpa:math"] = _sdpa_call("MATH")
    from mae_fast.ops.attention import attention_reference

    if include_reference:
        out["torch"] = lambda q, k, v, cu, m: attention_reference(q, k, v, cu_seqlens=cu)
    from mae_fast.ops import backends_for

    for name in ("flash_attn", "flash_attn_4", "xformers"):  # the op's backend functions, when installed
        backend = backends_for("attention")[name]
        if backend.available() is None:
            out[name] = lambda q, k, v, cu, m, fn=backend.fn: fn(q, k, v, None, cu, m)
    return out


def tiling_changes(tiling: str, head_dim: int) -> bool:
    """Whether the kernels compute ``head_dim`` differently in ``tiling`` than in the default one."""
    from mae_fast.kernels import flash_attention as fa

    return fa.head_dim_tiles(head_dim, tiling) != fa.head_dim_tiles(head_dim)


# ---- timing -------------------------------------------------------------------------------------

def _bench(fn, device, grad_to_none=None):
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=25, grad_to_none=grad_to_none, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[1]


def time_backend(fn, qkv, cu, max_seqlen, device):
    q, k, v = (t.detach().requires_grad_(True) for t in qkv)
    with torch.no_grad():
        fwd_ms = _bench(lambda: fn(q, k, v, cu, max_seqlen), device)
    out = fn(q, k, v, cu, max_seqlen)
    do = torch.randn_like(out)
    bwd_ms = _bench(lambda: out.backward(do, retain_graph=True), device, grad_to_none=[q, k, v])
    return fwd_ms, bwd_ms


def check_triton(row, device, dtype, tiling=None):
    """Relative error of Triton (out, dq, dk, dv) and of the same math in the input dtype, vs fp32."""
    from mae_fast.kernels.flash_attention import flash_attention
    from mae_fast.ops.attention import attention_reference

    (q, k, v), cu, m = make_inputs(row, device, dtype)
    if not row.get("packed"):  # one sequence is enough to check; keeps memory small at 4625
        q, k, v = q[:2], k[:2], v[:2]
    do = torch.randn(q.shape, device=device, dtype=dtype)

    def grads(fn, cast):
        ins = [t.detach().to(cast).requires_grad_(True) for t in (q, k, v)]
        out = fn(*ins)
        out.backward(do.to(cast))
        return [out.detach().float()] + [t.grad.float() for t in ins]

    ref = grads(lambda a, b, c: attention_reference(a, b, c, cu_seqlens=cu, upcast=False), torch.float32)
    low = grads(lambda a, b, c: attention_reference(a, b, c, cu_seqlens=cu, upcast=False), dtype)
    tri = grads(lambda a, b, c: flash_attention(a, b, c, cu_seqlens=cu, max_seqlen=m, tiling=tiling), dtype)
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    return {n: (rel(t, r), rel(lo, r)) for n, t, lo, r in zip(("out", "dq", "dk", "dv"), tri, low, ref)}


# ---- table --------------------------------------------------------------------------------------

def run_table(args, device, dtype):
    rows = mae_shapes()
    if args.only_head_dim:
        rows = [r for r in rows if r["head_dim"] in args.only_head_dim]
    results = []
    for row in rows:
        include_ref = row["seqlen"] <= REFERENCE_MAX_SEQLEN and not row.get("packed")
        extra = [t for t in (args.tilings or ()) if tiling_changes(t, row["head_dim"])]
        fns = backends(device, include_ref, tilings=extra)
        qkv, cu, m = make_inputs(row, device, dtype)
        flops = fwd_flops(row)
        rec = dict(row, dtype=str(dtype).replace("torch.", ""), fwd_flops=flops, fwd_ms={}, bwd_ms={},
                   fwd_tflops={}, bwd_tflops={}, errors={})
        for name, fn in fns.items():
            try:
                f_ms, b_ms = time_backend(fn, qkv, cu, m, device)
            except Exception as e:  # an SDPA kernel refusing a shape is a result, not a crash
                rec["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                continue
            rec["fwd_ms"][name], rec["bwd_ms"][name] = f_ms, b_ms
            rec["fwd_tflops"][name] = flops / f_ms / 1e9
            rec["bwd_tflops"][name] = 2.5 * flops / b_ms / 1e9
        if args.check and "triton" in fns:
            rec["check"] = check_triton(row, device, dtype)
            for tiling in extra:
                rec[f"check_{tiling}"] = check_triton(row, device, dtype, tiling)
        results.append(rec)
        print_row(rec)
        if args.out:  # keep partial results if a later row dies
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(dict(partial=True, results=results), indent=1) + "\n")
        del qkv
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def print_row(rec):
    names = list(rec["fwd_tflops"])
    sd = [n for n in names if n.startswith("sdpa")]
    best_f = max((rec["fwd_tflops"][n] for n in sd), default=float("nan"))
    best_b = max((rec["bwd_tflops"][n] for n in sd), default=float("nan"))
    tri_f = rec["fwd_tflops"].get("triton", float("nan"))
    tri_b = rec["bwd_tflops"].get("triton", float("nan"))
    cols = " ".join(f"{n}={rec['fwd_tflops'][n]:.0f}/{rec['bwd_tflops'][n]:.0f}" for n in names)
    chk = ""
    if "check" in rec:
        chk = " chk " + ",".join(f"{k}:{a:.1e}/{b:.1e}" for k, (a, b) in rec["check"].items())
    for name in [n for n in names if n.startswith("triton:")]:
        tiling = name.split(":", 1)[1]
        if f"check_{tiling}" in rec:
            chk += f" chk({tiling}) " + ",".join(f"{k}:{a:.1e}" for k, (a, _) in rec[f"check_{tiling}"].items())
        e_f, e_b = rec["fwd_tflops"][name], rec["bwd_tflops"][name]
        chk = f" | {tiling} vs SDPA fwd {e_f / best_f:4.2f}x bwd {e_b / best_b:4.2f}x" + chk
    print(f"{rec['name']:<24} N={rec['seqlen']:<5} D={rec['head_dim']:<3} B={rec['batch']:<4} "
          f"triton/bestSDPA fwd {tri_f:6.1f}/{best_f:6.1f} ({tri_f / best_f:4.2f}x) "
          f"bwd {tri_b:6.1f}/{best_b:6.1f} ({tri_b / best_b:4.2f}x) | {cols}{chk}"
          + (f" | errors: {rec['errors']}" if rec["errors"] else ""), flush=True)


# ---- tuning -------------------------------------------------------------------------------------

def run_tune(args, device, dtype, deadline):
    """Time each of ``candidate_configs`` of each kernel on every (head dim, seqlen); the i-th candidates of every
    shape before the (i+1)-th, so the budget cuts the unlikeliest ones rather than whole shapes."""
    from mae_fast.kernels import flash_attention as fa

    shapes = {}
    for hd in args.tune_head_dims:
        for n in args.tune_seqlens:
            row = dict(name="tune", seqlen=n, head_dim=hd, heads=HEADS, batch=max(1, round(TOKENS_PER_CONFIG / n)))
            (q, k, v), _, _ = make_inputs(row, device, dtype)
            o, lse = fa.flash_attn_forward(q, k, v)
            shapes[(hd, n)] = (q, k, v, o, lse, torch.randn_like(q), fwd_flops(row), fa.candidate_configs(hd, n))
    out = []
    for i in range(max(len(c) for *_, cands in shapes.values() for c in cands.values())):
        for (hd, n), (q, k, v, o, lse, do, flops, cands) in shapes.items():
            for kind in fa.CONFIG_KERNELS:
                if i >= len(cands[kind]):
                    continue
                if time.time() > deadline:
                    print("tune: time budget reached", flush=True)
                    return out
                cfg = cands[kind][i]
                try:
                    if kind == "fwd":
                        fn = lambda: fa.flash_attn_forward(q, k, v, config=cfg)  # noqa: E731
                    else:
                        fn = lambda: fa.flash_attn_backward(do, q, k, v, o, lse, configs={kind: cfg})  # noqa: E731
                    ms = _bench(fn, device)
                except Exception as e:
                    print(f"tune {kind} hd={hd} N={n} {cfg}: {type(e).__name__} {str(e)[:100]}", flush=True)
                    continue
                out.append(dict(kind=kind, head_dim=hd, seqlen=n, config=cfg, ms=ms, fwd_flops=flops))
                print(f"tune {kind:<4} hd={hd:<3} N={n:<5} {cfg}: {ms:.3f} ms", flush=True)
    return out


def best_configs(tune_results) -> list[dict]:
    """Rows for ``flash_attention.save_tuned``: per (kernel, head dim, seqlen bucket) the config with the best
    geometric-mean slowdown over the bucket's tuned seqlens, among the configs that ran on all of them."""
    from mae_fast.kernels.flash_attention import seqlen_bucket

    fastest = {}
    for r in tune_results:
        key = (r["kind"], r["head_dim"], r["seqlen"])
        fastest[key] = min(fastest.get(key, math.inf), r["ms"])
    scores = {}
    for r in tune_results:
        cfg = json.dumps(r["config"], sort_keys=True)
        k = (r["kind"], r["head_dim"], seqlen_bucket(r["seqlen"]))
        slow = math.log(r["ms"] / fastest[(r["kind"], r["head_dim"], r["seqlen"])])
        tot, cnt, ms = scores.setdefault(k, {}).get(cfg, (0.0, 0, 0.0))
        scores[k][cfg] = (tot + slow, cnt + 1, ms + r["ms"])
    out = []
    for (kind, hd, bucket), by_cfg in sorted(scores.items()):
        most = max(c for _, c, _ in by_cfg.values())
        cfg, (_, n, ms) = min(((c, v) for c, v in by_cfg.items() if v[1] == most), key=lambda x: x[1][0] / x[1][1])
        out.append(dict(kernel=kind, head_dim=hd, seqlen_bucket=bucket, config=json.loads(cfg), ms=ms / n))
    return out


# ---- preference table ---------------------------------------------------------------------------

def check_passed(rec, mult=3.0, floor=1e-3) -> bool:
    """Triton's error vs fp32 within ``mult`` x PyTorch's own low-precision error (NaN fails)."""
    for a, b in rec.get("check", {}).values():
        if not (a <= mult * b + floor):
            return False
    return True


def write_prefs(result_paths, dest):
    """Turn benchmark JSON into attention_prefs.json: per device, layout, head dim, sequence length,
    the measured fwd and fwd+bwd ("train") times of every backend."""
    prefs = {"generated_by": "bench/bench_attention.py --write-prefs", "sources": [], "excluded": [],
             "devices": {}}
    for path in result_paths:
        data = json.loads(Path(path).read_text())
        prefs["sources"].append(str(path))
        dev = prefs["devices"].setdefault(data["device"], {})
        # a kernel that failed its check on any row of a head dim is suspect on every row of it
        suspect = {r["head_dim"] for r in data["results"] if not check_passed(r)}
        for rec in data["results"]:
            if rec["head_dim"] in suspect:  # a wrong kernel's time is no measurement
                why = "check failed" if not check_passed(rec) else "check failed on another row of this head dim"
                prefs["excluded"].append(f"{rec['name']} N={rec['seqlen']} D={rec['head_dim']}: {why}")
                continue
            layout = "varlen" if rec.get("packed") else "dense"
            # kernel tilings timed beside the default (triton:equal, triton:wrap) are no backend auto can pick
            times = {b: t for b, t in rec["fwd_ms"].items() if not b.startswith("triton:")}
            fwd = {b: round(t, 5) for b, t in times.items()}
            train = {b: round(t + rec["bwd_ms"][b], 5) for b, t in times.items()}
            entry = dict(seqlen=rec["seqlen"], batch=rec["batch"], name=rec["name"], fwd_ms=fwd, train_ms=train)
            rows = dev.setdefault(layout, {}).setdefault(str(rec["head_dim"]), [])
            rows[:] = [r for r in rows if r["seqlen"] != rec["seqlen"]] + [entry]
            rows.sort(key=lambda r: r["seqlen"])
    Path(dest).write_text(json.dumps(prefs, indent=1) + "\n")
    return prefs


# ---- fault diagnosis ----------------------------------------------------------------------------

DIAG_CASES = [  # head_dim, seqlen, batch, heads, dtype, explicit configs
    (32, 67, 1, 2, "float16", None), (40, 17, 2, 1, "bfloat16", None), (88, 65, 126, 16, "bfloat16", None),
    (80, 257, 32, 16, "bfloat16", None), (96, 1157, 7, 16, "bfloat16", None),
    (72, 300, 4, 8, "float16", None), (88, "packed", 1, 16, "bfloat16", None), (128, 4625, 2, 16, "bfloat16", None),
    (80, 1157, 7, 16, "bfloat16", None), (64, 50, 164, 16, "bfloat16", None),
]


def diagnose():
    """Run each case with a sync after every launch and check it; stops at the first fault."""
    from mae_fast.kernels import flash_attention as fa
    from mae_fast.ops.attention import attention_reference

    device = torch.device("cuda")
    for hd, n, b, h, dt, cfgs in DIAG_CASES:
        dtype = getattr(torch, dt)
        if n == "packed":
            row = dict(seqlen=max(PACKED_LENGTHS), head_dim=hd, heads=h, batch=b, packed=True)
        else:
            row = dict(seqlen=n, head_dim=hd, heads=h, batch=b)
        (q, k, v), cu, m = make_inputs(row, device, dtype)
        configs = {kk: dict(BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])
                   for kk, c in (cfgs or {}).items()}
        tag = f"diag hd={hd} N={n} B={b} H={h} {dt} {cfgs or ''}"
        stage = "fwd"
        try:
            o, lse = fa.flash_attn_forward(q, k, v, None, cu, m)
            torch.cuda.synchronize()
            stage = "bwd"
            do = torch.randn_like(q)
            dq, dk, dv = fa.flash_attn_backward(do, q, k, v, o, lse, None, cu, m, configs=configs)
            torch.cuda.synchronize()
        except Exception as e:
            print(f"{tag}: FAULT in {stage}: {type(e).__name__} {str(e).splitlines()[0][:120]}", flush=True)
            return 1
        qs, ks, vs = (t[:2] if cu is None else t for t in (q, k, v))
        qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (qs, ks, vs))
        ref = attention_reference(qr, kr, vr, cu_seqlens=cu, upcast=False)
        ref.backward(do[: ref.shape[0]].float() if cu is not None else do[:2].float())
        sl = slice(None) if cu is not None else slice(0, 2)
        errs = [float((a[sl].float() - r).norm() / r.norm()) for a, r in
                ((o, ref.detach()), (dq, qr.grad), (dk, kr.grad), (dv, vr.grad))]
        ok = all(e < 2e-2 for e in errs)
        print(f"{tag}: {'OK' if ok else 'WRONG'} rel err out/dq/dk/dv " + " ".join(f"{e:.1e}" for e in errs),
              flush=True)
        if not ok:
            return 1
    print("ALLOK", flush=True)
    return 0


# ---- main ---------------------------------------------------------------------------------------

def smoke():
    """A tiny CPU run: torch reference and SDPA (math), plus one tiny Triton case under the interpreter."""
    device, dtype = torch.device("cpu"), torch.float32
    row = dict(name="smoke", seqlen=50, head_dim=32, heads=2, batch=2)
    qkv, cu, m = make_inputs(row, device, dtype)
    fns = backends(device, include_reference=True, include_triton=False)
    for name, fn in fns.items():
        f_ms, b_ms = time_backend(fn, qkv, cu, m, device)
        print(f"smoke {name:<10} N=50 D=32: fwd {f_ms:.2f} ms, bwd {b_ms:.2f} ms")
    if os.environ.get("TRITON_INTERPRET") == "1":
        tiny = dict(name="tiny", seqlen=17, head_dim=16 * 2, heads=1, batch=1)
        chk = check_triton(tiny, device, torch.float16)
        print("smoke triton (interpreter) N=17 D=32 rel err (triton, torch fp16):",
              {k: (f"{a:.1e}", f"{b:.1e}") for k, (a, b) in chk.items()})
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write JSON results here")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--check", action="store_true", help="compare Triton with an fp32 reference on each row")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--diagnose", action="store_true", help="run the fault cases with a sync after each launch")
    ap.add_argument("--tune-head-dims", type=int, nargs="+", default=[32, 64, 80, 128])
    ap.add_argument("--tune-seqlens", type=int, nargs="+", default=[257, 1157, 4625])
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop tuning after this long")
    ap.add_argument("--only-head-dim", type=int, nargs="*")
    ap.add_argument("--tilings", nargs="+", choices=["single", "wrap", "equal"], default=[],
                    help="also time (and --check) Triton in these tilings, as triton:<tiling>, where they change "
                         "how the row's head dim is computed")
    ap.add_argument("--tuned-configs", help="a --tune JSON whose best configs replace the launcher's picks")
    ap.add_argument("--pick-configs", metavar="TUNE_JSON",
                    help="print the best configs of a --tune JSON (no GPU needed) and exit; with --save-tuned, "
                         "merge them into the tuned table (flash_attention.save_tuned)")
    ap.add_argument("--save-tuned", action="store_true")
    ap.add_argument("--write-prefs", nargs="+", metavar="RESULTS_JSON")
    ap.add_argument("--prefs-dest", default=str(Path(__file__).resolve().parents[1] / "mae_fast/ops/attention_prefs.json"))
    args = ap.parse_args(argv)
    if args.write_prefs:
        write_prefs(args.write_prefs, args.prefs_dest)
        print(f"wrote {args.prefs_dest}")
        return 0
    if args.pick_configs:
        chosen = best_configs(json.loads(Path(args.pick_configs).read_text())["tune"])
        for r in chosen:
            print(f"  {r['kernel']:<4} hd={r['head_dim']:<3} N<={r['seqlen_bucket']:<5} {r['config']}")
        if args.save_tuned:
            from mae_fast.kernels import flash_attention as fa

            print(f"wrote {fa.save_tuned(chosen)}")
        return 0
    if args.smoke:
        return smoke()
    if args.diagnose:
        return diagnose()
    if not torch.cuda.is_available():
        print("no CUDA device: use --smoke on CPU", file=sys.stderr)
        return 1
    device, dtype = torch.device("cuda"), torch.bfloat16
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype="bfloat16",
                date=time.strftime("%Y-%m-%d"))
    import triton

    meta["triton"] = triton.__version__
    start = time.time()
    if args.tuned_configs:
        from mae_fast.kernels import flash_attention as fa

        chosen = best_configs(json.loads(Path(args.tuned_configs).read_text())["tune"])
        fa.TUNED_PATH = fa.save_tuned(chosen, Path(args.out or "attention").with_suffix(".tuned.json"))
        meta["configs"] = chosen
        print("configs:", chosen, flush=True)
    if args.tune:
        res = run_tune(args, device, dtype, start + args.budget_s)
        best = {}
        for r in res:
            key = (r["kind"], r["head_dim"], r["seqlen"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
        print("best configs:")
        for (kind, hd, n), r in sorted(best.items()):
            print(f"  {kind:<4} hd={hd:<3} N={n:<5} {r['config']} {r['ms']:.3f} ms")
        payload = dict(meta, tune=res)
    else:
        payload = dict(meta, results=run_table(args, device, dtype))
    payload["wall_s"] = time.time() - start
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
