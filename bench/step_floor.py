"""The floor of one MAE training step on a GPU, counted from the FLOPs and bytes of every op, without a GPU.

The step (forward, backward and the trainer's fused AdamW, bf16 autocast) runs on fake tensors, as
:func:`mae_fast.memory.estimate_train_step` runs it, while a dispatch mode records every op: its FLOPs (matmuls
and attention) and the bytes it must read and write. Run as its own kernel, as eager PyTorch runs it, an op takes
at least ``max(FLOPs / matmul rate, bytes / copy bandwidth)``. Summed over the step that is the *eager floor*;
the *fused floor* keeps only matmuls, attention and the optimizer, as if every LayerNorm, cast, add and GELU were
fused into a neighbouring kernel. Attention is priced at the measured rate of the backend ``auto`` picks for its
head dim and sequence length (the fastest fwd+bwd time of the row nearest in ``mae_fast/ops/attention_prefs.json``
for the H100, or of ``--attention-rates``: a table or a bench/bench_attention.py JSON), not at matmul peak; a head
dim nothing measured falls back to matmul peak. ``_scaled_mm`` (``mae_fast_fp8``: torchao's float8 linears) runs at
``--fp8-tflops``, by default twice the measured bf16 rate (the datasheet ratio) until an FP8 rate is measured.
Rates default to the H100's measured ones: bf16 matmul 794 TFLOP/s
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
import math
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
IMPLS = ("reference", "mae_fast", "mae_fast_lean", "mae_fast_fused_ln", "mae_fast_lean_fused_ln", "mae_fast_fp8")
FP8_MIN_WIDTH = 1024  # mae_fast_fp8: the trainer's default fp8_min_width
H100_DEVICE = "NVIDIA H100 80GB HBM3"  # the attention table's device the default rates come from
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

    head_dim: int | None = None   # attention ops: head dim and key length, to look up the measured rate
    seqlen: int | None = None
    fp8: bool = False             # a matmul of torchao float8 operands (it runs as _scaled_mm)

    def floor_s(self, matmul_flops: float, copy_bytes: float, rate: float | None = None) -> float:
        """``rate``: FLOP/s of this op where it is not ``matmul_flops`` (attention's measured rate, FP8)."""
        return max(self.flops / (rate or matmul_flops), (self.bytes_read + self.bytes_written) / copy_bytes)


class AttentionRates:
    """Measured attention FLOP/s per head dim and sequence length, of the backend ``auto`` picks there: the
    fastest fwd+bwd time among the measured backends of a row (``torch``, the fp32 reference, and tilings
    ``auto`` cannot launch are left out). Rows come from a preference table (``attention_prefs.json``, whose rows
    were measured with ``bench_attention.HEADS`` heads) or a bench_attention results JSON (``fwd_flops`` given)."""

    def __init__(self, rows: dict[int, list[dict]], source: str):
        self.rows, self.source = rows, source  # head_dim -> [{seqlen, backend, fwd, bwd}] (FLOP/s), by seqlen

    @classmethod
    def load(cls, path, device: str | None = None) -> "AttentionRates":
        data = json.loads(Path(path).read_text())
        rows: dict[int, list[dict]] = defaultdict(list)
        if "devices" in data:  # a preference table
            devices = data["devices"]
            name = device or (H100_DEVICE if H100_DEVICE in devices else next(iter(devices), None))
            if name not in devices:
                raise ValueError(f"no device {name!r} in {path}; it has {sorted(devices)}")
            from bench_attention import HEADS

            for hd, entries in devices[name].get("dense", {}).items():
                for e in entries:
                    flops = 4.0 * e["batch"] * HEADS * e["seqlen"] ** 2 * int(hd)
                    rows[int(hd)].append(cls._pick(e["seqlen"], flops, e["fwd_ms"], e["train_ms"]))
        else:  # bench_attention.py results
            for r in data["results"]:
                if r.get("packed"):
                    continue
                train = {b: t + r["bwd_ms"][b] for b, t in r["fwd_ms"].items() if b in r.get("bwd_ms", {})}
                rows[int(r["head_dim"])].append(cls._pick(r["seqlen"], r["fwd_flops"], r["fwd_ms"], train))
        rows = {hd: sorted((e for e in es if e), key=lambda e: e["seqlen"]) for hd, es in rows.items()}
        return cls({hd: es for hd, es in rows.items() if es}, str(path))

    @staticmethod
    def _pick(seqlen, flops, fwd_ms, train_ms) -> dict | None:
        timed = {b: t for b, t in train_ms.items() if t and b != "torch" and not b.startswith("triton:")
                 and fwd_ms.get(b) and t > fwd_ms[b]}
        if not timed:
            return None
        best = min(timed, key=timed.get)
        return {"seqlen": seqlen, "backend": best, "fwd": flops / (fwd_ms[best] * 1e-3),
                "bwd": 2.5 * flops / ((timed[best] - fwd_ms[best]) * 1e-3)}

    def entry(self, head_dim: int, seqlen: int) -> dict | None:
        """The measured row for ``head_dim`` nearest ``seqlen`` (log scale), as ``auto``'s table lookup."""
        es = self.rows.get(head_dim)
        if not es:
            return None
        return min(es, key=lambda e: abs(math.log(max(e["seqlen"], 1)) - math.log(max(seqlen, 1))))

    def rate(self, record: "OpRecord") -> float | None:
        e = self.entry(record.head_dim, record.seqlen) if record.head_dim else None
        return None if e is None else e["bwd" if record.phase == "backward" else "fwd"]


def default_attention_rates() -> AttentionRates | None:
    """The H100 rows of the packaged preference table (None when it has none)."""
    from mae_fast.ops.attention import PREFS_PATH

    try:
        return AttentionRates.load(PREFS_PATH, H100_DEVICE)
    except (OSError, ValueError, KeyError):
        return None


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
        head_dim = seqlen = None
        if cat == "attention":
            k = args[2] if name.endswith("backward") else args[1]
            head_dim, seqlen = int(k.shape[-1]), int(k.shape[-2])
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
        # torchao's Float8TrainingTensor handles mm below this mode (as _scaled_mm): its operands say it is FP8
        fp8 = cat == "matmul" and any(type(t).__name__ == "Float8TrainingTensor" for t in _tensors((args, kwargs)))
        self.records.append(OpRecord(name, cat, self.phase, flops, read, written, head_dim, seqlen, fp8))
        return out


def trace_step(impl: str, name: str, img_size: int, batch: int, mask_ratio: float = 0.75) -> list[OpRecord]:
    """Every op of one steady-state bf16 training step of ``impl`` (one of ``IMPLS``)."""
    counter = OpCounter()
    if impl in ("mae_fast_fused_ln", "mae_fast_lean_fused_ln"):
        # the interpreter flag lets the Triton backend take CPU (fake) tensors; no kernel runs
        with env_vars({"MAE_FAST_BACKEND": "layer_norm=triton,add_layer_norm=triton", "TRITON_INTERPRET": "1"}):
            estimate_mae_step(name, img_size, batch, lean=impl == "mae_fast_lean_fused_ln", mask_ratio=mask_ratio,
                              observe=counter)
    elif impl == "mae_fast_fp8":  # torchao Float8Linear for the encoder's wide linears, as precision: fp8 runs
        estimate_mae_step(name, img_size, batch, mask_ratio=mask_ratio, observe=counter, fp8_min_width=FP8_MIN_WIDTH)
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
              copy_bytes: float = H100_COPY_BYTES, attention_rates: AttentionRates | None = None,
              fp8_flops: float | None = None) -> dict:
    """Per category: op count, GB moved, floor ms; the eager and fused floors and the MFU each allows (against
    ``matmul_flops``, the bf16 rate, for FP8 steps too). Attention runs at ``attention_rates``' measured rate where
    it has one (else at matmul peak), ``_scaled_mm`` at ``fp8_flops`` (default: twice ``matmul_flops``)."""
    by_cat = {c: {"ops": 0, "gbytes": 0.0, "tflops": 0.0, "floor_ms": 0.0} for c in CATEGORIES}
    by_op: dict[str, float] = defaultdict(float)
    priced: dict[str, int] = defaultdict(int)  # attention ops by how they were priced, and FP8 matmuls
    for r in records:
        c = by_cat[r.category]
        rate = None
        if r.category == "attention":
            rate = attention_rates.rate(r) if attention_rates is not None else None
            priced["measured" if rate else "matmul peak"] += 1
        elif r.fp8 or r.name == "_scaled_mm":
            rate = fp8_flops or 2 * matmul_flops
            priced["fp8 matmuls"] += 1
        t = r.floor_s(matmul_flops, copy_bytes, rate)
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
        "attention_priced": dict(priced),
        "top_ops_ms": {k: round(v, 3) for k, v in top},
    }


