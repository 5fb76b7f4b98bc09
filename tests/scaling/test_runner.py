"""The sweep runner (mae_fast/scaling/runner.py): what one run records (row, config.json, status.json, attempts),
who records in a multi-rank run, the default job's hand-over to pretraining and evaluation; sweeps in process,
in worker processes and through submitit's local executor: skip and resume after a kill with no lost or duplicated
rows, failures recorded and retried, runs in flight left alone (pids, squeue), preemption requeued and resumed."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from mae_fast.scaling import load_results
from mae_fast.scaling import runner as runner_mod
from mae_fast.scaling.cli import main as scale_main
from mae_fast.scaling.grid import grid_from_dict, load_grid
from mae_fast.scaling.runner import (RunInterrupted, SweepTask, default_job, export_task_rank, in_flight,
                                     pending_runs, run_alive, run_grid, run_local, run_one, submit_slurm,
                                     sweep_status, worker_env)

try:
    import submitit
except ImportError:  # the SLURM executor's tests need it (pip install 'mae_fast[slurm]')
    submitit = None
needs_submitit = pytest.mark.skipif(submitit is None, reason="needs submitit")

DEFAULT_JOB = "mae_fast.scaling.runner:default_job"


def test_row_takes_the_jobs_own_numbers_and_records_config_and_status(grid_dict, tmp_path):
    """The job's params, images_seen and wall_time_s win over the grid's; config.json holds the run's config and
    status.json ends as done with the attempt count."""
    grid = grid_from_dict(grid_dict(tmp_path))
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


def test_attempts_count_across_failures(grid_dict, tmp_path):
    """Each start of a run counts: a failure, then an interruption, then success is attempt 3."""
    grid = grid_from_dict(grid_dict(tmp_path))
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
def test_top1_outside_a_percentage_fails_the_run_without_a_row(grid_dict, tmp_path, top1, ok):
    grid = grid_from_dict(grid_dict(tmp_path))
    spec = grid.runs[0]
    if ok:
        assert run_one(spec, grid.run_dir(spec.run_id), grid.table_path, lambda c, d: {"top1": top1})["top1"] == top1
        return
    with pytest.raises(ValueError, match="top1 must be a percentage"):
        run_one(spec, grid.run_dir(spec.run_id), grid.table_path, lambda c, d: {"top1": top1})
    assert not grid.table_path.exists()
    assert json.loads((grid.run_dir(spec.run_id) / "status.json").read_text())["state"] == "failed"


def test_other_rank_of_a_later_node_does_not_record(grid_dict, tmp_path, monkeypatch):
    """RANK decides who records, not LOCAL_RANK: rank 1 with local rank 0 (first task of the second node) runs the
    job but writes neither a row nor status.json."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    grid = grid_from_dict(grid_dict(tmp_path))
    spec = grid.runs[0]
    out = run_one(spec, grid.run_dir(spec.run_id), grid.table_path, lambda c, d: {"top1": 9.0})
    assert out == {"run": spec.run_id, "rank": 1, "top1": 9.0}
    assert not grid.table_path.exists() and not (grid.run_dir(spec.run_id) / "status.json").exists()


