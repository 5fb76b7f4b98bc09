"""Run a grid's runs: locally (in this process, or one subprocess / torchrun per run) or on SLURM.

A *job function* does the work of one run: ``job(config, run_dir) -> metrics`` with at least ``top1``
(optionally ``top5``, ``images_seen``, ``wall_time_s``, ``checkpoint``, ``params``). It must resume from
whatever it left in ``run_dir`` (the default job passes ``resume='auto'`` to training). Grids name it
as ``"module:function"`` so subprocesses and cluster jobs can import it.

Bookkeeping, per run, in ``<out_dir>/runs/<run_id>/status.json`` (running / failed with the error /
submitted with the SLURM job id), while the results table ``<out_dir>/results.csv`` is the only record
of *done*: a row is added atomically (see :func:`~mae_fast.scaling.table.append_result`) after the job
returns. A sweep killed at any point therefore loses nothing finished and duplicates nothing: re-running
the same command skips runs that have a row and resumes the rest.
"""
from __future__ import annotations

import datetime as _dt
import functools
import importlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from mae_fast.training.checkpoint import atomic_write_bytes

from .grid import Grid, RunSpec, load_grid
from .protocol import protocol_columns
from .table import SweepWarning, append_result, read_rows

try:  # submitit is optional (pip install mae_fast[slurm]); only the SLURM executor needs it
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - exercised only without submitit
    _Checkpointable = object

__all__ = [
    "default_job", "resolve_job", "run_one", "pending_runs", "sweep_status", "run_local", "submit_slurm",
    "SweepTask", "JobFn", "export_task_rank", "in_flight", "slurm_jobs_alive",
]

JobFn = Callable[[dict, Path], Mapping]


class RunInterrupted(RuntimeError):
    """The job stopped before its end (e.g. pretraining's ``time_limit_s``) with its state saved: the run is
    interrupted, not failed, and the next sweep resumes it; the sweep goes on with the other runs."""


def default_job(config: dict, run_dir: Path) -> dict:
    """The adapter from a run's config to the training code: MAE pretraining, then evaluation.

    The only place that knows the config keys of :mod:`mae_fast.training.pretrain` (its recipe keys,
    see ``train/recipes/demo.yaml``) and :mod:`mae_fast.training.finetune`; both are imported here,
    lazily, so the runner itself needs neither. The grid's ``pretrain`` / ``eval`` blocks are passed
    through as recipe keys (``recipe`` picks the base recipe). Pretraining keeps its checkpoints in
    ``run_dir/pretrain`` and resumes from them (``resume: auto``); the evaluation resumes after its last epoch
    checkpoint, and a finished one is reused.
    """
    from mae_fast.training import distributed as dist_mod

    # Over several ranks, one process group serves both stages: a second group on the same MASTER_PORT could
    # meet the first one's store before rank 0 has closed it.
    with dist_mod.process_group(config["pretrain"].get("device", "auto")):
        return _pretrain_then_evaluate(config, run_dir)


