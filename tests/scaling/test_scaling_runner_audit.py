"""Scaling runner, grid, CLI and plots: tests added by a mutation audit of mae_fast/scaling/{runner,grid,cli,plots}.py.

Each test pins a behaviour that a planted bug (a dropped term, an inverted condition, an argument not passed on)
changed without any existing test noticing: the parameter count and budget of each run, how a grid expands and
names its runs, what a run records (row, status.json, config.json), liveness of runs in flight, how the local and
SLURM executors are driven, what ``scale run / fit / memory / worker`` pass on, and what the plots draw.
Expectations are computed independently (torch modules' parameter counts, hand arithmetic, the law's own
``predict``); nothing here trains a model or needs a GPU.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import mae_fast
from mae_fast.scaling import append_result, load_results
from mae_fast.scaling import plots
from mae_fast.scaling import runner as runner_mod
from mae_fast.scaling.cli import main as scale_main
from mae_fast.scaling.grid import GridError, fit_options, grid_from_dict, load_grid
from mae_fast.scaling.laws import ExtrapolationWarning, Prediction, fit
from mae_fast.scaling.runner import (RunInterrupted, default_job, export_task_rank, in_flight, pending_runs,
                                     result_row, run_alive, run_grid, run_local, run_one, submit_slurm,
                                     sweep_status)
from mae_fast.scaling.table import ResultsTable

DEFAULT_JOB = "mae_fast.scaling.runner:default_job"


def grid_raw(out_dir, **over) -> dict:
    """A small grid: two models (one restricted to 224 px), two sizes, two hours, two seeds: 12 runs."""
    raw = {
        "name": "audit", "out_dir": str(out_dir), "job": DEFAULT_JOB,
        "models": ["mae_vit_small_patch14", {"name": "tinyvit", "base": "mae_vit_tiny_patch14", "depth": 2,
                                             "img_sizes": [224]}],
        "hours": [5, 50], "img_sizes": [224, 448], "seeds": [1, 2],
        "budget": {"rule": "images_seen", "images_seen": 1000, "batch_size": 100},
        "pretrain": {"recipe": "demo"},
        "eval": {"protocol": "linprobe", "num_classes": 1000},
    }
    raw.update(over)
    return raw


def write_grid(path: Path, **over) -> Path:
    path.write_text(yaml.safe_dump(grid_raw(path.parent / "sweep", **over)))
    return path


def truth(cfg) -> float:
    """A smooth made-up accuracy of a run's config (a job's result)."""
    return (20 + 2 * math.log(cfg["params"] / 1e8) + 3 * math.log(cfg["hours"] / 100)
            + 5 * math.log(cfg["img_size"] / 224) + 0.1 * cfg["seed"])


def encoder_params(name: str, img_size: int, num_classes: int, **overrides) -> int:
    """Parameters of the built model's encoder (no decoder, no mask token) plus a linear head."""
    with torch.device("meta"):
        model = mae_fast.create_model(name, img_size=img_size, **overrides)
    enc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder", "mask_token")))
    width = model.cls_token.shape[-1]
    return enc + (width * num_classes + num_classes if num_classes else 0)


# --- grid expansion --------------------------------------------------------------------------------
def test_params_column_counts_the_built_encoder_and_head(tmp_path):
    """Each run's ``params`` is its encoder's parameter count (blocks with MLP biases, cls token, position
    embedding over tokens + 1, final norm) plus the head, at its own resolution and MLP ratio."""
    model = {"name": "odd", "base": "mae_vit_tiny_patch14", "embed_dim": 36, "depth": 3, "num_heads": 3,
             "mlp_ratio": 2.5}
    for classes in (7, 0):
        grid = grid_from_dict(grid_raw(tmp_path, models=[model, "mae_vit_tiny_patch14"], img_sizes=[70, 126],
                                       hours=[3], seeds=[1], eval={"protocol": "linprobe", "num_classes": classes}))
        for run in grid.runs:
            c = run.config
            overrides = {k: v for k, v in model.items() if k not in ("name", "base")} if c["arch"] == "odd" else {}
            assert c["params"] == encoder_params("mae_vit_tiny_patch14", c["img_size"], classes, **overrides), run.run_id


def test_arch_labels_name_registry_models_only_when_unchanged(tmp_path):
    """A registry model keeps the shared table's label (vits14) when listed by name or as a dict labelled with its own
    name; with overrides it is a different model and gets a shape label instead."""
    grid = grid_from_dict(grid_raw(tmp_path, img_sizes=[224], hours=[5], seeds=[1], models=[
        {"name": "mae_vit_small_patch14"}, {"base": "mae_vit_small_patch14", "depth": 5}]))
    assert [r.config["arch"] for r in grid.runs] == ["vits14", "vit_w384d5p14"]
    assert grid.runs[1].config["depth"] == 5 and grid.runs[1].config["model"]["overrides"] == {"depth": 5}


