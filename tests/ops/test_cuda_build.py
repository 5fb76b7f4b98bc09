"""The CUDA sources in csrc/ must compile, also on CI machines without a GPU.

``nvcc -c`` of csrc/masking.cu for one architecture (sm_90) with torch's include directories, to an
object file: about a minute on 2 cores (started in the background with the session's first test: see
tests/helpers/background.py), so a broken kernel source fails CI. Skips (with the reason)
only when no nvcc is installed. The GPU tests that run the built extension are in
test_kernels_masking.py.
"""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from mae_fast.csrc import SOURCE_DIR


def _nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not installed (set CUDA_HOME to test the CUDA build)")


def _torch_flags():
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths("cuda") if "device_type" in cpp_extension.include_paths.__code__.co_varnames \
        else cpp_extension.include_paths(cuda=True)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [f"-I{p}" for p in includes] + [f"-I{SOURCE_DIR}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]


def _run(cmd, timeout=600):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, (proc.stdout + proc.stderr)[-6000:]


@needs_nvcc
def test_nvcc_harness_reports_a_broken_source(tmp_path):
    """The check below can fail: a source with an error must give a non-zero exit."""
    bad = tmp_path / "broken.cu"
    bad.write_text("__global__ void k(float* x) { x[0] = undefined_name; }\n")
    rc, log = _run([NVCC, "-c", str(bad), "-o", str(tmp_path / "broken.o"), "-arch=sm_90"])
    assert rc != 0, log


def _build_commands(workdir) -> dict:
    """nvcc -c of masking.cu for sm_90 to workdir/masking.o, and a syntax check of the pybind11 module (host C++
    only) against torch/extension.h: the two compilers run side by side."""
    if NVCC is None:
        return {}
    nvcc = [NVCC, "-c", str(SOURCE_DIR / "masking.cu"), "-o", str(workdir / "masking.o"), "-arch=sm_90",
            "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
            *_torch_flags()]
    commands = {"nvcc": (nvcc, None)}
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is not None:
        commands["bindings"] = ([cxx, "-fsyntax-only", "-std=c++20", "-DTORCH_EXTENSION_NAME=mae_fast_masking_cuda",
                                 f"-I{sysconfig.get_paths()['include']}", str(SOURCE_DIR / "masking.cpp"),
                                 *_torch_flags()], None)
    return commands


@needs_nvcc
@pytest.mark.background(commands=_build_commands)  # starts with the session's first test (a minute of CPU)
def test_masking_cu_compiles_for_sm90_and_bindings_compile(background):
    """nvcc -c of masking.cu for sm_90, and a syntax check of the pybind11 module (host C++ only) against
    torch/extension.h: the two compilers run side by side."""
    rc, log = background.wait("nvcc")
    assert rc == 0, "nvcc failed on csrc/masking.cu:\n" + log[-6000:]
    assert (background.workdir / "masking.o").stat().st_size > 0
    if "bindings" not in background.names:
        pytest.skip("no host C++ compiler for the bindings")
    rc, log = background.wait("bindings")
    assert rc == 0, "c++ failed on csrc/masking.cpp:\n" + log[-6000:]


def test_sources_ship_with_the_package():
    for name in ("masking.cu", "masking.cpp", "masking.h"):
        assert (SOURCE_DIR / name).is_file(), name
    assert sys.modules.get("mae_fast.csrc") is not None