def _pretrain_then_evaluate(config: dict, run_dir: Path) -> dict:
    from mae_fast.training.finetune import finetune
    from mae_fast.training.pretrain import pretrain

    budget, data, model = config["budget"], config["data"], config["model"]
    common = {"model": model["name"], "model_kwargs": model["overrides"], "img_size": config["img_size"],
              "seed": config["seed"], "output_dir": str(run_dir), "progress": False}
    pre = pretrain({
        **common, **config["pretrain"], "name": "pretrain", "resume": "auto",
        "data_source": data.get("source"), "hours": config["hours"], "fps": data.get("fps", 1.0),
        "batch_size": budget["batch_size"], "steps": budget["steps"],
        **({"images": config["images"]} if config.get("images") is not None else {}),
    })
    if pre["stopped"] != "finished":  # evaluating a partly trained encoder would record a wrong result
        raise RunInterrupted(f"pretraining stopped early ({pre['stopped']} at step {pre['steps']}/"
                             f"{pre['total_steps']}); the next sweep resumes it from {pre['checkpoint']}")
    # a finished evaluation (same encoder checkpoint) is reused; an interrupted one resumes after its last saved
    # epoch (finetune's resume=auto). Over several ranks (torchrun, SLURM tasks) both stages run on all of them.
    saved = run_dir / "eval" / "results.json"
    ev = json.loads(saved.read_text()) if saved.exists() else {}
    if ev.get("checkpoint") != str(pre["checkpoint"]):
        eval_cfg = dict(config["eval"])
        eval_cfg.pop("num_classes", None)  # only used by the grid to count the head's parameters
        mode = eval_cfg.pop("protocol", "finetune")
        ev = finetune({**common, **eval_cfg, "name": "eval", "mode": mode, "checkpoint": pre["checkpoint"]})
    return {
        "top1": ev.get("reported_top1", ev["top1"]),  # the eval protocol's reported top-1 (its `report` key)
        "top5": ev.get("top5"), "images_seen": pre["images_seen"],
        "checkpoint": pre["checkpoint"], "wall_time_s": pre["wall_time_s"] + ev.get("wall_time_s", 0.0),
    }


def check_default_job_config(config: dict) -> None:
    """What :func:`default_job` would refuse only when each stage starts (the evaluation after hours of
    pretraining): the ``pretrain`` block's recipe keys and the ``eval`` block's finetuning keys, their types and
    the evaluation's pool and augmentation values. Raises ConfigError; ``scale run`` calls it before submitting."""
    from mae_fast.training import finetune as finetune_mod
    from mae_fast.training.config import ConfigError, FinetuneConfig, PretrainConfig

    PretrainConfig.build(dict(config["pretrain"]))
    eval_cfg = {k: v for k, v in config["eval"].items() if k not in ("protocol", "num_classes")}
    try:
        ev = FinetuneConfig.build(eval_cfg)
    except ConfigError as e:
        raise ConfigError(f"eval: {e}") from None
    finetune_mod.check_augment(ev)
    finetune_mod.check_pool(ev.pool, config["eval"].get("protocol", "finetune") == "linprobe")


default_job.check_config = check_default_job_config


def resolve_job(job: str | JobFn) -> JobFn:
    """A job function from ``"package.module:function"`` (or the callable itself)."""
    if callable(job):
        return job
    module, _, name = str(job).partition(":")
    if not name:
        raise ValueError(f"job must be 'module:function', got {job!r}")
    return getattr(importlib.import_module(module), name)


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --- per-run status ------------------------------------------------------------------------------
def _write_json(path: Path, data: Mapping) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=1, default=str).encode())


def _read_status(run_dir: Path) -> dict:
    path = run_dir / "status.json"
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # cut short, not UTF-8 (ValueErrors both), a directory, ...
        status = f"{type(exc).__name__}: {exc}"
    if not isinstance(status, dict):
        warnings.warn(f"{path}: unreadable ({str(status)[:100]}); the run counts as not started", SweepWarning,
                      stacklevel=2)
        return {}
    return status


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def result_row(spec: RunSpec, metrics: Mapping, wall_time_s: float) -> dict:
    cfg = spec.config
    if "top1" not in metrics:
        raise KeyError(f"run {spec.run_id}: the job returned no 'top1' (got {sorted(metrics)})")
    if not 0.0 <= float(metrics["top1"]) <= 100.0:  # NaN fails too; a bad row would poison the table
        raise ValueError(f"run {spec.run_id}: top1 must be a percentage in [0, 100], got {metrics['top1']}")
    return {
        "run": spec.run_id, "arch": cfg["arch"], "params": metrics.get("params") or cfg["params"],
        "width": cfg["width"], "depth": cfg["depth"], "heads": cfg["heads"], "patch_size": cfg["patch_size"],
        "img_size": cfg["img_size"], "data_fraction": cfg["data_fraction"], "hours": cfg["hours"],
        "seed": cfg["seed"], "top1": float(metrics["top1"]), "top5": metrics.get("top5"),
        "images_seen": metrics.get("images_seen", cfg["budget"]["images_seen"]),
        "wall_time_s": round(float(metrics.get("wall_time_s") or wall_time_s), 3),
        "checkpoint": metrics.get("checkpoint") or "", "git_commit": git_commit(), "finished_at": _now(),
        "config_json": json.dumps(cfg, sort_keys=True, default=str), **protocol_columns(cfg),
        **({"images": cfg["images"]} if cfg.get("images") is not None else {}),  # an image-count grid's data axis
    }


