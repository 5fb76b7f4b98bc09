"""Sweep runner: grid expansion with stable ids, skip/resume after a kill with no lost or duplicated
rows, failures recorded, concurrent appends, and the SLURM path through submitit's local executor
(including a preemption that requeues and resumes from the run's checkpoint)."""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from mae_fast.scaling import append_result, load_results
from mae_fast.scaling.grid import GridError, grid_from_dict, load_grid
from mae_fast.scaling.cli import main as scale_main
from mae_fast.scaling.table import SweepWarning
from mae_fast.scaling.runner import SweepTask, pending_runs, run_grid, run_one, submit_slurm, sweep_status

# A resumable fake job: `steps` steps, its state in run_dir/ckpt.json after each. FAKE_KILL_CALL=k makes
# the k-th job call (counted across processes in FAKE_COUNTER) die with os._exit at step 2: a kill.
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

    def distributed(cfg, run_dir):
        # what one task of a multi-task job sees: it must be one rank of one process group
        import torch
        import torch.distributed as dist
        dist.init_process_group("gloo")
        total = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(total)
        seen = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        seen["rank_sum"] = float(total)
        Path(run_dir, f"task{os.environ['SUBMITIT_LOCAL_GLOBALID']}.json").write_text(json.dumps(seen))
        dist.barrier()
        dist.destroy_process_group()
        return {"top1": truth(cfg), "checkpoint": "", "images_seen": cfg["budget"]["images_seen"]}

    def broken(cfg, run_dir):
        if cfg["hours"] == 5:
            raise RuntimeError("out of memory (on purpose)")
        return resumable(cfg, run_dir)