def test_budget_rounds_up_images_and_steps(tmp_path):
    """``rule: epochs``: images = ceil(epochs x frames of the subset), frames = hours x 3600 x fps; steps =
    ceil(images / batch); ``epochs`` records images / frames. ``rule: images_seen``: steps rounded up too."""
    by_epochs = grid_from_dict(grid_raw(tmp_path, hours=[0.37], seeds=[1], models=["mae_vit_tiny_patch14"],
                                        img_sizes=[224], data={"fps": 3, "total_hours": 10},
                                        budget={"rule": "epochs", "epochs": 0.7, "batch_size": 64}))
    b = by_epochs.runs[0].config["budget"]
    frames = round(0.37 * 3600 * 3)  # 3996
    assert b["subset_images"] == frames and b["images_seen"] == math.ceil(0.7 * frames) == 2798
    assert b["steps"] == 44 and b["epochs"] == pytest.approx(2798 / 3996) and b["batch_size"] == 64
    by_images = grid_from_dict(grid_raw(tmp_path, budget={"images_seen": 1000, "batch_size": 96}))
    assert {r.config["budget"]["steps"] for r in by_images.runs} == {11}  # 1000 / 96 = 10.4
    tiny = grid_from_dict(grid_raw(tmp_path, hours=[1e-5], budget={"rule": "epochs", "epochs": 3}))
    assert tiny.runs[0].config["budget"]["subset_images"] == 1  # never 0 images, even for 0.036 of a frame
    assert tiny.runs[0].config["budget"]["images_seen"] == 3


def test_defaults_of_an_almost_empty_grid(tmp_path):
    """Without seeds, budget, job or name: seed 0, 1e6 images in batches of 256, the default job, the file's
    name as the grid's name and out_dir runs/scaling/<name> (absolute)."""
    path = tmp_path / "my_sweep.yaml"
    path.write_text(yaml.safe_dump({"models": ["mae_vit_tiny_patch14"], "hours": [2], "img_sizes": [224]}))
    grid = load_grid(path)
    assert grid.name == "my_sweep" and grid.job == DEFAULT_JOB and runner_mod.resolve_job(grid.job) is default_job
    assert grid.out_dir.is_absolute() and grid.out_dir.parts[-3:] == ("runs", "scaling", "my_sweep")
    (run,) = grid.runs
    assert run.config["seed"] == 0 and "-s0-" in run.run_id
    assert run.config["budget"]["images_seen"] == 1_000_000 and run.config["budget"]["steps"] == 3907
    assert run.config["data_fraction"] == 2 / 5000


def test_expansion_order_and_data_fraction(tmp_path):
    """Runs come models x resolutions x hours x seeds; data_fraction is hours / data.total_hours."""
    grid = grid_from_dict(grid_raw(tmp_path, hours=[7, 0.5, 40], seeds=[3, 1], data={"total_hours": 1234}))
    got = [(r.config["arch"], r.config["img_size"], r.config["hours"], r.config["seed"]) for r in grid.runs]
    want = [(a, s, h, seed) for a, sizes in (("vits14", (224, 448)), ("tinyvit", (224,)))
            for s, h, seed in itertools.product(sizes, (7, 0.5, 40), (3, 1))]
    assert got == want
    assert [r.config["data_fraction"] for r in grid.runs] == [round(h / 1234, 12) for _, _, h, _ in want]


def test_run_ids_do_not_depend_on_key_order_but_on_every_setting(tmp_path):
    """A run's id hashes its resolved config: the same settings written in another key order are the same runs
    (an edited grid must not re-run what it already has); another eval setting is another run."""
    a = grid_from_dict(grid_raw(tmp_path, pretrain={"lr": 1e-3, "mask_ratio": 0.6, "recipe": "demo"},
                                eval={"protocol": "linprobe", "epochs": 3, "num_classes": 1000}))
    b = grid_from_dict(grid_raw(tmp_path, pretrain={"recipe": "demo", "mask_ratio": 0.6, "lr": 1e-3},
                                eval={"num_classes": 1000, "epochs": 3, "protocol": "linprobe"}))
    assert [r.run_id for r in a.runs] == [r.run_id for r in b.runs]
    c = grid_from_dict(grid_raw(tmp_path, eval={"protocol": "linprobe", "epochs": 4, "num_classes": 1000}))
    assert not {r.run_id for r in a.runs} & {r.run_id for r in c.runs}
    assert c.runs[0].config["eval"]["epochs"] == 4


@pytest.mark.parametrize("over, fragment", [
    ({"hours": [5, 50, 5]}, "duplicate runs"),
    ({"budget": {"images_seen": 1000, "batch_size": True}}, "budget.batch_size"),
    ({"budget": {"images_seen": 1000, "batch_size": 64.5}}, "budget.batch_size must be a whole number"),
    ({"eval": {"protocol": "knn"}}, "eval.protocol must be finetune or linprobe"),
])
def test_more_malformed_grids_are_refused(tmp_path, over, fragment):
    with pytest.raises(GridError, match=fragment.replace(".", r"\.")):
        grid_from_dict(grid_raw(tmp_path, **over))