def run_one(spec: RunSpec, run_dir: Path, table_path: Path, job: str | JobFn) -> dict:
    """Do one run and record it. Raises what the job raised, after marking the run failed."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lead = _is_rank_zero()
    if lead:
        _write_json(run_dir / "config.json", spec.config)
        prev = _read_status(run_dir)
        _write_json(run_dir / "status.json", {
            "state": "running", "host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
            "attempt": int(prev.get("attempt", 0)) + 1, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        })
    start = time.time()
    try:
        metrics = dict(resolve_job(job)(spec.config, run_dir))
        if not lead:  # another rank of a multi-process run: rank 0 evaluates and records it
            return {"run": spec.run_id, "rank": int(os.environ["RANK"]), **metrics}
        row = result_row(spec, metrics, time.time() - start)
    except BaseException as exc:
        if lead:  # Ctrl-C, or submitit's exit on preemption: interrupted (resumable), not failed
            status = _read_status(run_dir)
            interrupted = isinstance(exc, RunInterrupted) or not isinstance(exc, Exception)
            status.update(state="interrupted" if interrupted else "failed",
                          error=f"{type(exc).__name__}: {exc}", ended=_now(),
                          traceback=traceback.format_exc(limit=20))
            _write_json(run_dir / "status.json", status)
        raise
    if lead:
        append_result(table_path, row)  # the row is what makes the run done
        status = _read_status(run_dir)
        status.update(state="done", ended=_now(), top1=row["top1"])
        _write_json(run_dir / "status.json", status)
    return row


# --- sweep-level views ----------------------------------------------------------------------------
def done_ids(grid: Grid) -> set[str]:
    return {r["run"] for r in read_rows(grid.table_path) if r.get("run")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# squeue states of a job that is queued or holds its resources
_SLURM_LIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
               "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


def slurm_jobs_alive(job_ids: Iterable[str]) -> dict[str, bool | None]:
    """Whether SLURM still has each job (queued or running), {job_id: True / False / None}, from ONE ``squeue``
    call for them all (a large grid asks the scheduler once, not once per run). None where squeue cannot say
    (not on a SLURM login node, or it failed for another reason than an unknown job). Array tasks as submitit
    names them (``12345_3``); ``-r`` lists pending array tasks one per line under the same names."""
    ids = list(dict.fromkeys(str(j) for j in job_ids))
    if not ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i %T"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return dict.fromkeys(ids)
    if out.returncode != 0:
        if "invalid job id" not in (out.stderr or "").lower():
            return dict.fromkeys(ids)
        if len(ids) == 1:
            return {ids[0]: False}
        # some SLURM versions refuse the whole list when one id is long gone: ask for each alone
        return {j: slurm_jobs_alive([j])[j] for j in ids}
    live = set()
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] in _SLURM_LIVE:
            live.add(parts[0])
    return {j: j in live for j in ids}


def slurm_job_alive(job_id: str) -> bool | None:
    """:func:`slurm_jobs_alive` for one job."""
    return slurm_jobs_alive([job_id])[str(job_id)]


def _slurm_job(status: Mapping) -> str | None:
    job_id = status.get("slurm_job_id")
    return str(job_id) if job_id and status.get("cluster", "slurm") == "slurm" else None


def run_alive(status: Mapping, slurm_alive: Mapping[str, bool | None] | None = None) -> bool | None:
    """Whether the process or job that a run's status.json names (submitted or running) still exists:
    True / False, or None when it cannot be told from here. ``slurm_alive``: SLURM answers already fetched
    (:func:`slurm_jobs_alive`), so that a sweep asks squeue once."""
    state, host = status.get("state"), status.get("host")
    if state not in ("submitted", "running"):
        return False
    job_id = _slurm_job(status)
    if job_id:
        return slurm_alive[job_id] if slurm_alive is not None and job_id in slurm_alive else slurm_job_alive(job_id)
    if host != socket.gethostname():
        return None  # a local process on another machine
    if state == "submitted" and status.get("cluster") == "debug":
        return False  # submitit's debug executor ran it inside the submitting process
    pid = status.get("pid") if state == "running" else status.get("controller_pid")
    return _pid_alive(int(pid)) if pid else False


def _unfinished_statuses(grid: Grid) -> tuple[dict[str, dict], dict[str, bool | None]]:
    """status.json of every run without a result row, and SLURM's word on their jobs (one squeue call)."""
    done = done_ids(grid)
    statuses = {spec.run_id: _read_status(grid.run_dir(spec.run_id)) for spec in grid.runs if spec.run_id not in done}
    jobs = [_slurm_job(st) for st in statuses.values() if st.get("state") in ("submitted", "running")]
    return statuses, slurm_jobs_alive(j for j in jobs if j)


