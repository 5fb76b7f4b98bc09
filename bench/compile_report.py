"""Compile the Triton attention kernels for a GPU architecture on a machine without that GPU.

The launchers in ``mae_fast.kernels.flash_attention`` are run on small CPU tensors while Triton's active
driver is replaced by one that reports the chosen target (sm_90 = H100/H200 by default) and every launch is
turned into a compile-only "warmup". So each kernel is compiled exactly as the library would launch it on
that GPU: same launch configs (``pick_config`` for CUDA), same dot precision, same argument specialisation.
ptxas then reports registers, spills and shared memory, and the PTX shows whether the dots became Hopper
``wgmma`` instructions.

Why: register spills and shared-memory overflows are decided at compile time, so they can be found (and
CI can keep them out) without a GPU. A kernel that spills to local memory is slow however it is tuned.

    python bench/compile_report.py                      # MAE head dims, bf16, dense and packed -> table
    python bench/compile_report.py --head-dims 80 88 --json out.json
    python bench/compile_report.py --head-dims 80 --tiling equal  # a launch option of the kernels (TILINGS)
    python bench/compile_report.py --arch 100           # Blackwell

Needs triton's NVIDIA backend (ptxas ships with triton); no GPU, no CUDA driver.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as triton_driver
from triton.runtime.jit import JITFunction

MAE_HEAD_DIMS = (32, 40, 64, 80, 88, 96, 128)
# Hopper and Blackwell datacenter parts: 228 KiB shared memory per SM, at most 227 KiB per block.
MAX_SHARED_BYTES = {90: 227 * 1024, 100: 227 * 1024}
MAX_REGISTERS = 255


@dataclass
class KernelReport:
    kernel: str
    head_dim: int
    dtype: str
    packed: bool
    config: dict
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    wgmma: int
    async_copies: int  # cp.async / TMA instructions: loads staged through shared memory (pipelined)
    ptxas: str = field(repr=False)
    tiling: str = "single"  # the launchers' head-dim tiling (mae_fast.kernels.flash_attention.TILINGS)

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


class _TargetOnlyDriver:
    """Just enough of a Triton driver for compiling: a target, a device id, no launches."""

    def __init__(self, target: GPUTarget, real):
        self._target, self._real = target, real

    def get_current_target(self):
        return self._target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def __getattr__(self, name):  # anything else (type maps, ...) from the real CUDA driver class
        return getattr(self._real, name)


@contextlib.contextmanager
def compile_only(arch: int):
    """Within: Triton launches compile for ``sm_<arch>`` and record ``(name, CompiledKernel, kwargs)``."""
    from triton.backends.nvidia.driver import CudaDriver

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # the kernels would be interpreter functions
        raise RuntimeError("compile_report compiles kernels: run it without TRITON_INTERPRET")
    compiled: list[tuple[str, object, dict]] = []
    real_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel, kwargs))
        return kernel

    real = CudaDriver.__new__(CudaDriver)  # no __init__: it would load libcuda
    previous = triton_driver._active  # None until a real driver was created; creating one needs libcuda
    triton_driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", arch, 32), real))
    JITFunction.run = run
    try:
        yield compiled
    finally:
        JITFunction.run = real_run
        triton_driver._active = previous


def _ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_resources(ptx: str, arch: int) -> tuple[int, int, int, str]:
    """(registers, spill store bytes, spill load bytes, ptxas -v text) for one kernel's PTX."""
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas_path(), f"-arch=sm_{arch}{suffix}", "-v", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"ptxas failed for sm_{arch}:\n{res.stderr[-2000:]}")
    text = res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else 0,
            int(spill.group(2)) if spill else 0, text.strip())


def _launch_all(fa, head_dim: int, dtype: torch.dtype, packed: bool, seqlen: int, config=None,
                backward=True, tiling="single") -> None:
    """Call the forward and backward launchers as a CUDA run would (configs and precision for CUDA).

    ``config`` (optional) replaces the library's launch config of the forward, dK/dV and dQ kernels.
    """
    heads = 2
    if packed:
        cu = torch.tensor([0, seqlen - 3, 2 * seqlen - 3], dtype=torch.int32)
        q, k, v, do = (torch.randn(int(cu[-1]), heads, head_dim, dtype=dtype) for _ in range(4))
        max_seqlen = seqlen
    else:
        cu = None
        q, k, v, do = (torch.randn(2, seqlen, heads, head_dim, dtype=dtype) for _ in range(4))
        max_seqlen = None
    out, lse = fa.flash_attn_forward(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen, config=config, tiling=tiling)
    if backward:
        fa.flash_attn_backward(do, q, k, v, out, lse, cu_seqlens=cu, max_seqlen=max_seqlen,
                               configs=config and {"dkdv": config, "dq": config}, tiling=tiling)


@contextlib.contextmanager
def _as_if_cuda(fa):
    """The launchers pick configs and dot precision from the tensors' device: answer for CUDA."""
    cuda = torch.device("cuda")
    real_pick, real_prec = fa.pick_config, fa._dot_precision
    fa.pick_config = lambda kind, hd, n, dtype, device, tiling="single": real_pick(kind, hd, n, dtype, cuda, tiling)
    fa._dot_precision = lambda dtype, device: real_prec(dtype, cuda)
    try:
        yield
    finally:
        fa.pick_config, fa._dot_precision = real_pick, real_prec