def test_fit_block_order_and_a_target_of_100(tmp_path):
    """The fit block gives (label, params, hours, img_size) in that order; 100% is a valid target."""
    projections, target = fit_options({"fit": {"projections": [{"params": 3e8, "hours": 70, "img_size": 336}],
                                               "target_accuracy": 100}})
    assert projections == [(None, 3e8, 70.0, 336.0)] and target == 100


def test_unknown_run_id_is_a_key_error(tmp_path):
    grid = grid_from_dict(grid_raw(tmp_path))
    assert grid.get(grid.runs[5].run_id) is grid.runs[5]
    with pytest.raises(KeyError, match="no run"):
        grid.get("vits14-224px-5h-s1-0000000000")


# --- what one run records -----------------------------------------------------------------------------
def test_row_takes_the_jobs_own_numbers_and_records_config_and_status(tmp_path):
    """The job's params, images_seen and wall_time_s win over the grid's; config.json holds the run's config and
    status.json ends as done with the attempt count."""
    grid = grid_from_dict(grid_raw(tmp_path))
    spec = grid.runs[3]
    run_dir = grid.run_dir(spec.run_id)
    row = run_one(spec, run_dir, grid.table_path, lambda cfg, d: {
        "top1": 33.25, "params": 12345.0, "images_seen": 777, "wall_time_s": 41.5, "checkpoint": "ck.pt"})
    assert (row["params"], row["images_seen"], row["wall_time_s"], row["checkpoint"]) == (12345.0, 777, 41.5, "ck.pt")
    assert json.loads((run_dir / "config.json").read_text()) == spec.config
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["top1"] == 33.25 and status["attempt"] == 1
    (saved,) = load_results(grid.table_path).rows()
    assert saved["params"] == 12345.0 and saved["images_seen"] == 777


def test_attempts_count_across_failures(tmp_path):
    """Each start of a run counts: a failure, then an interruption, then success is attempt 3."""
    grid = grid_from_dict(grid_raw(tmp_path))
    spec = grid.runs[0]
    run_dir = grid.run_dir(spec.run_id)

    def boom(cfg, d):
        raise RuntimeError("boom")

    def stopped(cfg, d):
        raise RunInterrupted("time limit")

    for job in (boom, stopped):
        with pytest.raises(RuntimeError):
            run_one(spec, run_dir, grid.table_path, job)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    run_one(spec, run_dir, grid.table_path, lambda cfg, d: {"top1": 5.0})
    assert json.loads((run_dir / "status.json").read_text())["attempt"] == 3


@pytest.mark.parametrize("top1, ok", [(0.0, True), (100.0, True), (100.5, False), (-0.1, False), (math.nan, False)])
def test_top1_outside_a_percentage_fails_the_run_without_a_row(tmp_path, top1, ok):
    grid = grid_from_dict(grid_raw(tmp_path))
    spec = grid.runs[0]
    if ok:
        assert run_one(spec, grid.run_dir(spec.run_id), grid.table_path, lambda c, d: {"top1": top1})["top1"] == top1
        return
    with pytest.raises(ValueError, match="top1 must be a percentage"):
        run_one(spec, grid.run_dir(spec.run_id), grid.table_path, lambda c, d: {"top1": top1})
    assert not grid.table_path.exists()
    assert json.loads((grid.run_dir(spec.run_id) / "status.json").read_text())["state"] == "failed"