def in_flight(grid: Grid) -> dict[str, str]:
    """Runs without a result whose submitted job or running process still exists (or may: liveness unknown),
    {run_id: why}: running the grid again must not start them twice."""
    statuses, slurm_alive = _unfinished_statuses(grid)
    out = {}
    for run_id, st in statuses.items():
        alive = run_alive(st, slurm_alive)
        if alive is not False:
            where = f"SLURM job {st['slurm_job_id']}" if st.get("slurm_job_id") else \
                f"pid {st.get('pid') or st.get('controller_pid')} on {st.get('host')}"
            out[run_id] = f"{st['state']} ({where}{'' if alive else ', state unknown from here'})"
    return out


def sweep_status(grid: Grid) -> dict[str, list[dict]]:
    """Runs by state: done, running, submitted, failed (with error), interrupted, left."""
    statuses, slurm_alive = _unfinished_statuses(grid)
    out: dict[str, list[dict]] = {k: [] for k in ("done", "running", "submitted", "failed", "interrupted", "left")}
    for spec in grid.runs:
        entry = {"run": spec.run_id}
        if spec.run_id not in statuses:
            out["done"].append(entry)
            continue
        st = statuses[spec.run_id]
        state = st.get("state")
        if state in ("running", "submitted") and run_alive(st, slurm_alive) is False:
            state = "interrupted"  # its process or job is gone: killed, or lost; the next sweep resumes it
        if state in ("running", "submitted", "failed", "interrupted"):
            entry.update({k: st[k] for k in ("error", "host", "started", "slurm_job_id", "attempt") if st.get(k)})
            out[state].append(entry)
        else:
            out["left"].append(entry)
    return out


def pending_runs(grid: Grid, retry_failed: bool = True, skip: Sequence[str] = ()) -> list[RunSpec]:
    """Runs without a result row (failed ones too unless ``retry_failed=False``), except those in ``skip``."""
    done = done_ids(grid) | set(skip)
    todo = []
    for spec in grid.runs:
        if spec.run_id in done:
            continue
        if not retry_failed and _read_status(grid.run_dir(spec.run_id)).get("state") == "failed":
            continue
        todo.append(spec)
    return todo


