"""One prepared GPU run for a 15-minute device window: one call of at most 540 s, with a hard deadline per phase.

    run(command="python bench/gpu_plan.py", carry=["bench/wheelhouse"], timeout_s=600)   # the device call
    python bench/gpu_plan.py --dry-run --out /tmp/plan       # the same plan on the CPU, tiny shapes, in seconds
    python bench/gpu_plan.py --commit-to bench/results --from DIR   # afterwards, here: file a fetched run

Phases, in order (each records its status, seconds and limit; a phase past its deadline is cut and the plan goes
on, so the whole run ends within ``--budget-s``; results are rewritten after every unit of work, so a cut keeps
what was measured):

- ``install``: the project (``pip install --no-deps .``) and the wheelhouse ``bench/wheelhouse`` (flash-attn-4
  and its CuTe-DSL runtime, torchao: what the GPU image lacks; ``bench/make_wheelhouse.sh`` fills it), with
  ``pip install --no-index --find-links``; skipped when absent (and in ``--dry-run``).
- ``autotune``: the Triton attention's pre-pruned launch configs (``candidate_configs``) at the real MAE shapes
  (:data:`AUTOTUNE_SHAPES`), each kernel (fwd, dkdv, dq) timed per candidate; the fastest per (kernel, head dim,
  length) go to ``flash_attention_tuned.json`` (``save_tuned``).
- ``backends``: every attention backend (the SDPA kernels one by one, triton, flash_attn, flash_attn_4, xformers)
  at those shapes, fwd and fwd+bwd, each checked against an fp64 reference (error within 3x PyTorch's own bf16
  error + 1e-3, else its time is dropped); the rows become ``attention.json`` and a regenerated
  ``attention_prefs.json`` (the table ``auto`` ranks backends with).
- ``e2e``: interleaved training steps of ViT-H/14 at 476 px (batch 24), then 224 px (batch 96) as time allows:
  the reference formulation eager and compiled, mae_fast eager and compiled with attention on SDPA, compiled with
  ``auto`` (the measured best attention per shape, from this run's table), and that + ``precision: fp8``; every
  implementation's loss is first checked against mae_fast's. MFU is against the measured bf16 matmul rate, with
  the measured FP8 rate beside it.
- ``profile``: torch.profiler's table of the compiled step (``profile.txt``) and Inductor's generated code for
  one encoder block, forward and backward (``inductor_block.py``).

``--dry-run`` runs every phase on the CPU with one tiny attention shape (Triton in its interpreter) and the demo
model, each timed function once; what it leaves out is compilation (compiled rows run eagerly, no Inductor code:
a CPU compile takes minutes on a small machine) and the installs.

Everything lands in ``--out`` (default ``$OUT``): ``plan.json`` (every phase and measurement), ``plan.md``, and
the files named above: at most 8 files, as a device call returns.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

PLAN_S = 540
# seconds per phase (each also stops at the plan's end); what a phase leaves unused goes to the next ones
BUDGETS = {"install": 45, "autotune": 100, "backends": 95, "e2e": 230, "profile": 50}
DRY_BUDGETS = {"install": 5, "autotune": 20, "backends": 20, "e2e": 40, "profile": 30}
WHEELHOUSE = BENCH / "wheelhouse"
WHEELS = ("flash-attn-4", "torchao")  # what the plan installs from the wheelhouse (with their dependencies there)

# (name, head_dim, seqlen, batch, packed): the MAE attention shapes, heads 16. Encoder at 75% masking: visible
# patches + cls; ViT-H/14 head dim 80, ViT-B/L 64; the decoder (512 wide, 16 heads) head dim 32 over every patch.
# 476 px / 14 = 34 -> 1156 patches, 289 visible -> 290 tokens; 224 / 14 = 16 -> 256, 64 -> 65; 224 / 16 = 14 -> 196,
# 49 -> 50; 476 / 16 = 29 -> 841, 210 -> 211. Batches as ViT-H trains (24 at 476, 96 at 224), so timings fill the GPU.
AUTOTUNE_SHAPES = [
    ("enc ViT-H/14 476px", 80, 290, 24, False), ("enc ViT-H/14 224px", 80, 65, 96, False),
    ("dec /14 476px", 32, 1157, 24, False), ("enc ViT-L/14 476px", 64, 290, 32, False),
    ("dec /14 224px", 32, 257, 96, False), ("enc ViT-B/16 224px", 64, 50, 256, False),
    ("enc ViT-B/16 476px", 64, 211, 64, False), ("dec /16 224px", 32, 197, 256, False),
]
DRY_SHAPES = [("dry enc", 40, 17, 2, False)]
HEADS, DRY_HEADS = 16, 2
E2E_CONFIGS = [("mae_vit_huge_patch14", 476, 24), ("mae_vit_huge_patch14", 224, 96)]
DRY_E2E = [("mae_vit_demo_patch8", 32, 2)]
# the e2e rows: (row name, model, compiled, forced attention backend, fp8), highest value first
E2E_KINDS = [("reference", "reference", False, None, False), ("reference+compile", "reference", True, None, False),
             ("mae_fast", "mae_fast", False, "sdpa", False), ("mae_fast+compile", "mae_fast", True, "sdpa", False),
             ("mae_fast+compile+auto_attention", "mae_fast", True, None, False),
             ("mae_fast+compile+auto_attention+fp8", "fp8", True, None, True)]


class PhaseTimeout(Exception):
    """A phase ran into its deadline."""


class Plan:
    """The run's record: phases with status and timing, their results, rewritten to ``plan.json`` as it goes."""

    min_phase_s = 3.0  # a phase with less time than this is skipped

    def __init__(self, out: Path, budget_s: float, dry: bool):
        self.out, self.dry, self.t0 = out, dry, time.monotonic()
        self.end = self.t0 + budget_s
        self.record = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "budget_s": budget_s, "dry_run": dry, "phases": {}, "results": {}}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.end - time.monotonic()

    def save(self) -> None:
        (self.out / "plan.json").write_text(json.dumps(self.record, indent=1, default=str) + "\n")

    @contextlib.contextmanager
    def phase(self, name: str, budget: float):
        """Run a phase for at most ``budget`` seconds and never past the plan's end: SIGALRM raises
        :class:`PhaseTimeout` in it at the deadline (Python code between device calls sees it at once)."""
        limit = max(0.0, min(budget, self.left() - 2))
        rec = self.record["phases"][name] = {"status": "running", "limit_s": round(limit, 1)}
        self.save()
        if limit < self.min_phase_s:
            rec.update(status="skipped", seconds=0.0, note=f"{self.left():.0f} s left in the plan")
            self.save()
            print(f"[plan] {name}: skipped ({self.left():.0f} s left)", flush=True)
            yield None
            return
        print(f"[plan] {name}: up to {limit:.0f} s", flush=True)
        t = time.monotonic()
        old = signal.signal(signal.SIGALRM, _raise_timeout)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            yield rec
            rec["status"] = rec.get("status_override", "ok")
        except PhaseTimeout:
            rec["status"] = "cut at its deadline"
        except Exception as e:  # noqa: BLE001 - one phase failing must not lose the others
            if "PhaseTimeout" in repr(e) or isinstance(e.__cause__, PhaseTimeout):  # wrapped by a library
                rec["status"] = "cut at its deadline"
            else:
                rec["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            rec.pop("status_override", None)
            rec["seconds"] = round(time.monotonic() - t, 1)
            self.save()
            print(f"[plan] {name}: {rec['status']} in {rec['seconds']} s", flush=True)


def _raise_timeout(signum, frame):
    raise PhaseTimeout()


# ---- install ------------------------------------------------------------------------------------

def install(plan: Plan, rec: dict, wheelhouse: Path) -> None:
    """The project, then flash-attn-4 and torchao from the wheelhouse (what the image lacks; no network there)."""
    steps = []
    if not plan.dry:
        steps.append(("project", [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                  str(REPO)]))
    wheels = sorted(wheelhouse.glob("*.whl")) if wheelhouse.is_dir() else []
    if not wheels:
        rec["wheelhouse"] = f"{wheelhouse} absent or empty: flash-attn-4 and torchao only if the image has them"
    elif plan.dry:
        rec["wheelhouse"] = f"{len(wheels)} wheels in {wheelhouse}; not installed in a dry run"
    else:
        names = [w.name.split("-")[0].replace("_", "-") for w in wheels]
        wanted = [n for n in WHEELS if n in names] or names
        steps.append(("wheelhouse", [sys.executable, "-m", "pip", "install", "-q", "--pre", "--no-index",
                                     "--find-links", str(wheelhouse), *wanted]))
    for name, cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5.0, plan.left() - 5))
        rec[name] = "ok" if proc.returncode == 0 else f"rc {proc.returncode}: {proc.stderr.strip()[-400:]}"


