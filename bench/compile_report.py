"""Compile the Triton attention kernels for a GPU architecture on a machine without that GPU.

The launchers in ``mae_fast.kernels.flash_attention`` are run on small CPU tensors while Triton's active
driver is replaced by one that reports the chosen target (sm_90 = H100/H200 by default) and every launch is
turned into a compile-only "warmup". So each kernel is compiled exactly as the library would launch it on
that GPU: same launch configs (``pick_config`` for CUDA), same dot precision, same argument specialisation.
ptxas then reports registers, spills and shared memory, and the PTX shows whether the dots became Hopper
``wgmma`` instructions, whether loads are staged through shared memory (cp.async / TMA: pipelined) and how wide
they are (16-byte vectors, or element-wise 2-byte loads).

Why: register spills, shared-memory overflows and unpipelined loads are decided at compile time, so they can be
found (and CI can keep them out) without a GPU. A kernel that spills to local memory is slow however it is tuned.

    python bench/compile_report.py                      # MAE head dims, bf16, dense and packed, 290 and 1157 tokens
    python bench/compile_report.py --head-dims 80 88 --json out.json --md out.md
    python bench/compile_report.py --check              # exit 1 unless every row is clean (see problems())
    python bench/compile_report.py --candidates         # every config of candidate_configs, not only the pick
    python bench/compile_report.py --search             # the space the candidates were pruned from
    python bench/compile_report.py --head-dims 80 --tiling single  # a launch option of the kernels (TILINGS)
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
    tiling: str = "split"  # the kernel's head-dim tiling (mae_fast.kernels.flash_attention.TILINGS; "-": none)
    seqlen: int = 0  # the sequence length launched (the launcher's config depends on it)
    tiles: list = field(default_factory=list)  # (D0, DM, D1): column tiles (head_dim_tiles)
    tma: int = 0  # cp.async.bulk.tensor instructions (TMA)
    vector_loads: int = 0  # 16-byte global loads (ld.global.v4.b32 / cp.async 16)
    narrow_loads: int = 0  # global loads narrower than 4 bytes: element-wise, not vectorised

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
                backward=True, tiling=None) -> None:
    """Call the forward and backward launchers as a CUDA run would (configs and precision for CUDA).

    ``config`` (optional): {kernel: launch config} replacing the library's pick for each kernel it names
    ("fwd", "dkdv", "dq"), as ``flash_attention(config=...)`` takes it.
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
    config = config or {}
    out, lse = fa.flash_attn_forward(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen, config=config.get("fwd"),
                                     tiling=tiling)
    if backward:
        fa.flash_attn_backward(do, q, k, v, out, lse, cu_seqlens=cu, max_seqlen=max_seqlen, configs=config,
                               tiling=tiling)


@contextlib.contextmanager
def _as_if_cuda(fa):
    """The launchers pick configs and dot precision from the tensors' device: answer for CUDA."""
    cuda = torch.device("cuda")
    real_pick, real_prec = fa.pick_config, fa._dot_precision
    fa.pick_config = lambda kind, hd, n, dtype, device, tiling=None, packed=False: real_pick(kind, hd, n, dtype, cuda,
                                                                                              tiling, packed)
    fa._dot_precision = lambda dtype, device: real_prec(dtype, cuda)
    try:
        yield
    finally:
        fa.pick_config, fa._dot_precision = real_pick, real_prec


_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
KERNEL_KIND = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq",
               "_bwd_delta_kernel": "delta"}
# global loads in PTX: plain (ld.global[.v2|.v4].<type>) and staged through shared memory (cp.async ..., <bytes>)
_LD = re.compile(r"\bld\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s")
_CP = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\s*\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-fA-F]+|\d+)")
_ptxas_cache: dict[int, tuple] = {}


def load_widths(ptx: str) -> dict[int, int]:
    """{bytes per load instruction: count} over the PTX's global loads (ld.global and cp.async)."""
    widths: dict[int, int] = {}
    for m in _LD.finditer(ptx):
        w = int(m.group(1) or 1) * int(m.group(2)) // 8
        widths[w] = widths.get(w, 0) + 1
    for m in _CP.finditer(ptx):
        w = int(m.group(1), 0)
        widths[w] = widths.get(w, 0) + 1
    return widths