# --- executors ------------------------------------------------------------------------------------
def run_local(grid: Grid, runs: Sequence[RunSpec], job: str | JobFn | None = None, mode: str = "inprocess",
              nproc_per_node: int = 1, log: Callable[[str], None] = print, parallel: int = 1) -> dict[str, str]:
    """Run ``runs`` one after another. Returns {run_id: "done" | error}; a failure does not stop the sweep.

    ``mode``: ``inprocess`` calls the job here; ``subprocess`` starts ``python -m mae_fast.scaling.cli
    worker`` per run (a crash cannot take the sweep down); ``torchrun`` starts it under torchrun with
    ``nproc_per_node`` processes (rank 0 records the result). ``parallel`` > 1 (subprocess mode) keeps that
    many workers going at once (:func:`run_local_parallel`).
    """
    job = job or grid.job
    if mode not in ("inprocess", "subprocess", "torchrun"):
        raise ValueError(f"local mode must be inprocess, subprocess or torchrun, got {mode!r}")
    if mode != "inprocess":  # workers re-read the grid and import the job
        if grid.path is None:
            raise ValueError(f"mode {mode!r} needs a grid loaded from a file (workers re-read it)")
        if not isinstance(job, str):
            raise ValueError(f"mode {mode!r} needs the job as 'module:function'")
    if parallel > 1:
        if mode != "subprocess":
            raise ValueError(f"parallel runs need mode 'subprocess', got {mode!r}")
        return run_local_parallel(grid, runs, job, parallel, log)
    outcome: dict[str, str] = {}
    for i, spec in enumerate(runs, 1):
        log(f"[{i}/{len(runs)}] {spec.run_id}")
        if mode == "inprocess":
            try:
                row = run_one(spec, grid.run_dir(spec.run_id), grid.table_path, job)
                outcome[spec.run_id] = "done"
                log(f"    top1 {row['top1']:.2f}  ({row['wall_time_s']:.1f} s)")
            except Exception as exc:  # noqa: BLE001 - recorded in status.json, the sweep goes on
                outcome[spec.run_id] = f"{type(exc).__name__}: {exc}"
                log(f"    {'INTERRUPTED' if isinstance(exc, RunInterrupted) else 'FAILED'} {outcome[spec.run_id]}")
            continue
        worker = _worker_cmd(grid, spec, job)
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}"]
               + worker[1:] if mode == "torchrun" else worker)
        proc = subprocess.run(cmd)
        if proc.returncode == 0:
            outcome[spec.run_id] = "done"
        else:
            err = _read_status(grid.run_dir(spec.run_id)).get("error") or f"exit code {proc.returncode}"
            outcome[spec.run_id] = err
            log(f"    FAILED {err}   (command: {shlex.join(cmd)})")
    return outcome


def _worker_cmd(grid: Grid, spec: RunSpec, job: str) -> list[str]:
    return [sys.executable, "-m", "mae_fast.scaling.cli", "worker", str(grid.path), spec.run_id, "--job", job]


def worker_env(slot: int, parallel: int, environ: Mapping[str, str] | None = None,
               cpus: int | None = None, gpus: int | None = None) -> dict[str, str]:
    """The environment of worker ``slot`` of ``parallel`` running at once: the CPU cores split evenly
    (``OMP_NUM_THREADS``, which torch's thread pool follows) and, on a machine with GPUs, one GPU per slot
    round-robin (``CUDA_VISIBLE_DEVICES``). Values the caller already set are kept."""
    env = dict(os.environ if environ is None else environ)
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpus // parallel)))
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and "CUDA_VISIBLE_DEVICES" not in env:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    return env