def load_measured(path, impls=("reference",)) -> dict:
    """{(model, img_size, impl): step ms} of the eager rows of a bench/e2e.py JSON, for ``impls`` only: compare
    only implementations whose code is the one that ran (by default the reference, ``bench/reference_mae.py``,
    which the measured JSONs share)."""
    rows = json.loads(Path(path).read_text())["rows"]
    return {(r["model"], r["img_size"], r["impl"]): r["step_ms_median"] for r in rows
            if not r.get("compile") and r.get("step_ms_median") and r["impl"] in impls}


def run(configs, impls=IMPLS, matmul_flops=H100_MATMUL_FLOPS, copy_bytes=H100_COPY_BYTES, measured=None,
        attention_rates: AttentionRates | None = None, fp8_flops: float | None = None) -> dict:
    rows = []
    for name, img_size, batch in configs:
        with torch.device("meta"):
            model = mae_fast.create_model(name, img_size=img_size)
        model_flops = batch * mae_train_flops(model)  # the MFU numerator bench/e2e.py uses, for every impl
        for impl in impls:
            s = summarize(trace_step(impl, name, img_size, batch), model_flops, matmul_flops, copy_bytes,
                          attention_rates, fp8_flops)
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
            "fp8_tflops": (fp8_flops or 2 * matmul_flops) / 1e12,
            "attention_rates": attention_rates.source if attention_rates is not None else "matmul peak",
            "definition": "floor of an op = max(FLOPs / matmul rate, bytes read+written / copy bandwidth); eager "
                          "floor: every op as its own kernel; fused floor: matmul + attention + optimizer only; "
                          "attention at the measured rate of auto's backend per head dim and length"}


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
    from mae_fast.precision import fp8_unavailable

    ap.add_argument("--impls", nargs="+", choices=IMPLS,  # mae_fast_fp8 needs torchao
                    default=[i for i in IMPLS if i != "mae_fast_fp8" or fp8_unavailable() is None])
    ap.add_argument("--only", nargs="+", metavar="MODEL:PX", help="configurations of the table to run")
    ap.add_argument("--matmul-tflops", type=float, default=H100_MATMUL_FLOPS / 1e12)
    ap.add_argument("--copy-gbs", type=float, default=H100_COPY_BYTES / 1e9, help="read+write bandwidth")
    ap.add_argument("--fp8-tflops", type=float, default=None, help="FP8 matmul rate (default: 2x --matmul-tflops)")
    ap.add_argument("--attention-rates", help="attention_prefs.json-style table or bench_attention.py JSON "
                    "(default: the packaged table's H100 rows)")
    ap.add_argument("--attention-device", help="the table's device to read (default: the H100, else the first)")
    ap.add_argument("--attention-at-matmul-peak", action="store_true", help="price attention at matmul peak")
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
    rates = None
    if args.attention_rates:
        try:
            rates = AttentionRates.load(args.attention_rates, args.attention_device)
        except OSError as e:
            ap.error(f"--attention-rates {args.attention_rates}: {e.strerror}")
        except (ValueError, KeyError, TypeError) as e:
            ap.error(f"--attention-rates {args.attention_rates}: not an attention table ({type(e).__name__}: {e})")
    elif not args.attention_at_matmul_peak:
        rates = default_attention_rates()
    for path in (args.out, args.md):  # before the run, not after it
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    result = run(configs, args.impls, args.matmul_tflops * 1e12, args.copy_gbs * 1e9, measured, rates,
                 args.fp8_tflops * 1e12 if args.fp8_tflops else None)
    md = table(result)
    print(md)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.md:
        Path(args.md).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