''')


@pytest.fixture
def fake_jobs(tmp_path, monkeypatch):
    (tmp_path / "fakejobs.py").write_text(FAKE_JOBS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    for k in ("FAKE_COUNTER", "FAKE_KILL_CALL", "FAKE_STEPS", "FAKE_SLEEP", "FAKE_HANG_FIRST"):
        monkeypatch.delenv(k, raising=False)
    sys.modules.pop("fakejobs", None)
    yield tmp_path
    sys.modules.pop("fakejobs", None)  # later tests must not find this test's job module already imported


def grid_dict(out_dir, **over):
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


def write_grid(path: Path, **over) -> Path:
    path.write_text(yaml.safe_dump(grid_dict(path.parent / "sweep", **over)))
    return path


def test_grid_expands_with_stable_readable_ids(tmp_path):
    g = grid_from_dict(grid_dict(tmp_path))
    assert len(g.runs) == 2 * 2 * 2 + 1 * 2 * 2  # small at 2 sizes, tinyvit only at 224
    ids = [r.run_id for r in g.runs]
    assert ids == [r.run_id for r in grid_from_dict(grid_dict(tmp_path)).runs]  # stable
    assert ids[0].startswith("vits14-224px-5h-s1-") and any(i.startswith("tinyvit-224px-50h-s2-") for i in ids)
    # where and how it runs does not change a run's identity; what it computes does
    moved = grid_from_dict(grid_dict(tmp_path / "elsewhere", executor={"name": "slurm"}))
    assert [r.run_id for r in moved.runs] == ids
    more = grid_from_dict(grid_dict(tmp_path, seeds=[1, 2, 3]))
    assert set(ids) < {r.run_id for r in more.runs}
    lr = grid_from_dict(grid_dict(tmp_path, pretrain={"lr": 1e-3}))
    assert not set(ids) & {r.run_id for r in lr.runs}
    cfg = g.runs[0].config
    assert cfg["params"] == pytest.approx(22.0e6, rel=0.01) and cfg["data_fraction"] == 5 / 5000
    assert cfg["budget"]["steps"] == 10
    epochs = grid_from_dict(grid_dict(tmp_path, budget={"rule": "epochs", "epochs": 2, "batch_size": 64}))
    assert epochs.runs[0].config["budget"]["images_seen"] == 2 * 5 * 3600  # 1 frame/s


def test_packaged_demo_grid_loads_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    grid = load_grid("demo")
    assert grid.name == "demo" and len(grid.runs) == 12 and grid.out_dir == tmp_path / "runs" / "scaling" / "demo"
    assert {r.config["img_size"] for r in grid.runs} == {32, 48}
    assert scale_main(["run", "no_such_grid", "--dry-run"]) == 2
    assert "no such grid file (packaged grids: demo" in capsys.readouterr().err


def test_bad_grids_are_refused(tmp_path):
    with pytest.raises(GridError, match="unknown model 'mae_vit_nope'"):
        grid_from_dict(grid_dict(tmp_path, models=["mae_vit_nope"]))
    with pytest.raises(GridError, match="not a multiple of patch 14"):
        grid_from_dict(grid_dict(tmp_path, img_sizes=[100]))
    with pytest.raises(GridError, match="hours must be > 0"):
        grid_from_dict(grid_dict(tmp_path, hours=[0, 5]))
    with pytest.raises(GridError, match="budget.rule"):
        grid_from_dict(grid_dict(tmp_path, budget={"rule": "vibes"}))


def test_inprocess_sweep_writes_the_table_and_skips_finished_runs(fake_jobs):
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


def test_killed_sweep_resumes_without_lost_or_duplicated_rows(fake_jobs, monkeypatch, capsys):
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


def test_failures_are_recorded_and_retried(fake_jobs):
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


def test_interrupted_run_is_not_called_failed(fake_jobs):
    grid = load_grid(write_grid(fake_jobs / "g.yaml"))
    spec = grid.runs[0]

    def stopped(cfg, run_dir):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_one(spec, grid.run_dir(spec.run_id), grid.table_path, stopped)
    st = sweep_status(grid)
    assert [e["run"] for e in st["interrupted"]] == [spec.run_id] and not st["failed"]
    assert pending_runs(grid, retry_failed=False)[0] == spec  # resumed by the next sweep


def test_subprocess_mode_runs_each_run_in_a_worker(fake_jobs):
    grid = load_grid(write_grid(fake_jobs / "g.yaml", models=["mae_vit_small_patch14"], hours=[5], seeds=[1],
                                img_sizes=[224], executor={"name": "local", "mode": "subprocess"}))
    assert run_grid(grid, log=lambda s: None) == {r.run_id: "done" for r in grid.runs}
    assert len(load_results(grid.table_path)) == 1


def _append_many(args):
    path, worker = args
    for i in range(15):
        append_result(path, {"run": f"w{worker}-{i}", "params": 1e8, "hours": 1 + i, "img_size": 224,
                             "top1": 10 + worker})


def test_concurrent_appends_lose_nothing(tmp_path):
    path = tmp_path / "results.csv"
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_append_many, [(path, w) for w in range(4)])
    append_result(path, {"run": "w0-0", "params": 1e8, "hours": 1, "img_size": 224, "top1": 99})  # replaces
    table = load_results(path)
    assert len(table) == 60 and len(set(table["run"])) == 60
    assert table["top1"][list(table["run"]).index("w0-0")] == 99
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temporary file left behind


submitit = pytest.importorskip("submitit")


def test_slurm_array_through_submitit_local_executor(fake_jobs):
    grid = load_grid(write_grid(fake_jobs / "g.yaml", models=["mae_vit_small_patch14"], hours=[5], img_sizes=[224],
                                seeds=[1, 2], executor={"name": "slurm", "cluster": "local",
                                                        "slurm": {"timeout_min": 10, "slurm_array_parallelism": 2}}))
    jobs = run_grid(grid, log=lambda s: None, wait=True)
    assert len(jobs) == 2 and all(j.state == "FINISHED" for j in jobs)
    table = load_results(grid.table_path)
    assert sorted(table["run"]) == sorted(r.run_id for r in grid.runs)
    assert len(sweep_status(grid)["done"]) == 2
    assert run_grid(grid, log=lambda s: None, wait=True) == []  # submitting again finds nothing to do


def test_multi_task_slurm_run_is_one_process_group_recorded_once(fake_jobs, monkeypatch):
    """``tasks_per_node: 8`` (one task per GPU, as train/grids/humanlike.yaml asks) must make one run of
    8 ranks, not 8 copies of the run: each task gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from
    the SLURM (here: submitit local) environment, and only rank 0 records the result."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    grid = load_grid(write_grid(fake_jobs / "g.yaml", job="fakejobs:distributed", models=["mae_vit_small_patch14"],
                                hours=[5], img_sizes=[224], seeds=[1],
                                executor={"name": "slurm", "cluster": "local",
                                          "slurm": {"timeout_min": 5, "tasks_per_node": 2}}))
    logged = []
    jobs = run_grid(grid, log=logged.append, wait=True)
    assert len(jobs) == 1 and jobs[0].state == "FINISHED" and not any("FAILED" in line for line in logged)
    run_dir = grid.run_dir(grid.runs[0].run_id)
    seen = [json.loads((run_dir / f"task{i}.json").read_text()) for i in (0, 1)]
    assert [s["RANK"] for s in seen] == ["0", "1"] and {s["WORLD_SIZE"] for s in seen} == {"2"}
    assert [s["LOCAL_RANK"] for s in seen] == ["0", "1"] and all(s["MASTER_ADDR"] for s in seen)
    assert [s["rank_sum"] for s in seen] == [1.0, 1.0]  # one group of both tasks
    assert list(load_results(grid.table_path)["run"]) == [grid.runs[0].run_id]  # recorded once
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["attempt"] == 1


def test_default_job_over_two_slurm_tasks_trains_with_ddp_and_evaluates_once(tmp_path, monkeypatch):
    """The real job (demo pretraining, then the linear probe) as a 2-task job: pretraining and the probe are
    each one DDP run over both tasks (global batch split in two); rank 0 alone records the row."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "train" / "grids" / "demo.yaml").read_text())
    raw.update(name="two_tasks", out_dir=str(tmp_path / "sweep"), models=raw["models"][:1], hours=[0.03],
               img_sizes=[32], executor={"name": "slurm", "cluster": "local",
                                         "slurm": {"timeout_min": 5, "tasks_per_node": 2}})
    raw["eval"]["epochs"] = 1
    grid = grid_from_dict(raw)
    logged = []
    (job,) = run_grid(grid, log=logged.append, wait=True)
    assert job.state == "FINISHED" and not any("FAILED" in line for line in logged)
    rank0, rank1 = job.results()
    assert rank0["run"] == rank1["run"] == grid.runs[0].run_id and rank1["rank"] == 1
    assert rank0["top1"] == rank1["top1"] and rank0["checkpoint"] == rank1["checkpoint"]  # one run, one result
    assert list(load_results(grid.table_path)["run"]) == [grid.runs[0].run_id]
    log = job.task(0).stdout()
    assert "batch 32 (micro 16 x accum 1 x 2 ranks)" in log and ", ddp," in log and "(16 x 2 ranks)" in log
    assert json.loads((grid.run_dir(grid.runs[0].run_id) / "eval" / "results.json").read_text())["world_size"] == 2


def test_running_the_grid_again_does_not_start_runs_still_in_flight(fake_jobs, monkeypatch):
    """A second ``scale run`` while the first one's jobs are queued or running must not submit them again
    (two jobs would train one run into one directory); once a job is gone, its run is started again."""
    monkeypatch.setenv("FAKE_SLEEP", "1.5")  # 4 steps: about 6 s of job
    grid = load_grid(write_grid(fake_jobs / "g.yaml", models=["mae_vit_small_patch14"], hours=[5], img_sizes=[224],
                                seeds=[1, 2], executor={"name": "slurm", "cluster": "local",
                                                        "slurm": {"timeout_min": 5}}))
    first = run_grid(grid, log=lambda s: None)
    assert len(first) == 2
    logged = []
    assert run_grid(grid, log=logged.append) == []  # both still in flight
    assert "0 done, 0 to run, 2 in flight" in logged[0] and sum("not started again" in x for x in logged) == 2
    assert {e["run"] for e in sweep_status(grid)["submitted"] + sweep_status(grid)["running"]} == \
        {r.run_id for r in grid.runs}
    for j in first:
        j.result()
    assert run_grid(grid, log=lambda s: None) == [] and len(load_results(grid.table_path)) == 2
    # a run whose job died without a word (node lost, scancel): not in flight, so it is started again
    lost = grid.runs[0]
    grid.table_path.unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (grid.run_dir(lost.run_id) / "status.json").write_text(json.dumps(
        {"state": "submitted", "slurm_job_id": dead.stdout.strip(), "cluster": "local",
         "controller_pid": int(dead.stdout), "host": __import__("socket").gethostname()}))
    assert [e["run"] for e in sweep_status(grid)["interrupted"]] == [lost.run_id]
    monkeypatch.setenv("FAKE_SLEEP", "0")
    assert len(run_grid(grid, log=lambda s: None, wait=True)) == 2


def test_slurm_liveness_comes_from_one_squeue_call(fake_jobs, monkeypatch):
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


def test_preempted_task_requeues_itself_and_resumes(fake_jobs, monkeypatch):
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


def test_preemption_through_submitit_local_executor(fake_jobs, monkeypatch):
    """The real signal path: submitit signals the task before its time limit (here 30 s, signal after
    15 s, while the first attempt hangs at step 2), the task checkpoints and is requeued, and the new
    attempt resumes from step 2 and finishes."""
    monkeypatch.setenv("FAKE_STEPS", "5")
    monkeypatch.setenv("FAKE_HANG_FIRST", "1")
    grid = load_grid(write_grid(fake_jobs / "g.yaml", models=["mae_vit_small_patch14"], hours=[5], img_sizes=[224],
                                seeds=[1]))
    executor = submitit.LocalExecutor(folder=grid.out_dir / "slurm" / "%j", max_num_timeout=2)
    executor.update_parameters(timeout_min=0.5, signal_delay_s=15)
    jobs = submit_slurm(grid, grid.runs, executor=executor, wait=True, log=lambda s: None)
    assert len(jobs) == 1
    ck = json.loads((grid.run_dir(grid.runs[0].run_id) / "ckpt.json").read_text())
    assert ck == {"step": 5, "starts": 2, "resumed_from": [0, 2]}
    assert list(load_results(grid.table_path)["run"]) == [grid.runs[0].run_id]
    assert json.loads((grid.run_dir(grid.runs[0].run_id) / "status.json").read_text())["attempt"] == 2


# --- malformed grids and damaged bookkeeping: clear errors before anything runs, or a report and go on ------
def _grid_file(tmp_path, text_or_over) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(text_or_over if isinstance(text_or_over, str) else
                    yaml.safe_dump(grid_dict(tmp_path / "sweep", **text_or_over)))
    return path


@pytest.mark.parametrize("over, fragment", [
    ("name: x\nmodels: [a, b\n", "g.yaml: not valid YAML"),
    ({"seed": [1, 2]}, "unknown key 'seed' (did you mean 'seeds'?)"),
    ({"hours": []}, "hours is empty"),
    ({"seeds": []}, "seeds is empty"),
    ({"img_sizes": [], "models": ["mae_vit_small_patch14"]}, "img_sizes is empty"),
    ({"seeds": [1.5]}, "seeds: expected whole numbers"),
    ({"img_sizes": [224.5]}, "img_sizes: expected whole numbers"),
    ({"seeds": [True]}, "seeds: expected whole numbers"),
    ({"hours": [float("nan")]}, "hours must be > 0 and finite"),
    ({"hours": [float("inf")]}, "hours must be > 0 and finite"),
    ({"img_sizes": [0]}, "img_size must be > 0"),
    ({"img_sizes": [-224]}, "img_size must be > 0"),
    ({"models": "mae_vit_nope"}, "unknown model 'mae_vit_nope'"),
    ({"models": [{"name": "x", "base": "mae_vit_tiny_patch14", "embed_dim": "wide"}]}, "models: "),
    ({"models": [{"name": "x", "base": "mae_vit_tiny_patch14", "img_sizes": "big"}]}, "x: img_sizes: expected"),
    ({"budget": {"rule": "images_seen", "images_seen": "lots"}}, "budget.images_seen"),
    ({"budget": {"rule": "images_seen"}}, "budget.images_seen"),
    ({"budget": {"rule": "epochs"}}, "budget.epochs"),
    ({"budget": {"images_seen": 1000, "batch_size": 0}}, "budget.batch_size"),
    ({"budget": {"images_seen": 1000, "batch_size": "x"}}, "budget.batch_size"),
    ({"budget": [1, 2]}, "budget must be a mapping"),
    ({"data": "somewhere"}, "data must be a mapping"),
    ({"data": {"total_hours": "x"}}, "data.total_hours"),
    ({"data": {"total_hours": 0}}, "data.total_hours"),
    ({"eval": "linprobe"}, "eval must be a mapping"),
    ({"eval": {"protocol": "linprobe", "num_classes": "x"}}, "eval.num_classes"),
    ({"pretrain": [1]}, "pretrain must be a mapping"),
    ({"executor": "slurm"}, "executor must be a mapping"),
    ({"executor": {"name": "sluurm"}}, "executor.name must be local or slurm"),
    ({"executor": {"name": "local", "mode": "thread"}}, "executor.mode must be"),
    # the fit block is used only after the sweep: checked when the grid loads all the same
    ({"fit": {"projections": [{"label": "big", "hours": 10, "img_size": 224}]}}, "fit.projections[0].params is missing"),
    ({"fit": {"projections": [{"params": 1e9, "hours": "many", "img_size": 224}]}}, "fit.projections[0].hours"),
    ({"fit": {"projections": [{"params": 1e9, "hours": 9, "img_size": 224, "px": 1}]}}, "unknown key(s) ['px']"),
    ({"fit": {"projections": {"params": 1e9}}}, "fit.projections must be a list"),
    ({"fit": {"target_accuracy": 150}}, "fit.target_accuracy is a percentage"),
    ({"fit": {"target": 50}}, "fit: unknown key(s) ['target']"),
    ({"job": "mae_fast.scaling.runner:no_such_job"}, "job 'mae_fast.scaling.runner:no_such_job' cannot be loaded"),
    ({"job": "no_such_module_xyz:job"}, "cannot be loaded (ModuleNotFoundError"),
    # the default job's blocks, checked before a sweep submits anything (the eval block is used only after
    # hours of pretraining)
    ({"job": "mae_fast.scaling.runner:default_job", "eval": {"protocol": "linprobe", "mixupp": 0.8}},
     "eval: unknown config key 'mixupp' in config (did you mean mixup?)"),
    ({"job": "mae_fast.scaling.runner:default_job", "eval": {"protocol": "finetune", "epochs": "ten"}},
     "eval: epochs must be an integer, got 'ten'"),
    ({"job": "mae_fast.scaling.runner:default_job", "eval": {"protocol": "linprobe", "pool": "mean_fc_norm"}},
     "pool=mean_fc_norm trains a new LayerNorm"),
    ({"job": "mae_fast.scaling.runner:default_job", "eval": {"protocol": "finetune", "cutmix": -1}},
     "mixup, cutmix >= 0"),
    ({"job": "mae_fast.scaling.runner:default_job", "pretrain": {"recipe": "demo", "warmup_stepz": 5}},
     "unknown config key 'warmup_stepz'"),
])
def test_malformed_grid_is_a_clear_error_naming_file_and_key(tmp_path, capsys, over, fragment):
    path = _grid_file(tmp_path, over)
    if "job" not in over:  # the job is imported by `scale run`, not by loading the grid
        with pytest.raises(GridError) as info:
            load_grid(path)
        assert fragment in str(info.value) and str(info.value).startswith(str(path))
    assert scale_main(["run", str(path)]) == 2  # not a traceback, and nothing was started
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sweep").exists()


def test_single_values_are_one_element_axes(tmp_path):
    """``hours: 5`` is one data size; likewise a single model, or a model's single resolution (not its digits)."""
    one = {"name": "x", "base": "mae_vit_tiny_patch14", "img_sizes": "224"}
    grid = grid_from_dict(grid_dict(tmp_path, models=one, hours=5, seeds=1))
    assert [(r.config["arch"], r.config["img_size"], r.config["hours"]) for r in grid.runs] == [("x", 224, 5.0)]
    grid = grid_from_dict(grid_dict(tmp_path, models="mae_vit_tiny_patch14", img_sizes=224, hours=5, seeds=1))
    assert [r.config["arch"] for r in grid.runs] == ["vitt14"]
    headless = grid_from_dict(grid_dict(tmp_path, eval={"protocol": "linprobe", "num_classes": 0}))
    assert headless.runs[0].config["params"] < grid_from_dict(grid_dict(tmp_path)).runs[0].config["params"]


def test_grid_path_that_is_a_directory_is_a_clear_error(tmp_path, capsys):
    assert scale_main(["status", str(tmp_path)]) == 2
    assert "error: " in capsys.readouterr().err


def test_dry_run_writes_nothing(tmp_path, capsys):
    path = _grid_file(tmp_path, {})
    assert scale_main(["run", str(path), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 12 and not (tmp_path / "sweep").exists()
    # this grid's job module exists only in the fake_jobs tests: listed all the same, with the warning
    assert "job 'fakejobs:resumable' cannot be loaded" in err and "scale run` will refuse to start" in err


@pytest.mark.parametrize("content", [b'{"state": "fail', b"", b"[1, 2]", b"null", b"\xff\xfe\x00garbage", "dir"])
def test_status_reports_a_damaged_status_json_and_goes_on(tmp_path, capsys, content):
    path = _grid_file(tmp_path, {})
    grid = load_grid(path)
    bad = grid.run_dir(grid.runs[3].run_id) / "status.json"
    bad.parent.mkdir(parents=True)
    bad.mkdir() if content == "dir" else bad.write_bytes(content)
    failed = grid.run_dir(grid.runs[4].run_id)
    failed.mkdir(parents=True)
    (failed / "status.json").write_text(json.dumps({"state": "failed", "error": "boom"}))
    assert scale_main(["status", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "failed 1" in out and "left 11" in out and "boom" in out
    assert f"warning: {bad}: unreadable" in err
    assert scale_main(["run", str(path), "--dry-run"]) == 0
    assert f"todo {grid.runs[3].run_id}" in capsys.readouterr().out
    with pytest.warns(SweepWarning, match="the run counts as not started"):
        assert grid.runs[3] in pending_runs(grid, retry_failed=False)


def test_status_reports_a_torn_results_line_and_goes_on(tmp_path, capsys):
    path = _grid_file(tmp_path, {})
    grid = load_grid(path)
    for spec in grid.runs[:2]:
        run_one(spec, grid.run_dir(spec.run_id), grid.table_path, lambda cfg, d: {"top1": 12.5})
    torn = grid.runs[2].run_id
    with open(grid.table_path, "ab") as fh:
        fh.write(f"{torn},vits14,2200".encode() + b"\xff")  # a write cut short, mid-character
    assert scale_main(["status", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "done 2," in out and "left 10" in out
    assert "results.csv line 4" in err and "skipped" in err
    with pytest.warns(SweepWarning, match="line 4: 3 fields, the header has 19; skipped"):
        assert grid.runs[2] in pending_runs(grid)  # the torn row does not count as done: the run is done again
        run_one(grid.runs[2], grid.run_dir(torn), grid.table_path, lambda cfg, d: {"top1": 13.0})
    assert sorted(load_results(grid.table_path)["run"]) == sorted(r.run_id for r in grid.runs[:3])


def test_status_reports_a_results_table_without_run_column(tmp_path, capsys):
    path = _grid_file(tmp_path, {})
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "results.csv").write_text("arch,top1\nvits14,5\n")
    assert scale_main(["status", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "left 12" in out and "warning: " in err and "no 'run' column" in err


def test_scale_memory_bad_arguments_are_clear_errors(tmp_path, capsys):
    path = _grid_file(tmp_path, {"models": ["mae_vit_small_patch14"], "img_sizes": [224], "hours": [5],
                                 "seeds": [1]})
    for bad in (["--devices", "0"], ["--devices", "-2"], ["--budget", "-5"], ["--headroom", "1.5"]):
        with pytest.raises(SystemExit) as info:
            scale_main(["memory", str(path), *bad])
        assert info.value.code == 2
        assert "error: argument --" in capsys.readouterr().err
    # 100 images per batch do not split over 3 devices: an error naming the run, not a traceback
    assert scale_main(["memory", str(path), "--devices", "3"]) == 2
    assert "is not divisible by 3 devices" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"PK\x03\x04\xff\xfe binary spreadsheet", "dir"])
def test_fit_on_an_unreadable_table_is_a_clear_error(tmp_path, capsys, content):
    table = tmp_path / "results.csv"
    table.mkdir() if content == "dir" else table.write_bytes(content)
    assert scale_main(["fit", str(table), "--out", str(tmp_path / "fit")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {table}: cannot read it as a CSV text file") and not (tmp_path / "fit").exists()


def test_run_then_fit_projects_to_the_grids_fit_block(fake_jobs, capsys):
    """`scale run --fit`: the sweep's table is fitted and projected to the grid's own projections and target."""
    fit_block = {"projections": [{"label": "my big model", "params": 3e9, "hours": 400, "img_size": 448},
                                 {"params": 2e8, "hours": 60, "img_size": 224}], "target_accuracy": 45}
    path = write_grid(fake_jobs / "g.yaml", fit=fit_block)
    assert scale_main(["run", str(path), "--fit", "--n-boot", "5"]) == 0
    fit_json = json.loads((fake_jobs / "sweep" / "fit" / "fit.json").read_text())
    projections = fit_json["projections"]
    assert [(p["params"], p["hours"], p["img_size"]) for p in projections] == [(3e9, 400.0, 448.0),
                                                                               (2e8, 60.0, 224.0)]
    assert projections[0]["label"] == "my big model" and projections[1]["label"]  # the second one gets a label
    assert "Cheapest setting for top1 >= 45%" in (fake_jobs / "sweep" / "fit" / "report.md").read_text()


def test_default_job_stopped_early_is_interrupted_not_recorded(tmp_path):
    """Pretraining that stops before its end (time_limit_s, stop_at_step) left its checkpoint: evaluating that
    encoder would record a wrong result. The run is interrupted (resumed by the next sweep), the sweep goes on."""
    from mae_fast.scaling.runner import RunInterrupted

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "train" / "grids" / "demo.yaml").read_text())
    raw.update(name="early", out_dir=str(tmp_path / "sweep"), models=raw["models"][:1], hours=[0.01, 0.03],
               img_sizes=[32])
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