def _row(name, kernel, kwargs, hd, dt, pk, seqlen, arch, tiling) -> KernelReport:
    ptx = kernel.asm["ptx"]
    key = hash((ptx, arch))
    if key not in _ptxas_cache:  # the same kernel launched at another seqlen: ptxas once
        _ptxas_cache[key] = ptxas_resources(ptx, arch)
    regs, st, ld, text = _ptxas_cache[key]
    cfg = {k: kwargs[k] for k in _CONFIG_KEYS if k in kwargs}
    widths = load_widths(ptx)
    d0, dm, d1 = kwargs.get("D0"), kwargs.get("DM"), kwargs.get("D1")
    return KernelReport(
        kernel=name, head_dim=hd, dtype=str(dt).replace("torch.", ""), packed=pk, config=cfg,
        registers=regs, spill_store_bytes=st, spill_load_bytes=ld, shared_bytes=int(kernel.metadata.shared),
        wgmma=ptx.count("wgmma.mma_async"), async_copies=ptx.count("cp.async"), ptxas=text,
        tiling=tiling if d0 is not None else "-", seqlen=seqlen,
        tiles=[d0, dm, d1] if d0 is not None else [], tma=ptx.count("cp.async.bulk.tensor"),
        vector_loads=widths.get(16, 0), narrow_loads=sum(n for w, n in widths.items() if w < 4))


def _compile_rows(fa, arch, hd, dt, pk, seqlen, config=None, backward=True, tiling=None) -> list[KernelReport]:
    with compile_only(arch) as compiled, _as_if_cuda(fa):
        _launch_all(fa, hd, dt, pk, seqlen, config, backward, tiling)
    rows = []
    for name, kernel, kwargs in compiled:
        kind = KERNEL_KIND.get(name)
        if config and kind not in config:  # compiling candidates: only the kernels they name
            continue
        # the tiling each kernel launched with: the one its config names, else the library's choice
        til = (config or {}).get(kind, {}).get("tiling") or tiling or fa.DEFAULT_TILING
        rows.append(_row(name, kernel, kwargs, hd, dt, pk, seqlen, arch, til))
    return rows


MAE_SEQLENS = (290, 1157)  # ViT-H/14 at 476 px, mask ratio 0.75: encoder tokens, decoder tokens


def report(head_dims=MAE_HEAD_DIMS, dtypes=(torch.bfloat16,), packed=(False, True), arch: int = 90,
           seqlens=MAE_SEQLENS, tiling=None) -> list[KernelReport]:
    """Every kernel with the library's own launch configs for ``sm_<arch>`` (as the launchers pick them)."""
    from mae_fast.kernels import flash_attention as fa

    return [r for hd in head_dims for dt in dtypes for pk in packed for n in seqlens
            for r in _compile_rows(fa, arch, hd, dt, pk, n, tiling=tiling)]


def candidates(head_dims, arch: int = 90, dtype=torch.bfloat16, packed=(False,), seqlen: int = 290,
               space: dict | None = None) -> list[KernelReport]:
    """Each config of ``candidate_configs`` (or of ``space``: {kernel: [config, ...]}) of the forward, dK/dV
    and dQ kernels, compiled: the i-th config of every kernel in one launch."""
    from mae_fast.kernels import flash_attention as fa

    rows = []
    for hd in head_dims:
        lists = space or fa.candidate_configs(hd, seqlen)
        for i in range(max(len(v) for v in lists.values())):
            cfg = {k: dict(v[i]) for k, v in lists.items() if i < len(v)}
            for pk in packed:
                rows += _compile_rows(fa, arch, hd, dtype, pk, seqlen, cfg)
    return rows


def search_space() -> dict[str, list[dict]]:
    """The configs the candidates were pruned from (``_SEARCH`` of the kernels module)."""
    from mae_fast.kernels import flash_attention as fa

    return {k: [dict(zip(_CONFIG_KEYS, c)) for c in v] for k, v in fa._SEARCH.items()}


def config_key(cfg: dict) -> tuple:
    return tuple(cfg[k] for k in _CONFIG_KEYS)


def problems(r) -> list[str]:
    """Why a row is not fast on the GPU (empty: clean): spills, no pipelined loads, narrow loads, no wgmma,
    shared memory over the limit. The row-sum kernel (no loop, no dot) needs only no spills and wide loads."""
    r = asdict(r) if isinstance(r, KernelReport) else r
    out = []
    if r["spill_store_bytes"] or r["spill_load_bytes"]:
        out.append(f"spills {r['spill_store_bytes']}/{r['spill_load_bytes']} B")
    if r.get("narrow_loads", 0):
        out.append(f"{r['narrow_loads']} loads narrower than 4 bytes (not vectorised)")
    if r["shared_bytes"] > MAX_SHARED_BYTES.get(90, 227 * 1024):
        out.append(f"shared memory {r['shared_bytes']} B over the limit")
    if r["kernel"] != "_bwd_delta_kernel":
        if not r["async_copies"]:
            out.append("no cp.async/TMA (loads not pipelined)")
        if not r["wgmma"]:
            out.append("no wgmma")
    return out


