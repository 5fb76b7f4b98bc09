"""Shared by the scaling tests: a small grid, a module of fake jobs (resumable, killable, failing, recording)
and a made-up accuracy law that the fake jobs report."""
from __future__ import annotations

import math
import os
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

DEFAULT_JOB = "mae_fast.scaling.runner:default_job"


def truth(cfg) -> float:
    """A smooth made-up accuracy of a run's config (what the fake jobs report)."""
    return (20 + 2 * math.log(cfg["params"] / 1e8) + 3 * math.log(cfg["hours"] / 100)
            + 5 * math.log(cfg["img_size"] / 224) + 0.1 * cfg["seed"])


def _grid_dict(out_dir, **over) -> dict:
    """A small grid: two models (one restricted to 224 px), two sizes, two hours, two seeds: 12 runs of the fake
    resumable job (``job=DEFAULT_JOB`` for the real one)."""
    g = {
        "name": "t", "out_dir": str(out_dir), "job": "fakejobs:resumable",
        "models": ["mae_vit_small_patch14", {"name": "tinyvit", "base": "mae_vit_tiny_patch14", "depth": 2,
                                             "img_sizes": [224]}],
        "hours": [5, 50], "img_sizes": [224, 448], "seeds": [1, 2],
        "budget": {"rule": "images_seen", "images_seen": 1000, "batch_size": 100},
        "eval": {"protocol": "linprobe", "num_classes": 1000},
    }
    g.update(over)
    return g


def _write_grid(path: Path, **over) -> Path:
    path.write_text(yaml.safe_dump(_grid_dict(path.parent / "sweep", **over)))
    return path


@pytest.fixture(scope="session", name="truth")
def truth_fixture():
    """``truth(cfg)``: the made-up accuracy the fake jobs report for a run's config."""
    return truth


@pytest.fixture(scope="session")
def grid_dict():
    """``grid_dict(out_dir, **overrides)``: the small grid as a dict."""
    return _grid_dict


def _grid_file(tmp_path, text_or_over) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(text_or_over if isinstance(text_or_over, str) else
                    yaml.safe_dump(_grid_dict(tmp_path / "sweep", **text_or_over)))
    return path


@pytest.fixture(scope="session")
def grid_file():
    """``grid_file(tmp_path, text_or_overrides)``: tmp_path/g.yaml holding the text given, or the small grid with
    those overrides (out_dir tmp_path/sweep)."""
    return _grid_file


@pytest.fixture(scope="session")
def write_grid():
    """``write_grid(path, **overrides)``: the small grid written to path (a YAML file), out_dir beside it."""
    return _write_grid


FAKE_JOBS = textwrap.dedent('''
    import json, math, os, time
    from pathlib import Path

    def truth(cfg):
        return (20 + 2 * math.log(cfg["params"] / 1e8) + 3 * math.log(cfg["hours"] / 100)
                + 5 * math.log(cfg["img_size"] / 224) + 0.1 * cfg["seed"])

    def _count():
        path = Path(os.environ["FAKE_COUNTER"])
        n = int(path.read_text()) + 1 if path.exists() else 1
        path.write_text(str(n))
        return n

    def resumable(cfg, run_dir):
        call = _count() if "FAKE_COUNTER" in os.environ else 0
        ck = Path(run_dir) / "ckpt.json"
        state = json.loads(ck.read_text()) if ck.exists() else {"step": 0, "starts": 0, "resumed_from": []}
        state["starts"] += 1
        state["resumed_from"].append(state["step"])
        while state["step"] < int(os.environ.get("FAKE_STEPS", "4")):
            state["step"] += 1
            tmp = ck.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, ck)
            if call == int(os.environ.get("FAKE_KILL_CALL", "-1")) and state["step"] == 2:
                os._exit(9)
            if os.environ.get("FAKE_HANG_FIRST") and state["starts"] == 1 and state["step"] == 2:
                time.sleep(600)  # the first attempt waits to be preempted
            time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
        return {"top1": truth(cfg), "top5": min(100.0, truth(cfg) + 20), "checkpoint": str(ck),
                "images_seen": cfg["budget"]["images_seen"]}

    def recording_default(cfg, run_dir):
        # what one task of a multi-task job sees (recorded), then the real job: one rank of one process group
        seen = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        Path(run_dir, f"task{os.environ['SUBMITIT_LOCAL_GLOBALID']}.json").write_text(json.dumps(seen))
        from mae_fast.scaling.runner import default_job
        return default_job(cfg, run_dir)

    def timed(cfg, run_dir):
        # when it ran and with which share of the machine; fails on purpose at 5 h
        start = time.time()
        time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
        Path(run_dir, "timing.json").write_text(json.dumps({
            "start": start, "end": time.time(), "threads": os.environ.get("OMP_NUM_THREADS"),
            "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}))
        if cfg["hours"] == 5:
            raise RuntimeError("out of memory (on purpose)")
        return {"top1": truth(cfg), "images_seen": cfg["budget"]["images_seen"]}

    def broken(cfg, run_dir):
        if cfg["hours"] == 5:
            raise RuntimeError("out of memory (on purpose)")
        return resumable(cfg, run_dir)
''')


@pytest.fixture
def fake_jobs(tmp_path, monkeypatch):
    """tmp_path with the fake jobs importable as ``fakejobs`` (in this process and in the workers it starts) and
    their FAKE_* switches cleared."""
    (tmp_path / "fakejobs.py").write_text(FAKE_JOBS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    for k in ("FAKE_COUNTER", "FAKE_KILL_CALL", "FAKE_STEPS", "FAKE_SLEEP", "FAKE_HANG_FIRST"):
        monkeypatch.delenv(k, raising=False)
    sys.modules.pop("fakejobs", None)
    yield tmp_path
    sys.modules.pop("fakejobs", None)  # later tests must not find this test's job module already imported


class _Recorder:
    """A stand-in callable that returns ``result`` and keeps each call's (args, kwargs) in ``calls``."""

    def __init__(self, result=None):
        self.calls, self.result = [], result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


@pytest.fixture
def recorder():
    """``recorder(result)``: a stand-in callable recording its calls (see :class:`_Recorder`)."""
    return _Recorder
