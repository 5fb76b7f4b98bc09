"""A non-editable install carries the whole library under mae_fast, and nothing generic beside it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    # build from a copy so the test never writes build/ into the working tree
    shutil.copytree(ROOT, src / "repo", ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "runs",
                                                                       "__pycache__", ".benchmarks", "results"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-compile",
                    "-q", "--target", str(target), str(src / "repo")], check=True)
    return target


def test_wheel_layout(installed):
    top = {p.name for p in installed.iterdir()}
    for generic in ("kernels", "train", "csrc", "bench", "tests"):
        assert generic not in top, f"generic top-level {generic!r} installed into site-packages"
    pkg = installed / "mae_fast"
    for sub in ("kernels", "csrc", "train", "ops", "models"):
        assert (pkg / sub / "__init__.py").is_file(), sub
    repo_sources = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cpp", ".h", ".cuh"))
    wheel_sources = sorted(p.name for p in (pkg / "csrc").iterdir() if p.suffix in (".cu", ".cpp", ".h", ".cuh"))
    assert wheel_sources == repo_sources
    repo_recipes = sorted(p.name for p in (ROOT / "train" / "recipes").glob("*.yaml"))
    assert sorted(p.name for p in (pkg / "train" / "recipes").glob("*.yaml")) == repo_recipes
    # every data file the library reads at run time ships too (without the attention preference table an installed
    # library would silently rank attention backends without its measurements)
    for src, dst in (("mae_fast", "."), ("kernels", "kernels"), ("csrc", "csrc"), ("train", "train")):
        data = sorted(str(p.relative_to(ROOT / src)) for p in (ROOT / src).rglob("*")
                      if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)
        missing = [f for f in data if not (pkg / dst / f).is_file()]
        assert not missing, f"{src}/ files not installed: {missing}"


def test_installed_library_and_cli_work(installed, tmp_path):
    """From the installed copy alone (one fresh process): the library with its kernels and CUDA sources imports and
    computes a loss, and `python -m mae_fast.cli --help` (run as -m runs it) lists the commands and exits 0."""
    env = {**os.environ, "PYTHONPATH": str(installed)}
    code = "\n".join([
        "import runpy, sys",
        "import mae_fast, mae_fast.kernels, mae_fast.csrc, torch",
        "assert mae_fast.__file__.startswith(%r), mae_fast.__file__" % str(installed),
        "m = mae_fast.create_model('mae_vit_demo_patch8')",
        "print('loss', float(m(torch.randn(1, 3, 64, 64)).loss))",
        "sys.argv = ['mae-fast', '--help']",
        "try:",
        "    runpy.run_module('mae_fast.cli', run_name='__main__', alter_sys=True)",
        "except SystemExit as e:",
        "    print('cli exit', e.code)",
    ])
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("loss ") and float(lines[0].split()[1]) > 0
    assert "pretrain" in out.stdout and lines[-1] == "cli exit 0", out.stdout
    assert (installed / "bin" / "mae-fast").is_file()