def environment(plan: Plan) -> dict:
    import torch
    import triton

    from mae_fast.ops import backends_for
    from mae_fast.precision import fp8_unavailable

    env = {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "attention_backends": {n: b.available() or "available" for n, b in backends_for("attention").items()},
           "fp8": fp8_unavailable() or "available"}
    plan.record["environment"] = env
    return env


# ---- timing helpers -------------------------------------------------------------------------------

DRY_TIMING = False  # --dry-run: every timed function runs once (the plumbing, not a measurement)


def bench_ms(fn, device, grad_to_none=None) -> float:
    """Median ms of ``fn`` (CUDA: triton's do_bench with events; CPU: one warm-up, median of three)."""
    if DRY_TIMING:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from bench_attention import _bench

    return _bench(fn, device, grad_to_none)


def time_fwd_bwd(fn, qkv, max_seqlen, device) -> tuple[float, float]:
    """(forward ms, backward ms) of an attention backend ``fn(q, k, v, cu_seqlens, max_seqlen)``."""
    import torch

    q, k, v = (t.detach().requires_grad_(True) for t in qkv)
    with torch.no_grad():
        fwd_ms = bench_ms(lambda: fn(q, k, v, None, max_seqlen), device)
    out = fn(q, k, v, None, max_seqlen)
    do = torch.randn_like(out)
    return fwd_ms, bench_ms(lambda: out.backward(do, retain_graph=True), device, grad_to_none=[q, k, v])