def test_other_rank_of_a_later_node_does_not_record(tmp_path, monkeypatch):
    """RANK decides who records, not LOCAL_RANK: rank 1 with local rank 0 (first task of the second node) runs the
    job but writes neither a row nor status.json."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    grid = grid_from_dict(grid_raw(tmp_path))
    spec = grid.runs[0]
    out = run_one(spec, grid.run_dir(spec.run_id), grid.table_path, lambda c, d: {"top1": 9.0})
    assert out == {"run": spec.run_id, "rank": 1, "top1": 9.0}
    assert not grid.table_path.exists() and not (grid.run_dir(spec.run_id) / "status.json").exists()


def test_default_job_passes_the_run_to_pretraining_and_evaluation(tmp_path, monkeypatch):
    """default_job: pretraining gets the run's model, budget and data; the evaluation gets the eval block minus the
    grid-only keys (protocol becomes mode, num_classes dropped) and the encoder checkpoint; wall times add up; a
    saved evaluation of the same checkpoint is reused, one of another checkpoint is redone."""
    from mae_fast.training import finetune as finetune_mod
    from mae_fast.training import pretrain as pretrain_mod

    calls = {"pretrain": [], "finetune": []}
    ckpt = str(tmp_path / "pre" / "checkpoint.pt")

    def fake_pretrain(cfg):
        calls["pretrain"].append(cfg)
        return {"stopped": "finished", "checkpoint": ckpt, "images_seen": 1234, "wall_time_s": 2.5, "steps": 10,
                "total_steps": 10}

    def fake_finetune(cfg):
        calls["finetune"].append(cfg)
        return {"top1": 41.5, "top5": 70.0, "wall_time_s": 1.25}

    monkeypatch.setattr(pretrain_mod, "pretrain", fake_pretrain)
    monkeypatch.setattr(finetune_mod, "finetune", fake_finetune)
    grid = grid_from_dict(grid_raw(tmp_path, data={"source": "/videos", "fps": 2.0, "total_hours": 100},
                                   eval={"protocol": "linprobe", "epochs": 3, "num_classes": 1000}))
    spec = next(r for r in grid.runs if r.config["arch"] == "tinyvit")
    run_dir = tmp_path / "run"
    out = default_job(spec.config, run_dir)
    assert out == {"top1": 41.5, "top5": 70.0, "images_seen": 1234, "checkpoint": ckpt, "wall_time_s": 3.75}
    (pre,) = calls["pretrain"]
    assert (pre["model"], pre["model_kwargs"], pre["img_size"], pre["seed"]) == ("mae_vit_tiny_patch14", {"depth": 2},
                                                                                 224, spec.config["seed"])
    assert (pre["steps"], pre["batch_size"], pre["hours"], pre["fps"], pre["data_source"], pre["resume"]) == \
        (10, 100, spec.config["hours"], 2.0, "/videos", "auto")
    (ev,) = calls["finetune"]
    assert ev["mode"] == "linprobe" and ev["epochs"] == 3 and ev["checkpoint"] == ckpt
    assert "protocol" not in ev and "num_classes" not in ev
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "results.json").write_text(json.dumps({"checkpoint": ckpt, "top1": 50.0}))
    assert default_job(spec.config, run_dir)["top1"] == 50.0 and len(calls["finetune"]) == 1  # reused
    (run_dir / "eval" / "results.json").write_text(json.dumps({"checkpoint": "older.pt", "top1": 50.0}))
    assert default_job(spec.config, run_dir)["top1"] == 41.5 and len(calls["finetune"]) == 2  # redone


# --- liveness of runs in flight -----------------------------------------------------------------------------
def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_liveness_uses_the_pid_of_each_state(monkeypatch):
    """running: the worker's pid; submitted: the controller's pid; submitit's debug executor: never alive after the
    call; a pid that exists but belongs to another user (EPERM) is alive."""
    me, dead, host = os.getpid(), _dead_pid(), socket.gethostname()
    assert run_alive({"state": "running", "host": host, "pid": me, "controller_pid": dead}) is True
    assert run_alive({"state": "running", "host": host, "pid": dead, "controller_pid": me}) is False
    assert run_alive({"state": "submitted", "host": host, "pid": dead, "controller_pid": me, "cluster": "local",
                      "slurm_job_id": str(me)}) is True
    assert run_alive({"state": "submitted", "host": host, "controller_pid": me, "cluster": "debug",
                      "slurm_job_id": "1"}) is False
    assert run_alive({"state": "failed", "host": host, "pid": me}) is False

    def refuse(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(runner_mod.os, "kill", refuse)
    assert run_alive({"state": "running", "host": host, "pid": 12345}) is True


def test_run_on_another_machine_is_unknown_not_interrupted(tmp_path):
    """A local run on another host cannot be checked from here: in flight (state unknown), listed as running by
    `scale status`, and not started again."""
    grid = grid_from_dict(grid_raw(tmp_path))
    spec = grid.runs[1]
    grid.run_dir(spec.run_id).mkdir(parents=True)
    (grid.run_dir(spec.run_id) / "status.json").write_text(json.dumps(
        {"state": "running", "host": "some-other-host.invalid", "pid": _dead_pid()}))
    busy = in_flight(grid)
    assert list(busy) == [spec.run_id] and "state unknown" in busy[spec.run_id]
    status = sweep_status(grid)
    assert [e["run"] for e in status["running"]] == [spec.run_id] and not status["interrupted"]
    assert spec not in pending_runs(grid, skip=busy) and len(pending_runs(grid, skip=busy)) == 11


def test_slurm_answers_fetched_once_are_used(monkeypatch):
    """run_alive with SLURM answers at hand does not ask squeue again."""
    def no_squeue(job_id):
        raise AssertionError("asked squeue again")

    monkeypatch.setattr(runner_mod, "slurm_job_alive", no_squeue)
    assert run_alive({"state": "running", "slurm_job_id": "55_2"}, {"55_2": True}) is True
    assert run_alive({"state": "submitted", "slurm_job_id": "56"}, {"56": False}) is False


# --- executors -----------------------------------------------------------------------------------------------
class _Recorder:
    def __init__(self, result=None):
        self.calls, self.result = [], result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


def test_torchrun_mode_starts_workers_with_the_grids_process_count_and_job(tmp_path, monkeypatch):
    """mode torchrun: one `torch.distributed.run --nproc_per_node=N` per run, N from the grid, and the worker is told
    the job it was given (not only the grid's)."""
    grid = load_grid(write_grid(tmp_path / "g.yaml", executor={"name": "local", "mode": "torchrun",
                                                              "nproc_per_node": 3}))
    record = _Recorder(subprocess.CompletedProcess([], 0))
    monkeypatch.setattr(runner_mod.subprocess, "run", record)
    outcome = run_grid(grid, job="some.module:other_job", log=lambda s: None)
    assert outcome == {r.run_id: "done" for r in grid.runs}
    for (args, _), spec in zip(record.calls, grid.runs):
        cmd = args[0]
        assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3"]
        assert cmd[5:] == ["-m", "mae_fast.scaling.cli", "worker", str(grid.path), spec.run_id, "--job",
                           "some.module:other_job"]
    record.calls.clear()
    run_local(grid, grid.runs[:1], DEFAULT_JOB, mode="subprocess", log=lambda s: None)
    (args, _), = record.calls
    assert args[0][1:] == ["-m", "mae_fast.scaling.cli", "worker", str(grid.path), grid.runs[0].run_id, "--job",
                           DEFAULT_JOB]


def test_run_grid_executor_and_cluster_arguments_override_the_grid(tmp_path, monkeypatch):
    """run_grid(executor=..., cluster=...) win over the grid's executor block (the CLI's --executor / --cluster)."""
    grid = grid_from_dict(grid_raw(tmp_path, executor={"name": "local", "cluster": "debug"}))
    slurm, local = _Recorder([]), _Recorder({})
    monkeypatch.setattr(runner_mod, "submit_slurm", slurm)
    monkeypatch.setattr(runner_mod, "run_local", local)
    run_grid(grid, executor="slurm", cluster="local", log=lambda s: None)
    assert not local.calls and slurm.calls[0][0][3] == "local"
    run_grid(grid, executor="slurm", log=lambda s: None)
    assert slurm.calls[1][0][3] == "debug"


class _FakeJob:
    def __init__(self, job_id):
        self.job_id = job_id


class _FakeExecutor:
    made: list = []

    def __init__(self, folder=None, cluster=None, slurm_max_num_timeout=None):
        self.folder, self.cluster, self.max_num_timeout = folder, cluster or "slurm", slurm_max_num_timeout
        self.parameters = {}
        _FakeExecutor.made.append(self)

    def update_parameters(self, **kw):
        self.parameters.update(kw)

    def map_array(self, fn, *lists):
        self.args = lists
        return [_FakeJob(f"4242_{i}") for i in range(len(lists[0]))]


def test_submit_slurm_parameters_and_what_each_run_records(tmp_path, monkeypatch):
    """The grid's slurm block reaches the executor (max_num_timeout as submitit's own argument, not a SLURM
    parameter; a day's time limit by default); each run's status.json names its array task, and the controller pid
    only where submitit's local executor runs it; nothing to run submits nothing."""
    submitit = pytest.importorskip("submitit")
    _FakeExecutor.made = []
    monkeypatch.setattr(submitit, "AutoExecutor", _FakeExecutor)
    grid = grid_from_dict(grid_raw(tmp_path, executor={"name": "slurm", "slurm": {"max_num_timeout": 3,
                                                                                   "slurm_partition": "gpu"}}))
    runs = grid.runs[:3]
    jobs = submit_slurm(grid, runs, log=lambda s: None)
    (ex,) = _FakeExecutor.made
    assert ex.max_num_timeout == 3 and ex.parameters == {"timeout_min": 1440, "name": "scale-audit",
                                                         "slurm_partition": "gpu"}
    assert [j.job_id for j in jobs] == ["4242_0", "4242_1", "4242_2"]
    assert ex.args[1] == [str(grid.run_dir(r.run_id)) for r in runs] and ex.args[3] == [DEFAULT_JOB] * 3
    for i, r in enumerate(runs):
        st = json.loads((grid.run_dir(r.run_id) / "status.json").read_text())
        assert st["state"] == "submitted" and st["slurm_job_id"] == f"4242_{i}" and st["cluster"] == "slurm"
        assert "controller_pid" not in st
    submit_slurm(grid, runs[:1], cluster="local", log=lambda s: None)
    st = json.loads((grid.run_dir(runs[0].run_id) / "status.json").read_text())
    assert st["cluster"] == "local" and st["controller_pid"] == 4242
    assert submit_slurm(grid, [], log=lambda s: None) == [] and len(_FakeExecutor.made) == 2


def test_task_rank_is_exported_only_where_no_launcher_set_it(monkeypatch):
    """A job of several tasks exports its rank environment, unless RANK is already set (a launcher did it)."""
    submitit = pytest.importorskip("submitit")
    exported = []

    class Env:
        num_tasks = 2

    class TorchEnv:
        def export(self, **kw):
            exported.append(kw)

    monkeypatch.setattr(submitit, "JobEnvironment", Env)
    monkeypatch.setattr(submitit.helpers, "TorchDistributedEnvironment", TorchEnv)
    monkeypatch.setenv("RANK", "3")
    export_task_rank()
    assert exported == []
    monkeypatch.delenv("RANK")
    export_task_rank()
    assert exported == [{"set_cuda_visible_devices": False}]


# --- the CLI ----------------------------------------------------------------------------------------------------
def test_scale_run_passes_its_flags_on(tmp_path, monkeypatch):
    """`scale run` hands --executor, --cluster, --mode, --skip-failed, --resubmit, --wait and --job to run_grid, and
    exits 1 when a run failed, 0 when all are done."""
    path = write_grid(tmp_path / "g.yaml")
    record = _Recorder({"a": "done"})
    monkeypatch.setattr(runner_mod, "run_grid", record)
    assert scale_main(["run", str(path), "--executor", "slurm", "--cluster", "debug", "--mode", "subprocess",
                       "--skip-failed", "--resubmit", "--wait", "--job", DEFAULT_JOB]) == 0
    (args, kw), = record.calls
    assert args[0].executor["mode"] == "subprocess"
    assert kw == {"job": DEFAULT_JOB, "executor": "slurm", "cluster": "debug", "retry_failed": False, "wait": True,
                  "resubmit": True}
    assert scale_main(["run", str(path)]) == 0
    kw = record.calls[1][1]
    assert kw["retry_failed"] is True and kw["resubmit"] is False and kw["executor"] is None
    record.result = {"a": "done", "b": "RuntimeError: boom"}
    assert scale_main(["run", str(path)]) == 1


def _fake_rows(grid, top1=truth):
    for spec in grid.runs:
        append_result(grid.table_path, result_row(spec, {"top1": top1(spec.config)}, 1.0))


def test_run_fit_fits_only_this_grids_runs(tmp_path, monkeypatch):
    """`scale run --fit` fits the rows of the grid's runs, not those an older grid left in the same table."""
    path = write_grid(tmp_path / "g.yaml", fit={"projections": [{"params": 3e8, "hours": 100, "img_size": 224}]})
    grid = load_grid(path)
    _fake_rows(grid)
    append_result(grid.table_path, {"run": "older-grid-run", "params": 5e9, "hours": 9e4, "img_size": 896, "top1": 90.0})
    monkeypatch.setattr(runner_mod, "run_grid", _Recorder({}))
    assert scale_main(["run", str(path), "--fit", "--n-boot", "3"]) == 0
    fit_json = json.loads((grid.out_dir / "fit" / "fit.json").read_text())
    assert fit_json["data_range"]["runs"] == len(grid.runs) and fit_json["data_range"]["hours"] == [5.0, 50.0]


def test_fit_defaults_target_and_out_dir_and_reads_projections(tmp_path, capsys):
    """`scale fit` with no target solves for the best run + 10 rounded up to 5 (37.2 -> 50), writes next to the
    table (TABLE_fit), reads --project as PARAMS,HOURS,IMG_SIZE after the default projections, and refuses
    --no-default-projections without --project."""
    grid = grid_from_dict(grid_raw(tmp_path))
    top = max(truth(r.config) for r in grid.runs)
    _fake_rows(grid, lambda c: truth(c) + 37.2 - top)
    assert scale_main(["fit", str(grid.table_path), "--n-boot", "2", "--form", "log_additive",
                       "--project", "3e8,70,336"]) == 0
    out = tmp_path / "results_fit"
    assert "Cheapest setting for top1 >= 50%" in (out / "report.md").read_text()
    projections = json.loads((out / "fit.json").read_text())["projections"]
    assert len(projections) == 3 and (projections[-1]["params"], projections[-1]["hours"],
                                      projections[-1]["img_size"]) == (3e8, 70.0, 336.0)
    capsys.readouterr()
    assert scale_main(["fit", str(grid.table_path), "--n-boot", "2", "--form", "log_additive",
                       "--no-default-projections"]) == 2
    assert "needs at least one --project" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--project", "0,5000,476"], ["--project", "632e6,nan,476"],
                                  ["--project", "632e6,inf,476"], ["--project", "632e6,5000,0"],
                                  ["--target-accuracy", "nan"], ["--target-accuracy", "0"],
                                  ["--target-accuracy", "150"], ["--n-boot", "-1"]])
