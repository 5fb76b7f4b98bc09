"""bench/run_all.py: the suites it runs and with which options, the summary of what succeeded and what failed,
its exit code, the device slug of its file names."""
from __future__ import annotations

import json
import os
import types

import pytest
import torch

import run_all  # bench/, on sys.path from tests/conftest.py


def _fake_suites(monkeypatch, fail=("attention",)):
    cmds = {}

    def fake_run(cmd, **kwargs):
        name = {"bench_masking.py": "masking", "bench_attention.py": "attention", "e2e.py": "e2e"}[
            os.path.basename(cmd[1])]
        cmds[name] = cmd
        out = cmd[cmd.index("--out") + 1]
        if name == "e2e":
            row = dict(model="m", img_size=64, batch=2, impl="mae_fast", compile=False, step_ms_median=10.0,
                       images_per_s=200.0, mfu=0.25, peak_mem_gib=None)
            data = dict(rows=[row])
        else:
            data = dict(markdown=f"{name.upper()} TABLE")
        with open(out, "w") as fh:  # a failing suite may still leave a part behind
            json.dump(data, fh)
        return types.SimpleNamespace(returncode=1 if name in fail else 0)

    monkeypatch.setattr(run_all.subprocess, "run", fake_run)
    return cmds


def test_run_all_smoke_runs_each_suite_without_compile_and_summarises_failures(tmp_path, monkeypatch):
    """--smoke passes --smoke to every suite and drops e2e's --compile; a suite that exits non-zero is a failure
    even if it wrote a part; the JSON and markdown hold what succeeded, the failures listed, exit code 1."""
    cmds = _fake_suites(monkeypatch)
    assert run_all.main(["--smoke", "--out-dir", str(tmp_path)]) == 1
    assert set(cmds) == {"masking", "attention", "e2e"}
    assert all("--smoke" in c for c in cmds.values()) and "--compile" not in cmds["e2e"]
    (summary_path,) = [p for p in tmp_path.glob("*.json") if p.stem.count("-") == 3]  # cpu-YYYY-MM-DD.json
    summary = json.loads(summary_path.read_text())
    assert set(summary["results"]) == {"masking", "e2e"} and summary["failures"] == {"attention": "exit code 1"}
    assert summary["smoke"] is True
    md = summary_path.with_suffix(".md").read_text()
    assert "| m | 64 | 2 | False | mae_fast | 10.0 | 200.0 | 25.0% |" in md and "MASKING TABLE" in md
    assert "ATTENTION TABLE" not in md and "## Failed suites" in md and "- attention: exit code 1" in md


def test_run_all_full_keeps_compile_and_only_selects_suites(tmp_path, monkeypatch):
    cmds = _fake_suites(monkeypatch, fail=())
    assert run_all.main(["--only", "e2e", "--out-dir", str(tmp_path)]) == 0
    assert set(cmds) == {"e2e"} and "--compile" in cmds["e2e"] and "--smoke" not in cmds["e2e"]
    cmds.clear()
    assert run_all.main(["--only", "e2e,masking", "--no-compile", "--out-dir", str(tmp_path)]) == 0
    assert set(cmds) == {"e2e", "masking"} and "--compile" not in cmds["e2e"]


def test_run_all_unknown_suite_is_an_argparse_error(tmp_path, capsys):
    """run_all.py --only with a suite it does not have ran nothing and exited 0; now exit 2."""
    import run_all

    with pytest.raises(SystemExit) as exc:
        run_all.main(["--smoke", "--only", "e2e,nosuch", "--out-dir", str(tmp_path)])
    assert exc.value.code == 2 and "--only nosuch: unknown suite" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_device_slug_is_lowercase_words_joined_by_dashes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3 (PCIe)")
    assert run_all.device_slug() == "nvidia-h100-80gb-hbm3-pcie"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_all.device_slug() == "cpu"