_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def _compile_rows(fa, arch, hd, dt, pk, seqlen, config=None, backward=True, tiling="single") -> list[KernelReport]:
    with compile_only(arch) as compiled, _as_if_cuda(fa):
        _launch_all(fa, hd, dt, pk, seqlen, config, backward, tiling)
    rows = []
    for name, kernel, kwargs in compiled:
        regs, st, ld, text = ptxas_resources(kernel.asm["ptx"], arch)
        cfg = {k: kwargs[k] for k in _CONFIG_KEYS if k in kwargs}
        rows.append(KernelReport(
            kernel=name, head_dim=hd, dtype=str(dt).replace("torch.", ""), packed=pk, config=cfg,
            registers=regs, spill_store_bytes=st, spill_load_bytes=ld, shared_bytes=int(kernel.metadata.shared),
            wgmma=kernel.asm["ptx"].count("wgmma.mma_async"), async_copies=kernel.asm["ptx"].count("cp.async"),
            ptxas=text, tiling=tiling))
    return rows


def report(head_dims=MAE_HEAD_DIMS, dtypes=(torch.bfloat16,), packed=(False, True), arch: int = 90,
           seqlen: int = 4625, tiling: str = "single") -> list[KernelReport]:
    """Every kernel with the library's own launch configs for ``sm_<arch>``."""
    from mae_fast.kernels import flash_attention as fa

    return [r for hd in head_dims for dt in dtypes for pk in packed
            for r in _compile_rows(fa, arch, hd, dt, pk, seqlen, tiling=tiling)]


SEARCH_SPACE = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
                for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3)]


def search(head_dims, arch: int = 90, dtype=torch.bfloat16, space=SEARCH_SPACE, tiling: str = "single"
           ) -> list[KernelReport]:
    """Every candidate launch config of the forward, dK/dV and dQ kernels (dense), for picking spill-free ones."""
    from mae_fast.kernels import flash_attention as fa

    rows = []
    for hd in head_dims:
        for cfg in space:
            rows += [r for r in _compile_rows(fa, arch, hd, dtype, False, 4625, dict(cfg), tiling=tiling)
                     if r.kernel != "_bwd_delta_kernel"]
    return rows


KERNEL_KIND = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq"}


def config_key(cfg: dict) -> tuple:
    return tuple(cfg[k] for k in _CONFIG_KEYS)


def spill_free(rows) -> dict[tuple[str, int], set[tuple]]:
    """(kind, head-dim bucket) -> configs (BLOCK_M, BLOCK_N, num_warps, num_stages) that spilled no register
    for ANY head dim of that bucket they were compiled for. ``rows``: KernelReports or their JSON dicts."""
    from mae_fast.kernels.flash_attention import _bucket, head_dim_tiles

    seen: dict[tuple[str, int], dict[tuple, bool]] = {}
    for r in rows:
        r = asdict(r) if isinstance(r, KernelReport) else r
        kind = KERNEL_KIND.get(r["kernel"])
        if kind is None:
            continue
        by_cfg = seen.setdefault((kind, _bucket(sum(head_dim_tiles(r["head_dim"], r.get("tiling", "single"))))), {})
        key = config_key(r["config"])
        clean = r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0
        by_cfg[key] = by_cfg.get(key, True) and clean
    return {k: {c for c, clean in v.items() if clean} for k, v in seen.items()}


def format_table(rows: list[KernelReport]) -> str:
    lines = ["| kernel | hd | dtype | packed | BLOCK_M x BLOCK_N / warps / stages | regs | spill st/ld (B) | "
             "smem (KiB) | wgmma | cp.async |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.config
        cfg = f"{c.get('BLOCK_M', '-')} x {c.get('BLOCK_N', '-')} / {c.get('num_warps', '-')} / " \
              f"{c.get('num_stages', '-')}"
        lines.append(f"| {r.kernel} | {r.head_dim} | {r.dtype} | {'yes' if r.packed else 'no'} | {cfg} | "
                     f"{r.registers} | {r.spill_store_bytes}/{r.spill_load_bytes} | {r.shared_bytes / 1024:.0f} | "
                     f"{r.wgmma} | {r.async_copies} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    p.add_argument("--head-dims", type=int, nargs="+", default=list(MAE_HEAD_DIMS))
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    p.add_argument("--dense-only", action="store_true")
    p.add_argument("--tiling", default="single", choices=["single", "wrap", "equal"],
                   help="head-dim tiling the launchers use (single: what mae_fast.ops.attention launches)")
    p.add_argument("--search", action="store_true",
                   help="compile every config of SEARCH_SPACE instead of the library's (bf16, dense)")
    p.add_argument("--json", help="write the rows (with ptxas output) here")
    a = p.parse_args(argv)
    if a.search:
        rows = search(a.head_dims, a.arch, tiling=a.tiling)
    else:
        rows = report(a.head_dims, tuple(getattr(torch, d) for d in a.dtypes),
                      (False,) if a.dense_only else (False, True), a.arch, tiling=a.tiling)
    print(format_table(rows))
    smem_limit = MAX_SHARED_BYTES.get(a.arch, 227 * 1024)
    over_smem = sum(r.shared_bytes > smem_limit for r in rows)
    print(f"\n{len(rows)} kernels compiled for sm_{a.arch} with triton {triton.__version__}: "
          f"{sum(r.spills for r in rows)} spill registers, {over_smem} over shared memory")
    bad = any(r.spills for r in rows) or over_smem
    if a.json:
        meta = dict(arch=a.arch, triton=triton.__version__, torch=torch.__version__, tiling=a.tiling)
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, rows=[asdict(r) for r in rows]), f, indent=1)
    return 1 if bad and not a.search else 0


if __name__ == "__main__":
    sys.exit(main())