def attention_inputs(shape, device, dtype, heads):
    import torch

    _, hd, n, batch, packed = shape
    g = torch.Generator(device="cpu").manual_seed(hd * 1000 + n)
    if packed:
        raise ValueError("packed shapes are not in this plan")
    return [torch.randn(batch, n, heads, hd, generator=g).to(device, dtype) for _ in range(3)]


# ---- autotune -----------------------------------------------------------------------------------

def autotune(plan: Plan, rec: dict, shapes, device, heads: int, max_candidates: int | None) -> None:
    """Time each pre-pruned candidate of each Triton attention kernel at each shape; keep the fastest."""
    import torch

    from mae_fast.kernels import flash_attention as fa

    if not hasattr(fa, "candidate_configs") or not hasattr(fa, "save_tuned"):
        rec["status_override"] = "skipped"
        rec["note"] = ("mae_fast.kernels.flash_attention has no candidate_configs/save_tuned (the launch-config "
                       "interface): nothing to autotune")
        return
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timings, best = [], []
    plan.record["results"]["autotune"] = {"timings": timings, "best": best}
    for shape in shapes:
        name, hd, n, batch, packed = shape
        q, k, v = (t.requires_grad_(True) for t in attention_inputs(shape, device, dtype, heads))
        do = torch.randn_like(q)
        flops = 4.0 * batch * heads * n * n * hd
        for kernel, cands in fa.candidate_configs(hd, n, packed=packed).items():
            fastest = None
            for cfg in cands[:max_candidates]:
                row = dict(shape=name, kernel=kernel, head_dim=hd, seqlen=n, config=cfg)
                try:
                    row["ms"] = _time_kernel(fa, kernel, cfg, q, k, v, do, device)
                    row["tflops"] = (flops if kernel == "fwd" else 2.5 * flops) / row["ms"] / 1e9
                except PhaseTimeout:
                    raise
                except Exception as e:  # noqa: BLE001 - a candidate that fails is a result
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                timings.append(row)
                if "ms" in row and (fastest is None or row["ms"] < fastest["ms"]):
                    fastest = row
                plan.save()
            if fastest is not None:
                best.append({k: fastest[k] for k in ("kernel", "head_dim", "seqlen", "config", "ms", "tflops")})
        del q, k, v, do
        if best:  # after every shape: a cut at the deadline keeps the shapes done
            rec["tuned_table"] = str(fa.save_tuned(best, plan.out / "flash_attention_tuned.json"))