def run_local_parallel(grid: Grid, runs: Sequence[RunSpec], job: str, parallel: int,
                       log: Callable[[str], None] = print, poll_s: float = 0.2) -> dict[str, str]:
    """Run ``runs`` as worker subprocesses, ``parallel`` at a time, each with its share of the machine
    (:func:`worker_env`); a worker's output goes to ``<run dir>/worker.log``. Ctrl-C reaches the workers too
    (same process group): each stops with a checkpoint, and this waits for them before re-raising."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    outcome: dict[str, str] = {}
    waiting = list(enumerate(runs, 1))
    running: dict[int, tuple] = {}  # slot -> (process, spec, log file handle)
    try:
        while waiting or running:
            for slot in range(parallel):
                if slot in running or not waiting:
                    continue
                i, spec = waiting.pop(0)
                run_dir = grid.run_dir(spec.run_id)
                run_dir.mkdir(parents=True, exist_ok=True)
                fh = open(run_dir / "worker.log", "ab")
                proc = subprocess.Popen(_worker_cmd(grid, spec, job), env=worker_env(slot, parallel, gpus=gpus),
                                        stdout=fh, stderr=subprocess.STDOUT)
                running[slot] = (proc, spec, fh)
                log(f"[{i}/{len(runs)}] {spec.run_id}   (output: {run_dir / 'worker.log'})")
            for slot, (proc, spec, fh) in list(running.items()):
                if proc.poll() is None:
                    continue
                fh.close()
                del running[slot]
                status = _read_status(grid.run_dir(spec.run_id))
                if proc.returncode == 0:
                    outcome[spec.run_id] = "done"
                    log(f"    {spec.run_id}: top1 {status.get('top1', float('nan')):.2f}")
                else:
                    outcome[spec.run_id] = status.get("error") or f"exit code {proc.returncode}"
                    log(f"    {spec.run_id}: FAILED {outcome[spec.run_id]}   "
                        f"(log: {grid.run_dir(spec.run_id) / 'worker.log'})")
            time.sleep(poll_s)
    except BaseException:
        for proc, _, fh in running.values():  # the workers got the same SIGINT: let them save and exit
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            fh.close()
        raise
    return outcome


def export_task_rank() -> None:
    """In a job of several SLURM tasks (``tasks_per_node`` x ``nodes``, one task per GPU), make this task
    one rank of the run's process group: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT (env:// initialisation, as torchrun sets them) from the job's environment. Without them
    every task would train and record the same run on its own. Nothing for a single task or where a
    launcher already set RANK. CUDA_VISIBLE_DEVICES is left as SLURM set it (the
    training picks the GPU by LOCAL_RANK, or the only one a task sees)."""
    import submitit

    try:
        job_env = submitit.JobEnvironment()
    except RuntimeError:  # called outside a submitit job (e.g. a requeued call run in this process)
        return
    if job_env.num_tasks > 1 and "RANK" not in os.environ:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


class SweepTask(_Checkpointable):
    """What a SLURM array task runs: one run. On preemption or timeout submitit calls ``checkpoint``
    (inherited from :class:`submitit.helpers.Checkpointable`), which requeues the same call; the job
    then resumes from the checkpoint it keeps in the run directory. A job of several tasks is one run
    over all of them (:func:`export_task_rank`); rank 0 records it."""

    def __call__(self, spec: dict, run_dir: str, table_path: str, job: str) -> dict:
        export_task_rank()
        run_spec = RunSpec(spec["run_id"], spec["config"])
        if spec["run_id"] in {r["run"] for r in read_rows(table_path)}:
            return {"run": spec["run_id"], "skipped": "already done"}  # e.g. requeued after it finished
        return run_one(run_spec, Path(run_dir), Path(table_path), job)


def submit_slurm(grid: Grid, runs: Sequence[RunSpec], job: str | None = None, cluster: str | None = None,
                 wait: bool = False, log: Callable[[str], None] = print, executor=None) -> list:
    """Submit ``runs`` as one submitit job array (``executor.slurm`` of the grid gives its parameters,
    e.g. ``timeout_min``, ``gpus_per_node``, ``slurm_partition``, ``slurm_array_parallelism``).

    ``cluster`` is passed to ``submitit.AutoExecutor`` (None: detect SLURM; ``"local"`` / ``"debug"``
    to try it on this machine). With ``wait`` it blocks until every job ended. Returns the jobs.
    ``executor``: a ready submitit executor to use instead (e.g. a ``LocalExecutor`` with short time
    limits, to exercise preemption).
    """
    try:
        import submitit
    except ImportError:
        raise RuntimeError("the SLURM executor needs submitit: pip install 'mae_fast[slurm]'") from None
    if not runs:
        return []
    job = job or grid.job
    if not isinstance(job, str):
        raise ValueError("SLURM runs need the job as 'module:function'")
    if executor is None:
        params = dict(grid.executor.get("slurm") or {})
        params.setdefault("timeout_min", 60 * 24)
        params.setdefault("name", f"scale-{grid.name}")
        executor = submitit.AutoExecutor(folder=grid.out_dir / "slurm" / "%j", cluster=cluster,
                                         slurm_max_num_timeout=int(params.pop("max_num_timeout", 20)))
        executor.update_parameters(**params)
    jobs = executor.map_array(
        SweepTask(), [r.as_dict() for r in runs], [str(grid.run_dir(r.run_id)) for r in runs],
        [str(grid.table_path)] * len(runs), [job] * len(runs),
    )
    kind = getattr(executor, "cluster", None) or {"LocalExecutor": "local", "DebugExecutor": "debug"}.get(
        type(executor).__name__, "slurm")
    for spec, j in zip(runs, jobs):
        record = {"state": "submitted", "slurm_job_id": j.job_id, "cluster": kind, "host": socket.gethostname(),
                  "submitted": _now()}
        if kind == "local":  # submitit's local job id is its controller's pid
            record["controller_pid"] = int(str(j.job_id).split("_")[0])
        _write_json(grid.run_dir(spec.run_id) / "status.json", record)
    log(f"submitted {len(jobs)} runs as {jobs[0].job_id.split('_')[0]} ({type(executor).__name__})")
    if wait:
        for spec, j in zip(runs, jobs):
            try:
                j.results()  # every task's (result() refuses jobs of several tasks)
            except Exception as exc:  # noqa: BLE001 - the run's status.json has the details
                log(f"    {spec.run_id} FAILED {type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}")
    return jobs


def run_grid(grid: Grid | str | os.PathLike, job: str | JobFn | None = None, executor: str | None = None,
             cluster: str | None = None, retry_failed: bool = True, wait: bool = False,
             log: Callable[[str], None] = print, resubmit: bool = False):
    """Run what is left of a grid with its executor (or ``executor`` = local | slurm). Runs whose job or process
    still exists (queued or running on SLURM, or running in another sweep) are left alone unless ``resubmit``."""
    if not isinstance(grid, Grid):
        grid = load_grid(grid)
    busy = {} if resubmit else in_flight(grid)
    todo = pending_runs(grid, retry_failed, skip=busy)
    done = len({spec.run_id for spec in grid.runs} & done_ids(grid))
    skipped = len(grid.runs) - done - len(todo) - len(busy)  # failed before, not retried
    flying = f", {len(busy)} in flight" if busy else ""
    failed = f", {skipped} failed before and skipped" if skipped else ""
    log(f"grid {grid.name}: {len(grid.runs)} runs, {done} done, {len(todo)} to run{flying}{failed} "
        f"-> {grid.table_path}")
    for run_id, why in busy.items():
        log(f"    not started again: {run_id} is {why}")
    if busy:
        log("    (--resubmit starts them anyway, e.g. when their jobs are gone but this machine cannot tell)")
    name = executor or grid.executor.get("name", "local")
    if name == "local":
        return run_local(grid, todo, job, grid.executor.get("mode", "inprocess"),
                         int(grid.executor.get("nproc_per_node", 1)), log, int(grid.executor.get("parallel", 1)))
    if name == "slurm":
        return submit_slurm(grid, todo, job, cluster or grid.executor.get("cluster"), wait, log)
    raise ValueError(f"executor must be local or slurm, got {name!r}")