def test_fit_refuses_projections_and_targets_a_grid_would_refuse(tmp_path, capsys, argv):
    """--project values must be finite and > 0 and --target-accuracy a percentage in (0, 100], as in a grid's fit
    block: a usage error before anything is fitted, not a report with 0.00 or nan projections (library fix)."""
    grid = grid_from_dict(grid_raw(tmp_path))
    _fake_rows(grid)
    with pytest.raises(SystemExit) as info:
        scale_main(["fit", str(grid.table_path), "--n-boot", "2", "--form", "log_additive", *argv])
    assert info.value.code == 2 and f"error: argument {argv[0]}: " in capsys.readouterr().err
    assert not (tmp_path / "results_fit").exists()


def test_fit_with_an_unknown_form_is_a_clear_error(tmp_path, capsys):
    """--form names one of the laws' forms; another name is a one-line error (it was a ValueError traceback after
    the whole fit; library fix)."""
    grid = grid_from_dict(grid_raw(tmp_path))
    _fake_rows(grid)
    assert scale_main(["fit", str(grid.table_path), "--form", "cubic"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --form must be one of log_additive, ") and "'cubic'" in err
    assert not (tmp_path / "results_fit").exists()


def test_scale_memory_budget_minus_headroom(tmp_path, monkeypatch):
    """`scale memory` plans for --budget x (1 - --headroom) GiB; a headroom of 0 is allowed."""
    from mae_fast.scaling import cli

    path = write_grid(tmp_path / "g.yaml")
    record = _Recorder([])
    monkeypatch.setattr(cli, "memory_plans", record)
    assert scale_main(["memory", str(path), "--devices", "4"]) == 0
    assert scale_main(["memory", str(path), "--budget", "40", "--headroom", "0", "--fsdp"]) == 0
    assert [(c[0][1], c[0][2], c[1]) for c in record.calls] == [(4, pytest.approx(72.0), {"fsdp": False}),
                                                                (1, 40.0, {"fsdp": True})]


def test_memory_plan_of_one_device_has_no_ddp_buckets_and_one_row_per_model_size(tmp_path):
    """On one device the plan is the plain step's estimate (no DDP gradient buckets); the seeds and hours of one
    model and resolution share one row."""
    from mae_fast.memory import estimate_mae_step
    from mae_fast.scaling.cli import memory_plans

    model = {"name": "d32", "base": "mae_vit_demo_patch8", "embed_dim": 32, "depth": 2, "num_heads": 2}
    grid = grid_from_dict(grid_raw(tmp_path, models=[model], img_sizes=[32], hours=[0.01, 0.03], seeds=[0, 1],
                                   budget={"images_seen": 960, "batch_size": 8}))
    (row,) = memory_plans(grid, devices=1, budget_gib=100.0)
    direct = estimate_mae_step("mae_vit_demo_patch8", 32, 8, amp_dtype=torch.bfloat16, norm_pix_loss=False,
                               embed_dim=32, depth=2, num_heads=2)
    assert row["micro_batch"] == 8 and row["configured_bytes"] == direct.peak


def test_warnings_about_a_damaged_table_are_shown_once(tmp_path, capsys):
    """A torn results line read several times by one command is reported once."""
    path = write_grid(tmp_path / "g.yaml")
    grid = load_grid(path)
    run_one(grid.runs[0], grid.run_dir(grid.runs[0].run_id), grid.table_path, lambda c, d: {"top1": 10.0})
    with open(grid.table_path, "ab") as fh:
        fh.write(b"torn,vits14,22")
    assert scale_main(["run", str(path), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "skipped" in err


def test_worker_runs_the_job_it_is_given(tmp_path, monkeypatch):
    """`scale worker GRID RUN --job M:F` runs M:F (what run_local passes on), not the grid's job."""
    (tmp_path / "audit_worker_job.py").write_text("def job(cfg, run_dir):\n    return {'top1': 12.75}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "audit_worker_job", raising=False)
    path = write_grid(tmp_path / "g.yaml")
    grid = load_grid(path)
    try:
        assert scale_main(["worker", str(path), grid.runs[2].run_id, "--job", "audit_worker_job:job"]) == 0
    finally:
        sys.modules.pop("audit_worker_job", None)
    (row,) = load_results(grid.table_path).rows()
    assert row["run"] == grid.runs[2].run_id and row["top1"] == 12.75


# --- plots ------------------------------------------------------------------------------------------------
@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions draw (kept open instead of closed)."""
    figs, close = [], plots.plt.close
    monkeypatch.setattr(plots.plt, "close", figs.append)
    yield figs
    for f in figs:
        close(f)


def _table(rng):
    """Two models (the bigger one listed first, at two resolutions), 3 hours, 2 seeds each, accuracy from truth()."""
    rows = []
    for arch, params, sizes in (("big", 3.1e8, (224, 448)), ("small", 2.3e7, (224,))):
        for size, hours, seed in itertools.product(sizes, (3.0, 30.0, 300.0), (1, 2)):
            cfg = {"params": params, "hours": hours, "img_size": size, "seed": seed}
            rows.append({"run": f"{arch}-{size}-{hours}-{seed}", "arch": arch, "params": params, "hours": hours,
                         "img_size": size, "top1": truth(cfg) + 25 + rng.normal(0, 0.3)})
    return ResultsTable.from_rows(rows)


def test_accuracy_plot_draws_each_models_law_and_seed_means(tmp_path, drawn):
    """One curve per (model, resolution) present, ordered by size, each the law's prediction over hours extended to
    extend_to_hours; the large markers are that configuration's seed means; drawing far past the data warns nothing
    (the projections table is where extrapolation is reported)."""
    table = _table(np.random.default_rng(3))
    law = fit(table, forms=["log_additive"], n_boot=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plots.plot_accuracy_vs_hours(table, law, tmp_path / "a.png", extend_to_hours=1e5)  # 333x the data
    assert not [w for w in caught if issubclass(w.category, ExtrapolationWarning)]
    (ax,) = drawn[0].axes
    curves = [ln for ln in ax.lines if not ln.get_label().startswith("_")]
    assert [c.get_label().split(" (")[0] for c in curves] == ["small @224px", "big @224px", "big @448px"]
    means = [ln for ln in ax.lines if ln.get_label().startswith("_") and ln.get_linestyle() == "None"]
    for curve, mean, (arch, params, size) in zip(curves, means, [("small", 2.3e7, 224), ("big", 3.1e8, 224),
                                                                 ("big", 3.1e8, 448)]):
        h = curve.get_xdata()
        assert h[0] == pytest.approx(3.0 / 1.5) and h[-1] == pytest.approx(1e5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExtrapolationWarning)
            want_curve = law.predict(params, h, size).estimate
        np.testing.assert_allclose(curve.get_ydata(), want_curve, rtol=1e-9)
        mask = (table.model_key() == arch) & (table["img_size"] == size)
        want = [table["top1"][mask & (table["hours"] == u)].mean() for u in (3.0, 30.0, 300.0)]
        np.testing.assert_allclose(mean.get_xdata(), [3.0, 30.0, 300.0])
        np.testing.assert_allclose(mean.get_ydata(), want, rtol=1e-12)


class _StubLaw:
    """A law whose bootstrap band lies above its estimate (as a biased bootstrap can), for plot_projections."""
    target, name, ci = "top1", "stub", 0.9
    data_range = {"hours": (1.0, 100.0)}

    def __init__(self, ceiling):
        self.ceiling = ceiling

    def predict(self, params, hours, img_size):
        est = 10 + np.log(np.asarray(hours, dtype=float)) + params / 1e9 + img_size / 1000
        return Prediction(est, est + 1.0, est + 3.0)


def test_projection_plot_points_curves_and_ceiling(tmp_path, drawn):
    """Each projection: a curve up to twice the largest projected hours, a point at its own hours with error bars
    clipped at 0 where the band misses the estimate; the ceiling line only for a law with a ceiling below 100."""
    plots.plot_projections(_StubLaw(100.0), [("far", 2e9, 5000.0, 476.0), ("near", 1e8, 20.0, 224.0)],
                           tmp_path / "p.png")
    (ax,) = drawn[0].axes
    curves = [ln for ln in ax.lines if ln.get_label() in ("far", "near")]
    assert [c.get_xdata()[-1] for c in curves] == [pytest.approx(10000.0)] * 2
    points = [ln for ln in ax.lines if ln.get_marker() == "o"]
    assert [(p.get_xdata()[0], p.get_ydata()[0]) for p in points] == [
        (5000.0, pytest.approx(10 + math.log(5000) + 2 + 0.476)), (20.0, pytest.approx(10 + math.log(20) + 0.1 + 0.224))]
    assert not any("ceiling" in t.get_text() for t in ax.texts)
    plots.plot_projections(_StubLaw(80.0), [("far", 2e9, 5000.0, 476.0)], tmp_path / "q.png")
    assert any("law ceiling 80.0%" in t.get_text() for t in drawn[1].axes[0].texts)


def test_holdout_plot_is_actual_against_predicted(tmp_path, drawn):
    """Held-out panels: x the runs' actual accuracy, y the form's prediction; the chosen form drawn larger."""
    table = _table(np.random.default_rng(5))
    law = fit(table, forms=["log_additive", "log_interaction"], n_boot=3)
    plots.plot_holdout(table, law, tmp_path / "h.png")
    axes = drawn[0].axes
    assert len(axes) == len(law.scores[0].holdout)
    checked = 0
    for ax, split in zip(axes, law.scores[0].holdout):
        scored = [s for s in law.scores if s.holdout[split].get("rows")]
        for s, coll in zip(scored, ax.collections):
            ho = s.holdout[split]
            np.testing.assert_allclose(coll.get_offsets(), np.c_[table["top1"][ho["rows"]], ho["predicted"]])
            assert coll.get_sizes()[0] == (40 if s.name == law.name else 18)
            checked += 1
    assert checked >= 2