def _time_kernel(fa, kernel, cfg, q, k, v, do, device) -> float:
    """ms of the forward (``fwd``) or of the whole backward (``dkdv``/``dq``, the other kernel at its default)."""
    import torch

    if kernel == "fwd":
        with torch.no_grad():
            return bench_ms(lambda: fa.flash_attention(q, k, v, config={kernel: cfg}), device)
    out = fa.flash_attention(q, k, v, config={kernel: cfg})
    return bench_ms(lambda: out.backward(do, retain_graph=True), device, grad_to_none=[q, k, v])


# ---- every attention backend ----------------------------------------------------------------------

def attention_backends(plan: Plan, rec: dict, shapes, device, heads: int) -> None:
    """Every backend at every shape: fwd and bwd ms, after a check against fp64; rows as bench_attention.py."""
    import torch

    from bench_attention import backends

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    result = {"device": plan.record["environment"]["device"], "dtype": str(dtype).replace("torch.", ""),
              "torch": torch.__version__, "results": rows, "source": "bench/gpu_plan.py"}
    plan.record["results"]["attention"] = result
    for shape in shapes:
        name, hd, n, batch, packed = shape
        qkv = attention_inputs(shape, device, dtype, heads)
        flops = 4.0 * batch * heads * n * n * hd
        row = dict(name=name, seqlen=n, head_dim=hd, heads=heads, batch=batch, dtype=result["dtype"],
                   fwd_flops=flops, fwd_ms={}, bwd_ms={}, fwd_tflops={}, bwd_tflops={}, errors={}, checks={})
        for bname, fn in backends(device, include_reference=False).items():
            try:
                err = check_backend(fn, qkv, device, dtype)
                if not all(a <= 3 * b + 1e-3 for a, b in err.values()):
                    row["errors"][bname] = f"check failed: {err}"
                    continue
                row["checks"][bname] = err  # (failed backends' times are never recorded)
                f_ms, b_ms = time_fwd_bwd(fn, qkv, n, device)
            except PhaseTimeout:
                raise
            except Exception as e:  # noqa: BLE001 - a backend refusing a shape is a result
                row["errors"][bname] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                continue
            row["fwd_ms"][bname], row["bwd_ms"][bname] = f_ms, b_ms
            row["fwd_tflops"][bname], row["bwd_tflops"][bname] = flops / f_ms / 1e9, 2.5 * flops / b_ms / 1e9
        rows.append(row)
        (plan.out / "attention.json").write_text(json.dumps(result, indent=1) + "\n")
        write_plan_prefs(plan, rec)  # after every shape: a cut at the deadline keeps the shapes done
        plan.save()
        del qkv


def check_backend(fn, qkv, device, dtype) -> dict:
    """{out, dq, dk, dv: (backend's relative error, PyTorch's own error in ``dtype``)} against fp64 math, on two
    sequences of the shape (fresh random inputs)."""
    import torch

    from mae_fast.ops.attention import attention_reference

    q, k, v = (torch.randn_like(t[:2]) for t in qkv)
    do = torch.randn_like(q)

    def grads(f, cast):
        ins = [t.detach().to(cast).requires_grad_(True) for t in (q, k, v)]
        out = f(*ins)
        out.backward(do.to(cast))
        return [out.detach().double()] + [t.grad.double() for t in ins]

    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32  # fp64 matmuls crawl on GPUs: fp32 there
    ref = grads(lambda a, b, c: attention_reference(a, b, c, upcast=False), ref_dtype)
    low = grads(lambda a, b, c: attention_reference(a, b, c, upcast=False), dtype)
    got = grads(lambda a, b, c: fn(a, b, c, None, a.shape[1]), dtype)
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    return {n: (rel(g, r), rel(lo, r)) for n, g, lo, r in zip(("out", "dq", "dk", "dv"), got, low, ref)}