def test_default_job_passes_the_run_to_pretraining_and_evaluation(grid_dict, tmp_path, monkeypatch):
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
    grid = grid_from_dict(grid_dict(tmp_path, job=DEFAULT_JOB, pretrain={"recipe": "demo"},
                                   data={"source": "/videos", "fps": 2.0, "total_hours": 100},
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


def test_inprocess_sweep_writes_the_table_and_skips_finished_runs(write_grid, fake_jobs):
    grid = load_grid(write_grid(fake_jobs / "g.yaml"))
    outcome = run_grid(grid, log=lambda s: None)
    assert set(outcome.values()) == {"done"} and len(outcome) == 12
    table = load_results(grid.table_path)
    assert sorted(table["run"]) == sorted(r.run_id for r in grid.runs)
    for row in table.rows():
        cfg = json.loads(row["config_json"])
        expect = (20 + 2 * math.log(cfg["params"] / 1e8) + 3 * math.log(cfg["hours"] / 100)
                  + 5 * math.log(cfg["img_size"] / 224) + 0.1 * cfg["seed"])
        assert row["top1"] == pytest.approx(expect, abs=1e-6)
        assert row["params"] == cfg["params"] and row["hours"] == cfg["hours"] and row["git_commit"]
        assert row["images_seen"] == 1000 and Path(row["checkpoint"]).exists()
    assert pending_runs(grid) == []
    assert run_grid(grid, log=lambda s: None) == {}  # nothing left: nothing runs


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mae_fast.scaling.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_killed_sweep_resumes_without_lost_or_duplicated_rows(write_grid, fake_jobs, monkeypatch, capsys):
    grid_path = write_grid(fake_jobs / "g.yaml")
    grid = load_grid(grid_path)
    env = {"FAKE_COUNTER": str(fake_jobs / "calls"), "FAKE_KILL_CALL": "3"}
    first = run_cli("run", str(grid_path), env=env)
    assert first.returncode == 9, first.stderr  # the whole sweep process died inside run 3
    killed = grid.runs[2].run_id
    assert sorted(load_results(grid.table_path)["run"]) == sorted(r.run_id for r in grid.runs[:2])
    st = sweep_status(grid)
    assert [e["run"] for e in st["interrupted"]] == [killed]
    assert len(st["done"]) == 2 and len(st["left"]) == 9
    assert scale_main(["status", str(grid_path)]) == 0
    out = capsys.readouterr().out
    assert "done 2" in out and "interrupted 1" in out and killed in out

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert scale_main(["run", str(grid_path)]) == 0
    assert "2 done, 10 to run" in capsys.readouterr().out
    table = load_results(grid.table_path)
    assert len(table) == 12 and sorted(table["run"]) == sorted(r.run_id for r in grid.runs)
    assert len(grid.table_path.read_text().splitlines()) == 13  # header + one line per run, no duplicates
    ck = json.loads((grid.run_dir(killed) / "ckpt.json").read_text())
    assert ck["starts"] == 2 and ck["resumed_from"] == [0, 2] and ck["step"] == 4  # resumed, not restarted
    assert int((fake_jobs / "calls").read_text()) == 12 + 1  # finished runs were not run again
    assert len(sweep_status(grid)["done"]) == 12


def test_failures_are_recorded_and_retried(write_grid, fake_jobs):
    grid = load_grid(write_grid(fake_jobs / "g.yaml", job="fakejobs:broken"))
    outcome = run_grid(grid, log=lambda s: None)
    failed = {k for k, v in outcome.items() if v != "done"}
    assert len(failed) == 6 and all("out of memory" in outcome[k] for k in failed)
    st = sweep_status(grid)
    assert {e["run"] for e in st["failed"]} == failed
    assert all("RuntimeError: out of memory (on purpose)" == e["error"] for e in st["failed"])
    assert len(pending_runs(grid, retry_failed=False)) == 0 and len(pending_runs(grid)) == 6
    lines = []
    assert run_grid(grid, job="fakejobs:resumable", retry_failed=False, log=lines.append) == {}
    assert "12 runs, 6 done, 0 to run, 6 failed before and skipped" in lines[0]  # not counted as done
    outcome = run_grid(grid, job="fakejobs:resumable", log=lambda s: None)
    assert set(outcome) == failed and set(outcome.values()) == {"done"}
    assert len(load_results(grid.table_path)) == 12


def test_interrupted_run_is_not_called_failed(write_grid, fake_jobs):
    grid = load_grid(write_grid(fake_jobs / "g.yaml"))
    spec = grid.runs[0]

    def stopped(cfg, run_dir):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_one(spec, grid.run_dir(spec.run_id), grid.table_path, stopped)
    st = sweep_status(grid)
    assert [e["run"] for e in st["interrupted"]] == [spec.run_id] and not st["failed"]
    assert pending_runs(grid, retry_failed=False)[0] == spec  # resumed by the next sweep


def test_subprocess_mode_runs_each_run_in_a_worker(write_grid, fake_jobs):
    grid = load_grid(write_grid(fake_jobs / "g.yaml", models=["mae_vit_small_patch14"], hours=[5], seeds=[1],
                                img_sizes=[224], executor={"name": "local", "mode": "subprocess"}))
    assert run_grid(grid, log=lambda s: None) == {r.run_id: "done" for r in grid.runs}
    assert len(load_results(grid.table_path)) == 1


def test_parallel_workers_run_at_once_on_a_share_of_the_cores_and_a_failure_stops_no_other(write_grid, fake_jobs,
                                                                                             monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "3")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    grid = load_grid(write_grid(fake_jobs / "g.yaml", models=["mae_vit_small_patch14"], hours=[5, 50, 500],
                                seeds=[1], img_sizes=[224], job="fakejobs:timed",
                                executor={"name": "local", "mode": "subprocess", "parallel": 2}))
    lines = []
    outcome = run_grid(grid, log=lines.append)
    by_hours = {spec.config["hours"]: spec.run_id for spec in grid.runs}
    assert outcome[by_hours[50]] == outcome[by_hours[500]] == "done"
    assert "out of memory (on purpose)" in outcome[by_hours[5]]
    assert sorted(r["hours"] for r in load_results(grid.table_path).rows()) == [50, 500]
    timing = {h: json.loads((grid.run_dir(r) / "timing.json").read_text()) for h, r in by_hours.items()}
    first, second = (timing[h] for h in sorted(by_hours)[:2])  # started together in the two slots
    assert first["start"] < second["end"] and second["start"] < first["end"]
    cpus = len(os.sched_getaffinity(0))
    assert {t["threads"] for t in timing.values()} == {str(max(1, cpus // 2))}
    assert all((grid.run_dir(r) / "worker.log").is_file() for r in by_hours.values())
    assert "out of memory (on purpose)" in (grid.run_dir(by_hours[5]) / "worker.log").read_text()
    assert sum("FAILED" in line for line in lines) == 1


def test_ctrl_c_stops_the_parallel_workers_with_their_progress_kept_and_a_rerun_resumes_them(write_grid, fake_jobs,
                                                                                              monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "0.3")
    monkeypatch.setenv("FAKE_STEPS", "200")
    path = write_grid(fake_jobs / "g.yaml", models=["mae_vit_small_patch14"], hours=[5, 50], seeds=[1],
                      img_sizes=[224], job="fakejobs:resumable",
                      executor={"name": "local", "mode": "subprocess", "parallel": 2})
    grid = load_grid(path)
    ckpts = [grid.run_dir(spec.run_id) / "ckpt.json" for spec in grid.runs]
    sweep = subprocess.Popen([sys.executable, "-m", "mae_fast.cli", "scale", "run", str(path)], start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not all(c.exists() and json.loads(c.read_text())["step"] >= 2 for c in ckpts):  # both running
        assert sweep.poll() is None and time.time() < deadline
        time.sleep(0.1)
    os.killpg(sweep.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the sweep and its workers get it
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 130 and "Traceback" not in err and "interrupted" in err
    assert [json.loads((c.parent / "status.json").read_text())["state"] for c in ckpts] == ["interrupted"] * 2
    assert not grid.table_path.exists()
    stopped_at = [json.loads(c.read_text())["step"] for c in ckpts]
    monkeypatch.setenv("FAKE_SLEEP", "0")
    assert run_grid(grid, log=lambda s: None) == {spec.run_id: "done" for spec in grid.runs}
    for c, step in zip(ckpts, stopped_at):
        state = json.loads(c.read_text())
        assert 2 <= step < 200 and state["resumed_from"] == [0, step] and state["step"] == 200


def test_worker_env_splits_cores_and_gpus_and_keeps_what_the_caller_set():
    env = worker_env(5, 4, environ={}, cpus=16, gpus=4)
    assert env["OMP_NUM_THREADS"] == "4" and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert worker_env(0, 3, environ={}, cpus=2, gpus=0) == {"OMP_NUM_THREADS": "1"}
    kept = worker_env(1, 2, environ={"OMP_NUM_THREADS": "7", "CUDA_VISIBLE_DEVICES": "3"}, cpus=16, gpus=8)
    assert kept == {"OMP_NUM_THREADS": "7", "CUDA_VISIBLE_DEVICES": "3"}


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


def test_run_on_another_machine_is_unknown_not_interrupted(grid_dict, tmp_path):
    """A local run on another host cannot be checked from here: in flight (state unknown), listed as running by
    `scale status`, and not started again."""
    grid = grid_from_dict(grid_dict(tmp_path))
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


def test_torchrun_mode_starts_workers_with_the_grids_process_count_and_job(write_grid, tmp_path, monkeypatch, recorder):
    """mode torchrun: one `torch.distributed.run --nproc_per_node=N` per run, N from the grid, and the worker is told
    the job it was given (not only the grid's)."""
    grid = load_grid(write_grid(tmp_path / "g.yaml", executor={"name": "local", "mode": "torchrun",
                                                              "nproc_per_node": 3}))
    record = recorder(subprocess.CompletedProcess([], 0))
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


def test_run_grid_executor_and_cluster_arguments_override_the_grid(grid_dict, tmp_path, monkeypatch, recorder):
    """run_grid(executor=..., cluster=...) win over the grid's executor block (the CLI's --executor / --cluster)."""
    grid = grid_from_dict(grid_dict(tmp_path, executor={"name": "local", "cluster": "debug"}))
    slurm, local = recorder([]), recorder({})
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


def test_submit_slurm_parameters_and_what_each_run_records(grid_dict, tmp_path, monkeypatch):
    """The grid's slurm block reaches the executor (max_num_timeout as submitit's own argument, not a SLURM
    parameter; a day's time limit by default); each run's status.json names its array task, and the controller pid
    only where submitit's local executor runs it; nothing to run submits nothing."""
    submitit = pytest.importorskip("submitit")
    _FakeExecutor.made = []
    monkeypatch.setattr(submitit, "AutoExecutor", _FakeExecutor)
    grid = grid_from_dict(grid_dict(tmp_path, job=DEFAULT_JOB, executor={"name": "slurm", "slurm": {"max_num_timeout": 3,
                                                                                   "slurm_partition": "gpu"}}))
    runs = grid.runs[:3]
    jobs = submit_slurm(grid, runs, log=lambda s: None)
    (ex,) = _FakeExecutor.made
    assert ex.max_num_timeout == 3 and ex.parameters == {"timeout_min": 1440, "name": "scale-t",
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



@needs_submitit
def test_default_job_over_two_slurm_tasks_is_one_ddp_run_recorded_once(fake_jobs, monkeypatch):
    """``tasks_per_node: 8`` (one task per GPU, as train/grids/humanlike.yaml asks) must make one run of 8 ranks,
    not 8 copies of the run. Here the real job (demo pretraining, then its evaluation) as a 2-task job of
    submitit's local executor: each task gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from the environment
    (recorded by the fake job around it), pretraining and the evaluation are each one DDP run over both tasks (global
    batch split in two), and rank 0 alone records the row."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "train" / "grids" / "demo.yaml").read_text())
    raw.update(name="two_tasks", out_dir=str(fake_jobs / "sweep"), models=raw["models"][:1], hours=[0.01],
               img_sizes=[32], seeds=[0], job="fakejobs:recording_default",
               executor={"name": "slurm", "cluster": "local", "slurm": {"timeout_min": 5, "tasks_per_node": 2}})
    raw["budget"] = {"rule": "images_seen", "images_seen": 64, "batch_size": 32}  # two steps of 32
    raw["pretrain"]["warmup_steps"] = 1
    raw["eval"].update(epochs=1, fraction=0.2, batch_size=32)  # 64 of the 320 labelled images, 2 steps
    grid = grid_from_dict(raw)
    logged = []
    (job,) = run_grid(grid, log=logged.append, wait=True)
    assert job.state == "FINISHED" and not any("FAILED" in line for line in logged)
    run_dir = grid.run_dir(grid.runs[0].run_id)
    seen = [json.loads((run_dir / f"task{i}.json").read_text()) for i in (0, 1)]
    assert [s["RANK"] for s in seen] == ["0", "1"] and {s["WORLD_SIZE"] for s in seen} == {"2"}
    assert [s["LOCAL_RANK"] for s in seen] == ["0", "1"] and all(s["MASTER_ADDR"] for s in seen)
    rank0, rank1 = job.results()
    assert rank0["run"] == rank1["run"] == grid.runs[0].run_id and rank1["rank"] == 1
    assert rank0["top1"] == rank1["top1"] and rank0["checkpoint"] == rank1["checkpoint"]  # one run, one result
    assert list(load_results(grid.table_path)["run"]) == [grid.runs[0].run_id]  # recorded once
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["attempt"] == 1
    log = job.task(0).stdout()
    assert "batch 32 (micro 16 x accum 1 x 2 ranks)" in log and ", ddp," in log and "(16 x 2 ranks)" in log
    assert json.loads((run_dir / "eval" / "results.json").read_text())["world_size"] == 2


@needs_submitit
def test_running_the_grid_again_does_not_start_runs_still_in_flight(write_grid, fake_jobs, monkeypatch):
    """A run submitted through SLURM (submitit's local executor) finishes and records its row; a second
    ``scale run`` while its job is queued or running must not submit it again (two jobs would train one run into
    one directory), nor once it is done; once a job is gone, its run is started again (here through submitit's
    debug executor, in this process)."""
    monkeypatch.setenv("FAKE_SLEEP", "1")  # 4 steps: about 4 s of job after its start (in flight when asked)
    grid = load_grid(write_grid(fake_jobs / "g.yaml", models=["mae_vit_small_patch14"], hours=[5], img_sizes=[224],
                                seeds=[1], executor={"name": "slurm", "cluster": "local",
                                                     "slurm": {"timeout_min": 5}}))
    first = run_grid(grid, log=lambda s: None)
    assert len(first) == 1
    logged = []
    assert run_grid(grid, log=logged.append) == []  # still in flight
    assert "0 done, 0 to run, 1 in flight" in logged[0] and sum("not started again" in x for x in logged) == 1
    assert {e["run"] for e in sweep_status(grid)["submitted"] + sweep_status(grid)["running"]} == \
        {r.run_id for r in grid.runs}
    for j in first:
        j.result()
    assert all(j.state == "FINISHED" for j in first) and len(sweep_status(grid)["done"]) == 1
    assert run_grid(grid, log=lambda s: None) == [] and sorted(load_results(grid.table_path)["run"]) == sorted(
        r.run_id for r in grid.runs)  # submitting again finds nothing to do
    # a run whose job died without a word (node lost, scancel): not in flight, so it is started again
    lost = grid.runs[0]
    rows = grid.table_path.read_text().splitlines(keepends=True)
    grid.table_path.write_text("".join(line for line in rows if lost.run_id not in line))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (grid.run_dir(lost.run_id) / "status.json").write_text(json.dumps(
        {"state": "submitted", "slurm_job_id": dead.stdout.strip(), "cluster": "local",
         "controller_pid": int(dead.stdout), "host": __import__("socket").gethostname()}))
    assert [e["run"] for e in sweep_status(grid)["interrupted"]] == [lost.run_id]
    monkeypatch.setenv("FAKE_SLEEP", "0")
    (again,) = run_grid(grid, cluster="debug", log=lambda s: None, wait=True)
    assert again.state == "DONE" and list(load_results(grid.table_path)["run"]) == [lost.run_id]


def test_slurm_liveness_comes_from_one_squeue_call(write_grid, fake_jobs, monkeypatch):
    """Runs submitted to a real SLURM are alive while squeue lists their job as queued or running; a sweep asks
    squeue once for all of them; without squeue (another machine) or with the controller down nobody can tell,
    so they are left alone unless --resubmit."""
    from mae_fast.scaling.runner import in_flight, slurm_job_alive, slurm_jobs_alive, sweep_status

    bin_dir = fake_jobs / "bin"
    bin_dir.mkdir()
    calls = fake_jobs / "squeue_calls.txt"
    squeue = bin_dir / "squeue"
    squeue.write_text(textwrap.dedent('''\
        #!/bin/sh
        # squeue -h -r -j IDS -o FORMAT
        echo "$4" >>"$SQUEUE_CALLS"
        [ "$1 $2 $3 $5 $6" = "-h -r -j -o %i %T" ] || { echo "unexpected arguments: $*" >&2; exit 2; }
        [ -n "$SQUEUE_DOWN" ] && { echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1; }
        ids=$(echo "$4" | tr , " ")
        for id in $ids; do  # as some SLURM versions do: one purged id fails the whole list
          [ "$id" = 9 ] && { echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; }
        done
        for id in $ids; do
          case "$id" in 7_1) echo "7_1 RUNNING" ;; 7_2) echo "7_2 PENDING" ;; 11) echo "11 COMPLETED" ;; esac
        done
        '''))
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SQUEUE_CALLS", str(calls))

    def n_calls():
        return len(calls.read_text().splitlines()) if calls.exists() else 0

    assert slurm_jobs_alive(["7_1", "7_2", "8", "11", "7_1"]) == {"7_1": True, "7_2": True, "8": False, "11": False}
    assert n_calls() == 1 and calls.read_text().split() == ["7_1,7_2,8,11"]
    # an id squeue refuses: each id asked alone, the refused one is gone
    assert slurm_jobs_alive(["7_1", "9", "8"]) == {"7_1": True, "9": False, "8": False}
    assert [slurm_job_alive(j) for j in ("7_2", "9", "11")] == [True, False, False]
    assert slurm_jobs_alive([]) == {}

    grid = load_grid(write_grid(fake_jobs / "g.yaml", models=["mae_vit_small_patch14"], hours=[5, 50],
                                img_sizes=[224, 448], seeds=[1]))
    ids = [r.run_id for r in grid.runs]
    for run_id, state, job in zip(ids, ["submitted", "running", "submitted", "submitted"], ["7_1", "7_2", "8", "11"]):
        grid.run_dir(run_id).mkdir(parents=True)
        (grid.run_dir(run_id) / "status.json").write_text(json.dumps({"state": state, "slurm_job_id": job}))
    before = n_calls()
    busy = in_flight(grid)
    assert sorted(busy) == sorted(ids[:2]) and not any("state unknown" in why for why in busy.values())
    assert n_calls() == before + 1
    assert [r.run_id for r in pending_runs(grid, skip=busy)] == ids[2:]
    status = sweep_status(grid)
    assert n_calls() == before + 2
    assert [e["run"] for e in status["interrupted"]] == ids[2:]
    assert [e["run"] for e in status["submitted"]] == ids[:1] and [e["run"] for e in status["running"]] == ids[1:2]
    assert scale_main(["run", str(fake_jobs / "g.yaml"), "--dry-run"]) == 0

    monkeypatch.setenv("SQUEUE_DOWN", "1")  # the controller does not answer: unknown, not gone
    busy = in_flight(grid)
    assert len(busy) == 4 and all("state unknown" in why for why in busy.values())
    monkeypatch.delenv("SQUEUE_DOWN")
    monkeypatch.setenv("PATH", str(fake_jobs / "nowhere"))  # no squeue at all
    assert all("state unknown" in why for why in in_flight(grid).values()) and len(in_flight(grid)) == 4


@needs_submitit
def test_preempted_task_requeues_itself_and_resumes(write_grid, fake_jobs, monkeypatch):
    """What submitit does on preemption, step by step: the task is interrupted, its ``checkpoint``
    gives the call to requeue, and the requeued call resumes from the run's checkpoint."""
    monkeypatch.setenv("FAKE_STEPS", "6")
    grid = load_grid(write_grid(fake_jobs / "g.yaml", models=["mae_vit_small_patch14"], hours=[5],
                                img_sizes=[224], seeds=[1]))
    spec = grid.runs[0]
    args = (spec.as_dict(), str(grid.run_dir(spec.run_id)), str(grid.table_path), "fakejobs:resumable")
    grid.run_dir(spec.run_id).mkdir(parents=True)
    # the first attempt got 3 steps in before the preemption signal
    (grid.run_dir(spec.run_id) / "ckpt.json").write_text(json.dumps({"step": 3, "starts": 1, "resumed_from": [0]}))
    task = SweepTask()
    requeued = task.checkpoint(*args)
    assert isinstance(requeued, submitit.helpers.DelayedSubmission) and requeued.function is task
    requeued.result()
    ck = json.loads((grid.run_dir(spec.run_id) / "ckpt.json").read_text())
    assert ck == {"step": 6, "starts": 2, "resumed_from": [0, 3]}
    assert list(load_results(grid.table_path)["run"]) == [spec.run_id]
    # a requeue that arrives after the run finished does not run or record it again
    assert task(*args)["skipped"] == "already done"
    assert len(load_results(grid.table_path)) == 1


@needs_submitit
def test_preemption_through_submitit_local_executor(write_grid, fake_jobs, monkeypatch):
    """The real signal path: submitit signals the task before its time limit (here 30 s, signal after
    10 s, while the first attempt hangs at step 2), the task checkpoints and is requeued, and the new
    attempt resumes from step 2 and finishes."""
    monkeypatch.setenv("FAKE_STEPS", "5")
    monkeypatch.setenv("FAKE_HANG_FIRST", "1")
    grid = load_grid(write_grid(fake_jobs / "g.yaml", models=["mae_vit_small_patch14"], hours=[5], img_sizes=[224],
                                seeds=[1]))
    executor = submitit.LocalExecutor(folder=grid.out_dir / "slurm" / "%j", max_num_timeout=2)
    executor.update_parameters(timeout_min=0.5, signal_delay_s=20)
    jobs = submit_slurm(grid, grid.runs, executor=executor, wait=True, log=lambda s: None)
    assert len(jobs) == 1
    ck = json.loads((grid.run_dir(grid.runs[0].run_id) / "ckpt.json").read_text())
    assert ck == {"step": 5, "starts": 2, "resumed_from": [0, 2]}
    assert list(load_results(grid.table_path)["run"]) == [grid.runs[0].run_id]
    assert json.loads((grid.run_dir(grid.runs[0].run_id) / "status.json").read_text())["attempt"] == 2


def test_default_job_stopped_early_is_interrupted_not_recorded(tmp_path):
    """Pretraining that stops before its end (time_limit_s, stop_at_step) left its checkpoint: evaluating that
    encoder would record a wrong result. The run is interrupted (resumed by the next sweep), the sweep goes on."""
    from mae_fast.scaling.runner import RunInterrupted

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "train" / "grids" / "demo.yaml").read_text())
    raw.update(name="early", out_dir=str(tmp_path / "sweep"), models=raw["models"][:1], hours=[0.01, 0.02],
               img_sizes=[32], seeds=[0], executor={"name": "local", "mode": "inprocess"})
    raw["pretrain"].update(stop_at_step=2, progress=False)
    grid = grid_from_dict(raw)
    logged = []
    outcome = run_grid(grid, log=logged.append)
    assert len(outcome) == 2 and all(v.startswith(RunInterrupted.__name__) for v in outcome.values())
    assert sum("INTERRUPTED" in line for line in logged) == 2  # the first did not stop the sweep
    st = sweep_status(grid)
    assert len(st["interrupted"]) == 2 and not st["failed"] and not st["done"]
    assert not grid.table_path.exists()  # no row: the runs are not done
    assert not (grid.run_dir(grid.runs[0].run_id) / "eval").exists()  # nothing was evaluated
