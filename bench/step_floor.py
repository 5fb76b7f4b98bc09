"""The floor of one MAE training step on a GPU, counted from the FLOPs and bytes of every op, without a GPU.

The step (forward, backward and the trainer's fused AdamW, bf16 autocast) runs on fake tensors, as
:func:`mae_fast.memory.estimate_train_step` runs it, while a dispatch mode records every op: its FLOPs (matmuls
and attention) and the bytes it must read and write. Run as its own kernel, as eager PyTorch runs it, an op takes
at least ``max(FLOPs / matmul rate, bytes / copy bandwidth)``. Summed over the step that is the *eager floor*;
the *fused floor* keeps only matmuls, attention and the optimizer, as if every LayerNorm, cast, add and GELU were
fused into a neighbouring kernel. Rates default to the H100's measured ones: bf16 matmul 794 TFLOP/s
(``matmul_flops`` of ``bench/results/nvidia-h100-80gb-hbm3-2026-11-22-e2e.json``) and a large device-to-device
copy at 3.0 TB/s read+write (the higher of two copy measurements; ``bench_masking.py``'s copy measured 2441 GB/s,
``bench/results/masking-h100-2026-11-22.json``, which gives higher floors: ``--copy-gbs 2441``).

What it answers: how much of a step is memory traffic rather than math, which ops carry it, the highest MFU an
eager step of this graph could reach, and (``--measured E2E.json``) how far a measured step is from its floor.
The floors are lower bounds, not predictions: real kernels reach neither rate exactly, and launch gaps are not
counted. The trace runs under CPU autocast, whose casts match CUDA autocast for every op this model uses; the
attention op is the CPU flash kernel, counted like SDPA's GPU kernels (q, k, v, out and log-sum-exp).

    python bench/step_floor.py                                 # the H100 shape table (ViT-B/16 224 ... H/14 952)
    python bench/step_floor.py --measured bench/results/nvidia-h100-80gb-hbm3-2026-11-22-e2e.json
    python bench/step_floor.py --smoke                         # one small configuration (CI)
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mae_fast  # noqa: E402
from mae_fast.memory import estimate_mae_step, estimate_train_step  # noqa: E402
from mae_fast.models import mae_train_flops  # noqa: E402
from e2e import GPU_CONFIGS, env_vars  # noqa: E402  (the same shapes as the end-to-end table)
from reference_mae import ReferenceMAE  # noqa: E402

H100_MATMUL_FLOPS = 794e12   # measured bf16 matmul rate, H100 80GB HBM3 (matmul_flops of
                             # bench/results/nvidia-h100-80gb-hbm3-2026-11-22-e2e.json)
H100_COPY_BYTES = 3.0e12     # a large device-to-device copy, bytes read + written per second (the higher of two
                             # measurements, so the floor stays a lower bound)

SMOKE_CONFIGS = [("mae_vit_small_patch16", 112, 8)]
IMPLS = ("reference", "mae_fast", "mae_fast_lean", "mae_fast_fused_ln", "mae_fast_lean_fused_ln")
# mae_fast_fused_ln: mae_fast with the Triton fused (residual add +) LayerNorm forced (ops.add_layer_norm); on fake
# tensors only its custom op's I/O counts, so no GPU (or interpreter run) is needed to count it

MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward", "_scaled_mm"}
COPY_OPS = {"_to_copy", "copy_", "clone", "cat", "stack", "_unsafe_index", "constant_pad_nd"}
GATHER_OPS = {"gather", "scatter", "scatter_add", "index", "index_select", "index_add", "index_put", "index_put_",
              "_index_put_impl_", "take_along_dim", "embedding", "embedding_dense_backward", "sort", "argsort",
              "scatter_add_", "scatter_", "index_add_"}
REDUCTION_OPS = {"sum", "mean", "var_mean", "var", "amax", "amin", "max", "min", "norm", "linalg_vector_norm",
                 "_log_softmax", "_softmax", "_softmax_backward_data", "_log_softmax_backward_data"}
# ops that only write their output (their first argument's old contents are not read)
WRITE_ONLY_OPS = {"fill_", "zero_", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "rand",
                  "rand_like", "randn", "randn_like", "arange", "scalar_tensor", "normal_", "uniform_"}
FREE_OPS = {"_unsafe_view", "detach", "alias", "empty", "empty_like", "empty_strided", "new_empty",
            "new_empty_strided", "lift_fresh", "_local_scalar_dense", "clamp_min_", "set_"}
CATEGORIES = ("matmul", "attention", "layer norm", "elementwise", "copy/cast", "gather/scatter", "reduction",
              "optimizer")
FUSED_CATEGORIES = ("matmul", "attention", "optimizer")


def category(name: str) -> str:
    if name in MATMUL_OPS:
        return "matmul"
    if "attention" in name:
        return "attention"
    if name.startswith(("_fused_adam", "_foreach")):
        return "optimizer"
    if "layer_norm" in name:
        return "layer norm"
    if name in COPY_OPS:
        return "copy/cast"
    if name in GATHER_OPS:
        return "gather/scatter"
    if name in REDUCTION_OPS:
        return "reduction"
    return "elementwise"


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes an op must touch to read or write ``t``: its elements, but no more than its storage holds
    (a broadcast view reads its storage once)."""
    dense = t.numel() * t.element_size()
    try:
        return min(dense, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return dense


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def attention_flops(name: str, args) -> float:
    """4*B*H*Nq*Nk*D forward; backward 2.5x that (it recomputes q k^T): the convention of the attention bench."""
    backward = name.endswith("backward")
    q, k = (args[1], args[2]) if backward else (args[0], args[1])
    *lead, nq, d = q.shape
    batch_heads = 1
    for s in lead:
        batch_heads *= s
    fwd = 4.0 * batch_heads * nq * k.shape[-2] * d
    return 2.5 * fwd if backward else fwd


@dataclass
class OpRecord:
    name: str
    category: str
    phase: str
    flops: float
    bytes_read: int
    bytes_written: int

    def floor_s(self, matmul_flops: float, copy_bytes: float) -> float:
        return max(self.flops / matmul_flops, (self.bytes_read + self.bytes_written) / copy_bytes)


class OpCounter(TorchDispatchMode):
    """Records each op's FLOPs and bytes (view and metadata ops move nothing and are skipped)."""

    def __init__(self):
        super().__init__()
        self.records: list[OpRecord] = []
        self.phase = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in FREE_OPS or func.namespace == "prim":
            return out
        cat = category(name)
        if cat == "matmul":
            flops = float(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
        elif cat == "attention":
            flops = attention_flops(name, args)
        else:
            flops = 0.0
        if name in WRITE_ONLY_OPS:
            read = 0
        elif name == "copy_":
            read = tensor_bytes(args[1])
        else:
            read = sum(tensor_bytes(t) for t in _tensors((args, kwargs)))
        outs = _tensors(out)
        if not outs:  # an in-place op that returns nothing (e.g. _fused_adamw_): it writes its mutable arguments
            outs = _tensors([a for a, spec in zip(args, func._schema.arguments)
                             if spec.alias_info is not None and spec.alias_info.is_write
                             # fused Adam only rewrites grads when unscaling them
                             and not (spec.name == "grads" and kwargs.get("grad_scale") is None)])
        written = sum(tensor_bytes(t) for t in outs)
        self.records.append(OpRecord(name, cat, self.phase, flops, read, written))
        return out


def trace_step(impl: str, name: str, img_size: int, batch: int, mask_ratio: float = 0.75) -> list[OpRecord]:
    """Every op of one steady-state bf16 training step of ``impl`` (one of ``IMPLS``)."""
    counter = OpCounter()
    if impl in ("mae_fast_fused_ln", "mae_fast_lean_fused_ln"):
        # the interpreter flag lets the Triton backend take CPU (fake) tensors; no kernel runs
        with env_vars({"MAE_FAST_BACKEND": "layer_norm=triton,add_layer_norm=triton", "TRITON_INTERPRET": "1"}):
            estimate_mae_step(name, img_size, batch, lean=impl == "mae_fast_lean_fused_ln", mask_ratio=mask_ratio,
                              observe=counter)
    elif impl in ("mae_fast", "mae_fast_lean"):
        estimate_mae_step(name, img_size, batch, lean=impl == "mae_fast_lean", mask_ratio=mask_ratio,
                          observe=counter)
    elif impl == "reference":
        cfg = mae_fast.models.model_config(name, img_size=img_size, norm_pix_loss=True)
        L = (img_size // cfg["patch_size"]) ** 2
        estimate_train_step(lambda: ReferenceMAE(**cfg),
                            lambda: (torch.randn(batch, 3, img_size, img_size), torch.rand(batch, L)),
                            lambda m, x, noise: m(x, mask_ratio, noise)[0], observe=counter)
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return counter.records


def summarize(records: list[OpRecord], model_flops: float, matmul_flops: float = H100_MATMUL_FLOPS,
              copy_bytes: float = H100_COPY_BYTES) -> dict:
    """Per category: op count, GB moved, floor ms; the eager and fused floors and the MFU each allows."""
    by_cat = {c: {"ops": 0, "gbytes": 0.0, "tflops": 0.0, "floor_ms": 0.0} for c in CATEGORIES}
    by_op: dict[str, float] = defaultdict(float)
    for r in records:
        c = by_cat[r.category]
        t = r.floor_s(matmul_flops, copy_bytes)
        c["ops"] += 1
        c["gbytes"] += (r.bytes_read + r.bytes_written) / 1e9
        c["tflops"] += r.flops / 1e12
        c["floor_ms"] += 1e3 * t
        by_op[f"{r.category}: {r.name} ({r.phase})"] += 1e3 * t
    eager = sum(c["floor_ms"] for c in by_cat.values())
    fused = sum(by_cat[c]["floor_ms"] for c in FUSED_CATEGORIES)
    peak_ms = 1e3 * model_flops / matmul_flops
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    return {
        "model_tflops": model_flops / 1e12,
        "traced_tflops": sum(r.flops for r in records) / 1e12,
        "ops": len(records),
        "gbytes": sum(r.bytes_read + r.bytes_written for r in records) / 1e9,
        "eager_floor_ms": eager,
        "fused_floor_ms": fused,
        "eager_mfu_ceiling": peak_ms / eager,
        "fused_mfu_ceiling": peak_ms / fused,
        "categories": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in by_cat.items()},
        "top_ops_ms": {k: round(v, 3) for k, v in top},
    }


def load_measured(path, impls=("reference",)) -> dict:
    """{(model, img_size, impl): step ms} of the eager rows of a bench/e2e.py JSON, for ``impls`` only: compare
    only implementations whose code is the one that ran (by default the reference, ``bench/reference_mae.py``,
    which the measured JSONs share)."""
    rows = json.loads(Path(path).read_text())["rows"]
    return {(r["model"], r["img_size"], r["impl"]): r["step_ms_median"] for r in rows
            if not r.get("compile") and r.get("step_ms_median") and r["impl"] in impls}


def run(configs, impls=IMPLS, matmul_flops=H100_MATMUL_FLOPS, copy_bytes=H100_COPY_BYTES, measured=None) -> dict:
    rows = []
    for name, img_size, batch in configs:
        with torch.device("meta"):
            model = mae_fast.create_model(name, img_size=img_size)
        model_flops = batch * mae_train_flops(model)  # the MFU numerator bench/e2e.py uses, for every impl
        for impl in impls:
            s = summarize(trace_step(impl, name, img_size, batch), model_flops, matmul_flops, copy_bytes)
            row = {"model": name, "img_size": img_size, "batch": batch, "impl": impl, **s}
            if measured and (name, img_size, impl) in measured:
                ms = measured[(name, img_size, impl)]
                row["measured_ms"] = ms
                row["measured_over_eager_floor"] = ms / s["eager_floor_ms"]
            rows.append(row)
            print(f"{name} {img_size}px b{batch} {impl}: eager floor {s['eager_floor_ms']:.1f} ms "
                  f"(MFU ceiling {100 * s['eager_mfu_ceiling']:.0f}%), fused floor {s['fused_floor_ms']:.1f} ms",
                  flush=True)
    return {"torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "matmul_tflops": matmul_flops / 1e12, "copy_gbs": copy_bytes / 1e9, "rows": rows,
            "definition": "floor of an op = max(FLOPs / matmul rate, bytes read+written / copy bandwidth); eager "
                          "floor: every op as its own kernel; fused floor: matmul + attention + optimizer only"}


def table(result) -> str:
    lines = ["| model | px | batch | impl | GB moved | matmul | attention | layer norm | elementwise | copy/cast | "
             "other | optimizer | eager floor ms | eager MFU ceiling | fused floor ms | measured / eager floor |",
             "|" + "---|" * 16]
    for r in result["rows"]:
        c = r["categories"]
        other = c["gather/scatter"]["floor_ms"] + c["reduction"]["floor_ms"]
        meas = f"{r['measured_over_eager_floor']:.2f} ({r['measured_ms']:.1f} ms)" if "measured_ms" in r else "-"
        lines.append(
            f"| {r['model'].replace('mae_vit_', '')} | {r['img_size']} | {r['batch']} | {r['impl']} | "
            f"{r['gbytes']:.1f} | " + " | ".join(f"{c[k]['floor_ms']:.1f}" for k in
                                                  ("matmul", "attention", "layer norm", "elementwise", "copy/cast"))
            + f" | {other:.1f} | {c['optimizer']['floor_ms']:.1f} | {r['eager_floor_ms']:.1f} | "
            f"{100 * r['eager_mfu_ceiling']:.0f}% | {r['fused_floor_ms']:.1f} | {meas} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="one small configuration (CPU CI)")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--only", nargs="+", metavar="MODEL:PX", help="configurations of the table to run")
    ap.add_argument("--matmul-tflops", type=float, default=H100_MATMUL_FLOPS / 1e12)
    ap.add_argument("--copy-gbs", type=float, default=H100_COPY_BYTES / 1e9, help="read+write bandwidth")
    ap.add_argument("--measured", help="a bench/e2e.py JSON: compare its eager step times with the floors")
    ap.add_argument("--measured-impls", nargs="+", default=["reference"], choices=IMPLS,
                    help="whose measured times to compare (those whose code is what the JSON measured)")
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument("--md", help="write the markdown table here")
    args = ap.parse_args(argv)
    configs = SMOKE_CONFIGS if args.smoke else GPU_CONFIGS
    if args.only:
        known = {(c[0], str(c[1])) for c in configs}
        unknown = [o for o in args.only if tuple(o.split(":")) not in known]
        if unknown:
            ap.error(f"--only {' '.join(unknown)}: not in {[f'{m}:{p}' for m, p, _ in configs]}")
        wanted = {tuple(o.split(":")) for o in args.only}
        configs = [c for c in configs if (c[0], str(c[1])) in wanted]
    measured = None
    if args.measured:
        try:
            measured = load_measured(args.measured, args.measured_impls)
        except OSError as e:
            ap.error(f"--measured {args.measured}: {e.strerror}")
        except (ValueError, KeyError, TypeError) as e:
            ap.error(f"--measured {args.measured}: not a bench/e2e.py JSON ({type(e).__name__}: {e})")
    for path in (args.out, args.md):  # before the run, not after it
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    result = run(configs, args.impls, args.matmul_tflops * 1e12, args.copy_gbs * 1e9, measured)
    md = table(result)
    print(md)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.md:
        Path(args.md).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