def write_plan_prefs(plan: Plan, rec: dict) -> None:
    from bench_attention import write_prefs

    prefs = write_prefs([plan.out / "attention.json"], plan.out / "attention_prefs.json")
    prefs["generated_by"] = "bench/gpu_plan.py (bench_attention.write_prefs)"
    (plan.out / "attention_prefs.json").write_text(json.dumps(prefs, indent=1) + "\n")
    rec["prefs"] = str(plan.out / "attention_prefs.json")


# ---- end to end -----------------------------------------------------------------------------------

class Row:
    """One e2e row: a bench/e2e.py Stepper, compiled with ``compile_backend`` when asked, its attention backend
    forced with ``use_backend`` while it runs (None: ``auto``)."""

    def __init__(self, name, kind, model, batch, device, compiled, forced, compile_backend):
        import torch

        from e2e import Stepper

        self.name, self.forced, self.compiled = name, forced, compiled
        self.st = Stepper(kind, model, batch, device, False)
        if compiled and compile_backend is not None:  # None (--dry-run): the row runs eagerly
            self.st.fwd = torch.compile(model, backend=compile_backend)
        self.first_s = None

    def _ctx(self):
        from mae_fast.ops import use_backend

        return use_backend(attention=self.forced) if self.forced else contextlib.nullcontext()

    def __call__(self) -> float:
        with self._ctx():
            return self.st()

    def warm(self, n: int) -> None:
        t = time.perf_counter()
        self()
        self.first_s = time.perf_counter() - t  # compiled: the cold start (compilation) is in here
        for _ in range(n - 1):
            self()

    def peak_memory_gib(self):
        with self._ctx():
            return self.st.peak_memory_gib()


def measured_fp8_flops(device) -> float | None:
    """Dense FP8 (e4m3) matmul rate through torch._scaled_mm on GPUs with FP8 tensor cores (None elsewhere)."""
    import torch

    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return None
    n = 8192
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=device)
    ms = bench_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), device)
    return 2 * n**3 / (ms * 1e-3)


def _small_matmul_flops() -> float:
    import torch

    a = torch.randn(256, 256)
    t = time.perf_counter()
    a @ a
    return 2 * 256**3 / max(time.perf_counter() - t, 1e-9)


def build_rows(name, img, batch, device, kinds, compile_backend, fp8_min_width, deadline, log) -> dict:
    """The rows of one configuration, built and warmed in order while the phase has time for them (a compile that
    would leave no time to measure is not started); the loss of each model is checked against mae_fast's."""
    import e2e as E
    from mae_fast.precision import convert_fp8, fp8_unavailable

    ours, ref = E.build_pair(name, img, device)
    models = {"mae_fast": ours, "reference": ref}
    log["loss_diff_reference"] = E.check_same_loss(models, device)["reference"]
    if any(k[4] for k in kinds):
        if fp8_unavailable():
            log["fp8"] = fp8_unavailable()
        else:
            models["fp8"] = copy.deepcopy(ours)
            log["fp8_linears"] = len(convert_fp8(models["fp8"], fp8_min_width, device=device))
            try:  # FP8 rounds: within check_same_loss's 2e-3 (relative) of the same model in high precision
                diff = E.check_same_loss({"mae_fast": ours, "mae_fast_fp8": models["fp8"]}, device)
                log["loss_diff_fp8"] = diff["mae_fast_fp8"]
            except RuntimeError as e:
                log["fp8"] = f"dropped: {e}"
                del models["fp8"]
    rows = {}
    for row_name, key, compiled, forced, _ in kinds:
        if key not in models:
            continue
        left = deadline - time.monotonic()
        if rows and left < (90 if compiled and device.type == "cuda" else 5):
            log.setdefault("not_started", []).append(row_name)
            continue
        row = Row(row_name, "reference" if key == "reference" else "mae_fast", models[key], batch, device,
                  compiled, forced, compile_backend)
        row.warm(1 if DRY_TIMING else 3)
        rows[row_name] = row
        print(f"  {row_name}: first step {row.first_s:.1f} s", flush=True)
    return rows, ours