def clean_configs(rows) -> dict[tuple[str, tuple], set[tuple]]:
    """(kind, tiles) -> configs (BLOCK_M, BLOCK_N, num_warps, num_stages) clean (:func:`problems`) at EVERY head
    dim and layout they were compiled for. ``rows``: KernelReports or their JSON dicts."""
    seen: dict[tuple[str, tuple], dict[tuple, bool]] = {}
    for r in rows:
        r = asdict(r) if isinstance(r, KernelReport) else r
        kind = KERNEL_KIND.get(r["kernel"])
        if kind in (None, "delta"):
            continue
        by_cfg = seen.setdefault((kind, tuple(r["tiles"])), {})
        key = config_key(r["config"])
        by_cfg[key] = by_cfg.get(key, True) and not problems(r)
    return {k: {c for c, ok in v.items() if ok} for k, v in seen.items()}


def format_table(rows: list[KernelReport]) -> str:
    lines = ["| kernel | hd | tiles | seqlen | packed | BLOCK_M x BLOCK_N / warps / stages | regs | spill st/ld (B) | "
             "smem (KiB) | wgmma | cp.async | 16-B loads | narrow loads | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.config
        cfg = f"{c.get('BLOCK_M', '-')} x {c.get('BLOCK_N', '-')} / {c.get('num_warps', '-')} / " \
              f"{c.get('num_stages', '-')}"
        tiles = "+".join(str(t) for t in r.tiles if t) or "-"
        bad = problems(r)
        lines.append(f"| {r.kernel} | {r.head_dim} | {tiles} | {r.seqlen} | {'yes' if r.packed else 'no'} | {cfg} | "
                     f"{r.registers} | {r.spill_store_bytes}/{r.spill_load_bytes} | {r.shared_bytes / 1024:.0f} | "
                     f"{r.wgmma} | {r.async_copies} | {r.vector_loads} | {r.narrow_loads} | "
                     f"{'; '.join(bad) if bad else 'yes'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    p.add_argument("--head-dims", type=int, nargs="+", default=list(MAE_HEAD_DIMS))
    p.add_argument("--seqlens", type=int, nargs="+", default=list(MAE_SEQLENS),
                   help="sequence lengths launched (the launcher's configs depend on them)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    p.add_argument("--dense-only", action="store_true")
    p.add_argument("--packed-only", action="store_true")
    p.add_argument("--tiling", default=None, choices=["split", "single", "wrap", "equal"],
                   help="head-dim tiling the launchers use (default: the library's choice)")
    p.add_argument("--candidates", action="store_true",
                   help="compile every config of candidate_configs (bf16, at the first --seqlens) instead")
    p.add_argument("--search", action="store_true",
                   help="compile every config of the space the candidates are pruned from, and print the clean ones")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if any row spills, lacks pipelined (cp.async/TMA) or vectorised loads, or wgmma")
    p.add_argument("--json", help="write the rows (with ptxas output) here")
    p.add_argument("--md", help="write the table and the verdict here (markdown)")
    a = p.parse_args(argv)
    layouts = (False,) if a.dense_only else (True,) if a.packed_only else (False, True)
    if a.search or a.candidates:
        rows = candidates(a.head_dims, a.arch, packed=layouts, seqlen=a.seqlens[0],
                          space=search_space() if a.search else None)
    else:
        rows = report(a.head_dims, tuple(getattr(torch, d) for d in a.dtypes), layouts, a.arch, a.seqlens,
                      tiling=a.tiling)
    bad = [r for r in rows if problems(r)]
    summary = (f"{len(rows)} kernels compiled for sm_{a.arch} with triton {triton.__version__}: "
               f"{sum(r.spills for r in rows)} spill registers, {len(bad)} not clean (spills, unpipelined or narrow "
               f"loads, no wgmma, shared memory)")
    print(format_table(rows) + "\n\n" + summary)
    if a.md:
        with open(a.md, "w") as f:
            f.write(f"# compile_report.py {' '.join(argv if argv is not None else sys.argv[1:])}\n\n"
                    f"torch {torch.__version__}, triton {triton.__version__}, sm_{a.arch}\n\n{summary}\n\n"
                    f"{format_table(rows)}\n")
    if a.search:
        for (kind, tiles), cfgs in sorted(clean_configs(rows).items()):
            print(f"clean {kind} {tuple(tiles)}: {sorted(cfgs, reverse=True)}")
    if a.json:
        meta = dict(arch=a.arch, triton=triton.__version__, torch=torch.__version__, tiling=a.tiling or "library",
                    mode="search" if a.search else "candidates" if a.candidates else "launched")
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, rows=[asdict(r) for r in rows]), f, indent=1)
    return 1 if a.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