def e2e_config(plan: Plan, rec: dict, config, device, kinds, steps, compile_backend, fp8_min_width,
               keep: dict | None) -> None:
    """Interleaved steps of every row of one configuration (bench/e2e.py's alternating rounds)."""
    import e2e as E
    from mae_fast.models import mae_train_flops

    name, img, batch = config
    deadline = rec["deadline"]
    res = plan.record["results"].setdefault("e2e", {"rows": []})
    if "matmul_tflops" not in res:
        res["matmul_tflops"] = (E.measured_matmul_flops(device) if not DRY_TIMING else _small_matmul_flops()) / 1e12
        fp8 = measured_fp8_flops(device)
        res["fp8_matmul_tflops"] = fp8 / 1e12 if fp8 else None
    log = rec.setdefault("configs", {}).setdefault(f"{name}:{img}", {})
    rows, ours = build_rows(name, img, batch, device, kinds, compile_backend, fp8_min_width, deadline, log)
    per_round = sum(statistics.median([r() for _ in range(1)]) for r in rows.values())
    n = max(2, min(steps, int((deadline - time.monotonic() - 10) / max(per_round, 1e-3))))
    times = E.time_interleaved(rows, n, 0)
    flops = mae_train_flops(ours, 0.75) * batch
    base = {k: statistics.median(v) for k, v in times.items()}
    for k, ts in times.items():
        med = base[k]
        res["rows"].append(dict(model=name, img_size=img, batch=batch, impl=k, compiled=rows[k].compiled,
                                attention=rows[k].forced or "auto", step_ms_median=med * 1e3,
                                step_ms_all=[t * 1e3 for t in ts], images_per_s=batch / med,
                                mfu=flops / med / (res["matmul_tflops"] * 1e12),
                                first_step_s=rows[k].first_s,
                                speedup_vs_reference=base.get("reference", math.nan) / med,
                                speedup_vs_reference_compiled=base.get("reference+compile", math.nan) / med))
        plan.save()
    for k, row in rows.items():  # peak memory last: one step each, after the timing
        match = [r for r in res["rows"] if r["impl"] == k and r["img_size"] == img]
        match[-1]["peak_mem_gib"] = row.peak_memory_gib()
        plan.save()
    if keep is not None:
        keep.update(rows)


# ---- profile and generated code --------------------------------------------------------------------

def profile_and_codegen(plan: Plan, rec: dict, rows: dict, device, compile_backend, dry: bool) -> None:
    """The compiled step's profiler table (``profile.txt``) and Inductor's code for one encoder block."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    row = rows.get("mae_fast+compile+auto_attention") or next(iter(rows.values()), None)
    if row is not None:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(2):
                row()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        (plan.out / "profile.txt").write_text(f"{row.name}, 2 steps\n" + prof.key_averages().table(
            sort_by=sort, row_limit=40, max_name_column_width=90) + "\n")
        rec["profile"] = row.name
        model = row.st.model
    else:
        import mae_fast

        model = mae_fast.create_model(DRY_E2E[0][0], img_size=DRY_E2E[0][1]).to(device)
    if compile_backend is None:
        rec["inductor_graphs"] = "dry run: no Inductor compile"
        return
    from torch._inductor.utils import run_and_get_code

    block = copy.deepcopy(model.blocks[0])
    x = torch.randn(2, 17 if dry else 290, block.norm1.normalized_shape[0], device=device, requires_grad=True)
    compiled = torch.compile(block, backend="inductor")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with amp:
            out = compiled(x)
        out.float().sum().backward()

    _, code = run_and_get_code(step)
    (plan.out / "inductor_block.py").write_text("\n\n# ---- next graph ----\n\n".join(code) + "\n")
    rec["inductor_graphs"] = len(code)


# ---- the plan -------------------------------------------------------------------------------------

def run_plan(args) -> dict:
    global DRY_TIMING
    dry = DRY_TIMING = args.dry_run
    if dry:  # Triton kernels in the CPU interpreter; must be set before mae_fast is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    budgets = dict(DRY_BUDGETS if dry else BUDGETS)
    plan = Plan(Path(args.out), args.budget_s, dry)
    with plan.phase("install", budgets["install"]) as rec:
        if rec is not None:
            install(plan, rec, Path(args.wheelhouse))
    import torch

    if dry:  # tiny shapes gain nothing from more threads, and a shared CPU loses to their spinning
        torch.set_num_threads(1)
    env = environment(plan)
    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    shapes, heads = (DRY_SHAPES, DRY_HEADS) if dry else (AUTOTUNE_SHAPES, HEADS)
    with plan.phase("autotune", budgets["autotune"]) as rec:
        if rec is not None:
            autotune(plan, rec, shapes, device, heads, 2 if dry else None)
    with plan.phase("backends", budgets["backends"]) as rec:
        if rec is not None:
            attention_backends(plan, rec, shapes, device, heads)
    prefs = plan.out / "attention_prefs.json"
    if prefs.exists():  # auto ranks attention backends by this run's measurements from here on
        from mae_fast.ops.attention import attention_prefs

        os.environ["MAE_FAST_ATTENTION_PREFS"] = str(prefs)
        attention_prefs.cache_clear()
    configs = DRY_E2E if dry else E2E_CONFIGS
    compile_backend = None if dry else "inductor"  # a CPU compile of even the tiny model takes minutes here
    kept: dict = {}
    steps = 2 if dry else args.steps
    for i, config in enumerate(configs):
        kinds = E2E_KINDS if i == 0 else [k for k in E2E_KINDS if k[0] in ("reference", "mae_fast",
                                                                            "mae_fast+compile+auto_attention")]
        with plan.phase(f"e2e_{config[1]}", budgets["e2e"] if i == 0 else budgets["e2e"] // 3) as rec:
            if rec is not None:
                rec["deadline"] = time.monotonic() + rec["limit_s"]
                e2e_config(plan, rec, config, device, kinds, steps, compile_backend,
                           64 if dry else args.fp8_min_width, kept if i == 0 else None)  # dry: the demo's 128
                rec.pop("deadline", None)
        if i == 0:
            with plan.phase("profile", budgets["profile"]) as rec:
                if rec is not None:
                    profile_and_codegen(plan, rec, kept, device, compile_backend, dry)
            kept.clear()
            _release(device)
    for rec in plan.record["phases"].values():
        rec.pop("deadline", None)
    plan.record["total_s"] = round(time.monotonic() - plan.t0, 1)
    plan.save()
    (plan.out / "plan.md").write_text(summary(plan.record) + "\n")
    print(summary(plan.record), flush=True)
    return plan.record


def _release(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summary(record: dict) -> str:
    env = record.get("environment", {})
    lines = [f"# GPU plan {record['date']}{' (dry run)' if record['dry_run'] else ''}: {env.get('device')}, "
             f"torch {env.get('torch')}, triton {env.get('triton')}", "",
             "| phase | status | s | limit s |", "|---|---|---|---|"]
    for name, p in record["phases"].items():
        lines.append(f"| {name} | {p['status']} | {p.get('seconds', '-')} | {p.get('limit_s', '-')} |")
    att = record["results"].get("attention", {}).get("results", [])
    if att:
        lines += ["", "| shape | head dim | seqlen | fastest fwd+bwd | ms | TFLOP/s fwd | sdpa best ms | refused |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in att:
            train = {b: r["fwd_ms"][b] + r["bwd_ms"][b] for b in r["fwd_ms"]}
            sdpa = [t for b, t in train.items() if b.startswith("sdpa")]
            best = min(train, key=train.get) if train else "-"
            lines.append(f"| {r['name']} | {r['head_dim']} | {r['seqlen']} | {best} | "
                         f"{train.get(best, math.nan):.3f} | {r['fwd_tflops'].get(best, math.nan):.0f} | "
                         f"{min(sdpa) if sdpa else math.nan:.3f} | {', '.join(sorted(r['errors'])) or '-'} |")
    e2e = record["results"].get("e2e", {})
    if e2e.get("rows"):
        fp8 = e2e.get("fp8_matmul_tflops")
        lines += ["", f"MFU against the measured bf16 matmul rate, {e2e['matmul_tflops']:.0f} TFLOP/s (FP8 measured: "
                  f"{f'{fp8:.0f} TFLOP/s' if fp8 else 'n/a'}).", "",
                  "| model | px | batch | impl | ms | img/s | MFU | x reference | x reference compiled | peak GiB | "
                  "first step s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in e2e["rows"]:
            peak = r.get("peak_mem_gib")
            lines.append(f"| {r['model'].replace('mae_vit_', '')} | {r['img_size']} | {r['batch']} | {r['impl']} | "
                         f"{r['step_ms_median']:.1f} | {r['images_per_s']:.1f} | {100 * r['mfu']:.1f}% | "
                         f"{r['speedup_vs_reference']:.2f} | {r['speedup_vs_reference_compiled']:.2f} | "
                         f"{'-' if peak is None else f'{peak:.1f}'} | {r['first_step_s']:.1f} |")
    return "\n".join(lines)


# ---- filing a fetched run ---------------------------------------------------------------------------

def commit(src: Path, dest: Path) -> list[Path]:
    """Copy a fetched plan's files into ``dest`` (bench/results) named after device and date; merge its attention
    rows into the packaged preference table and its tuned configs into the Triton kernels' table."""
    record = json.loads((src / "plan.json").read_text())
    if record.get("dry_run"):
        raise ValueError(f"{src / 'plan.json'} is a dry run: nothing measured to file")
    device = record.get("environment", {}).get("device") or "unknown"
    stem = f"{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}-{record['date'][:10]}-gpu-plan"
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, suffix in (("plan.json", ".json"), ("plan.md", ".md"), ("attention.json", "-attention.json"),
                         ("profile.txt", "-profile.txt"), ("inductor_block.py", "-inductor-block.py.txt")):
        if (src / name).exists():
            written.append(dest / f"{stem}{suffix}")
            shutil.copyfile(src / name, written[-1])
    if (src / "attention.json").exists():
        from bench_attention import write_prefs

        from mae_fast.ops.attention import PREFS_PATH

        old = json.loads(PREFS_PATH.read_text()).get("sources", []) if PREFS_PATH.exists() else []
        sources = [s for s in old if (REPO / s).exists()] + [str((dest / f"{stem}-attention.json").relative_to(REPO))
                                                              if dest.resolve().is_relative_to(REPO)
                                                              else str(dest / f"{stem}-attention.json")]
        cwd = os.getcwd()
        os.chdir(REPO)  # the table names its sources relative to the repository
        try:
            write_prefs(sources, PREFS_PATH)
        finally:
            os.chdir(cwd)
        written.append(PREFS_PATH)
    tuned = src / "flash_attention_tuned.json"
    if tuned.exists():
        from mae_fast.kernels import flash_attention as fa

        if hasattr(fa, "save_tuned"):
            written.append(fa.save_tuned(json.loads(tuned.read_text())["rows"]))
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the same plan on the CPU: tiny shapes and model")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_plan_out"), help="where the files go ($OUT)")
    ap.add_argument("--budget-s", type=float, default=PLAN_S, help=f"the whole plan's seconds ({PLAN_S})")
    ap.add_argument("--wheelhouse", default=str(WHEELHOUSE), help="wheels to install first (skipped if absent)")
    ap.add_argument("--steps", type=int, default=12, help="timed rounds per e2e configuration (fewer if time is short)")
    ap.add_argument("--fp8-min-width", type=int, default=1024, help="as the trainer's fp8_min_width")
    ap.add_argument("--commit-to", metavar="DIR", help="file a fetched run (--from) into DIR (bench/results)")
    ap.add_argument("--from", dest="src", metavar="DIR", help="with --commit-to: the fetched files' folder")
    args = ap.parse_args(argv)
    if args.commit_to:
        if not args.src:
            ap.error("--commit-to needs --from DIR (the folder the device call's files were fetched to)")
        try:
            for path in commit(Path(args.src), Path(args.commit_to)):
                print(f"wrote {path}")
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"--from {args.src}: {e}")
        return 0
    if args.budget_s <= 0 or args.budget_s > 590:
        ap.error(f"--budget-s must be in (0, 590], got {args.budget_s}")
    record = run_plan(args)
    return 0 if all(not p["status"].startswith("failed") for p in record["phases"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
