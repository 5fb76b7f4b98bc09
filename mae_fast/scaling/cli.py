"""``mae-fast scale``: run a sweep grid, show its status, fit and project a results table.

    mae-fast scale run GRID [--executor local|slurm] [--mode inprocess|subprocess|torchrun] [--fit]
    mae-fast scale status GRID [--json]
    mae-fast scale memory GRID [--devices 8] [--budget 80] [--fsdp]
    mae-fast scale fit TABLE [--out DIR] [--target-accuracy 50] [--project PARAMS,HOURS,IMG_SIZE ...]
                       [--mixed-protocols] [--fps 1] [--epochs 1]
    mae-fast scale worker GRID RUN_ID     (internal: one run, used by the subprocess/torchrun modes)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Sequence

__all__ = ["main", "add_subparsers", "build_parser"]


def _cmd_run(args) -> int:
    from .grid import GridError, fit_options, load_grid
    from .runner import in_flight, pending_runs, resolve_job, run_grid

    grid = load_grid(args.grid)
    job = args.job or grid.job
    from mae_fast.training.config import ConfigError

    where = grid.path or grid.name
    try:  # before anything is submitted: a typo here would fail every run of the sweep
        check = getattr(resolve_job(job), "check_config", None)
        job_error = None
    except (ImportError, AttributeError, ValueError) as exc:
        check, job_error = None, f"{where}: job {job!r} cannot be loaded ({type(exc).__name__}: {exc})"
    try:  # the job's own check of a run's settings (the default job: pretrain and eval keys)
        for spec in grid.runs if check else ():
            check(spec.config)
    except ConfigError as exc:
        job_error = f"{where}: {exc}"
    if job_error and not args.dry_run:
        raise GridError(job_error)
    if job_error:  # the listing still helps; the real run will refuse
        print(f"warning: {job_error}; `scale run` will refuse to start", file=sys.stderr)
    if args.mode:
        grid.executor["mode"] = args.mode
    if args.dry_run:
        busy = in_flight(grid)
        todo = {r.run_id for r in pending_runs(grid)}
        for r in grid.runs:
            print(("busy " if r.run_id in busy else "todo " if r.run_id in todo else "done ") + r.run_id
                  + (f"  {busy[r.run_id]}" if r.run_id in busy else ""))
        return 0
    outcome = run_grid(grid, job=args.job, executor=args.executor, cluster=args.cluster,
                       retry_failed=not args.skip_failed, wait=args.wait, resubmit=args.resubmit)
    failed = {k: v for k, v in outcome.items() if v != "done"} if isinstance(outcome, dict) else {}
    if args.fit and grid.table_path.exists():
        # the grid's optional `fit:` block: {projections: [{label, params, hours, img_size}], target_accuracy}
        entries, target_accuracy = fit_options(grid.raw)
        projections = [(label or _projection_label(n, d, r), n, d, r) for label, n, d, r in entries]
        _cmd_fit(argparse.Namespace(table=str(grid.table_path), out=str(grid.out_dir / "fit"), target="top1",
                                    n_boot=args.n_boot, form=None, target_accuracy=target_accuracy,
                                    project=projections, seed=0, no_default_projections=bool(projections),
                                    runs={r.run_id for r in grid.runs}))
    return 1 if failed else 0


def _cmd_status(args) -> int:
    from .grid import load_grid
    from .runner import sweep_status

    grid = load_grid(args.grid)
    st = sweep_status(grid)
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    print(f"grid {grid.name}: {len(grid.runs)} runs -> {grid.table_path}")
    print("  " + ", ".join(f"{k} {len(v)}" for k, v in st.items()))
    for state in ("running", "submitted", "interrupted", "failed"):
        for e in st[state]:
            extra = str(e.get("error") or e.get("slurm_job_id") or e.get("host") or "")
            print(f"  {state:11s} {e['run']}  {extra[:160] + ('...' if len(extra) > 160 else '')}")
    return 0


def _projection(text: str) -> tuple[str, float, float, float]:
    try:
        n, d, r = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--project wants PARAMS,HOURS,IMG_SIZE (e.g. 632e6,5000,476), got {text!r}")
    if not all(math.isfinite(v) and v > 0 for v in (n, d, r)):  # as the grid's fit block: > 0 and finite
        raise argparse.ArgumentTypeError(f"--project wants PARAMS,HOURS,IMG_SIZE > 0, got {text!r}")
    return (_projection_label(n, d, r), n, d, r)


def _projection_label(params: float, hours: float, img_size: float) -> str:
    return f"{float(params) / 1e6:.4g}M params, {float(img_size):g} px, {float(hours):g} h"


def _cmd_fit(args) -> int:
    import numpy as np

    from .laws import FORMS, fit
    from .report import DEFAULT_PROJECTIONS, write_report
    from .table import load_results

    if args.form is not None and args.form not in FORMS:  # before the fit, and an error rather than a traceback
        print(f"mae-fast scale fit: --form must be one of {', '.join(FORMS)}, got {args.form!r}", file=sys.stderr)
        return 2
    table = load_results(args.table, target=args.target)  # a TableError is reported by main()
    if getattr(args, "runs", None):  # from `run --fit`: this grid's runs only, not rows of older grids
        table = table.subset(np.isin(table["run"], sorted(args.runs)))
    law = fit(table, target=args.target, n_boot=args.n_boot, choose=args.form, seed=args.seed,
              mixed_protocols=getattr(args, "mixed_protocols", False))
    target_accuracy = args.target_accuracy
    if target_accuracy is None:  # something just beyond the data: the best seed mean + 10 points, rounded
        target_accuracy = float(np.ceil((table[args.target].max() + 10) / 5) * 5)
    out = args.out or str(Path(args.table).with_suffix("")) + "_fit"
    defaults = DEFAULT_PROJECTIONS
    if table.data_unit != "hours":  # the built-in projections are in hours of video: 10x the data instead
        n, d, r = (float(table[k].max()) for k in ("params", "hours", "img_size"))
        defaults = [(f"{n / 1e6:.4g}M params, {r:g} px, {10 * d:.3g} images", n, 10 * d, r)]
    projections = ([] if args.no_default_projections else defaults) + list(args.project or [])
    if not projections:
        print("mae-fast scale fit: --no-default-projections needs at least one --project", file=sys.stderr)
        return 2
    cost = {"fps": getattr(args, "fps", 1.0), "epochs": getattr(args, "epochs", 1.0)}
    print(write_report(table, law, out, projections, target_accuracy, cost_options=cost))
    return 0


def _cmd_worker(args) -> int:
    from .grid import load_grid
    from .runner import run_one

    grid = load_grid(args.grid)
    spec = grid.get(args.run_id)
    run_one(spec, grid.run_dir(spec.run_id), grid.table_path, args.job or grid.job)
    return 0


def memory_plans(grid, devices: int, budget_gib: float, fsdp: bool = False) -> list[dict]:
    """Per distinct (model, resolution) of a grid: the per-device micro-batch and the memory plan the trainer's
    ``memory_budget_gib`` would choose for it (lean activations, then the fewest checkpointed blocks), under
    DDP over ``devices`` (FSDP2 with ``fsdp``)."""
    import torch

    import dataclasses

    from mae_fast.memory import GiB, Plan, mae_memory_job, plan_mae_memory
    from mae_fast.models import create_model
    from mae_fast.training.config import ConfigError, PretrainConfig

    rows, seen = [], set()
    for spec in grid.runs:
        c = spec.config
        key = (c["model"]["name"], json.dumps(c["model"]["overrides"], sort_keys=True), c["img_size"])
        if key in seen:
            continue
        seen.add(key)
        pre = PretrainConfig.build(dict(c["pretrain"]))
        batch, accum = c["budget"]["batch_size"], pre.accum_steps
        if batch % (devices * accum):
            raise ConfigError(f"{spec.run_id}: batch_size {batch} is not divisible by {devices} devices "
                              f"x accum_steps {accum}")
        overrides = dict(c["model"]["overrides"])
        with torch.device("meta"):
            shape = create_model(key[0], img_size=c["img_size"], **overrides)
        strategy = "fsdp" if fsdp else "ddp" if devices > 1 else "none"
        amp = {"fp32": None, "fp16": torch.float16}.get(pre.precision, torch.bfloat16)  # auto: bf16 on a GPU
        job = mae_memory_job(dataclasses.replace(pre, model=key[0], model_kwargs=overrides), shape,
                             batch // (devices * accum), amp, strategy, devices, int(budget_gib * GiB))
        start = Plan(job["lean"], job["checkpointed"], job["blocks"])
        found, tried = plan_mae_memory(job)
        rows.append(dict(arch=c["arch"], img_size=c["img_size"], micro_batch=job["micro"],
                         configured_gib=round(tried[start] / GiB, 2), configured_bytes=tried[start],
                         plan=found.describe() if found else "does not fit: raise accum_steps or use fsdp",
                         planned_gib=round(tried[found] / GiB, 2) if found else None,
                         planned_bytes=tried[found] if found else None))
    return rows


def _cmd_memory(args) -> int:
    from .grid import load_grid

    grid = load_grid(args.grid)
    budget = args.budget * (1 - args.headroom)
    print(f"grid {grid.name}: {args.devices} devices{' (FSDP2)' if args.fsdp else ''}, {args.budget:g} GiB each "
          f"({budget:.1f} usable)", flush=True)
    rows = memory_plans(grid, args.devices, budget, fsdp=args.fsdp)
    print(f"{'model':<28}{'px':>5}{'micro':>7}{'configured GiB':>16}  plan (estimated GiB)")
    for r in rows:
        est = f" ({r['planned_gib']:.1f})" if r["planned_gib"] is not None else ""
        print(f"{r['arch']:<28}{r['img_size']:>5}{r['micro_batch']:>7}{r['configured_gib']:>16.1f}  {r['plan']}{est}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["planned_gib"] is not None for r in rows) else 1


def _checked(kind, ok, what):
    """An argparse type: ``kind(text)`` where ``ok`` of it, else a usage error saying it wants ``what``."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"wants {what}, got {text!r}")
        return value
    return parse


_N_BOOT = _checked(int, lambda v: v >= 0, "a number of resamples >= 0")


def add_subparsers(subparsers) -> None:
    """Add run / status / fit / worker to an argparse ``subparsers`` object."""
    p = subparsers.add_parser("run", help="run what is left of a sweep grid")
    p.add_argument("grid", help="grid YAML (see train/grids/)")
    p.add_argument("--executor", choices=["local", "slurm"], help="default: the grid's executor.name")
    p.add_argument("--mode", choices=["inprocess", "subprocess", "torchrun"], help="local executor mode")
    p.add_argument("--cluster", help="submitit cluster: slurm (default when found), local, debug")
    p.add_argument("--job", help="job function as module:function (default: the grid's job)")
    p.add_argument("--skip-failed", action="store_true", help="do not retry runs that failed before")
    p.add_argument("--resubmit", action="store_true",
                   help="also start runs whose SLURM job or sweep process seems to be still queued or running")
    p.add_argument("--wait", action="store_true", help="slurm: block until the jobs end")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done")
    p.add_argument("--fit", action="store_true", help="fit the table afterwards (report in OUT_DIR/fit)")
    p.add_argument("--n-boot", type=_N_BOOT, default=200, help="bootstrap resamples (0: no uncertainty bands)")
    p.set_defaults(func=_cmd_run)

    p = subparsers.add_parser("status", help="done / running / failed / left runs of a grid")
    p.add_argument("grid")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    p = subparsers.add_parser("memory", help="per model and resolution: estimated peak memory and the plan "
                                             "that fits the devices (no GPU needed)")
    p.add_argument("grid")
    p.add_argument("--devices", type=_checked(int, lambda v: v >= 1, "a number of devices >= 1"), default=1,
                   help="data-parallel devices per run (the batch is split)")
    p.add_argument("--budget", type=_checked(float, lambda v: 0 < v < math.inf, "a number of GiB > 0"), default=80.0,
                   help="GiB per device (default 80)")
    p.add_argument("--headroom", type=_checked(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)"), default=0.1,
                   help="fraction of --budget kept free (0.1)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 over the devices (default: DDP)")
    p.add_argument("--json", help="also write the rows here")
    p.set_defaults(func=_cmd_memory)

    p = subparsers.add_parser("fit", help="fit scaling laws to a results table and project")
    p.add_argument("table", help="results CSV (columns params, hours or images, img_size and the target at least)")
    p.add_argument("--out", help="report directory (default: TABLE without .csv + _fit)")
    p.add_argument("--target", default="top1", help="column to model (default top1)")
    p.add_argument("--n-boot", type=_N_BOOT, default=200, help="bootstrap resamples (0: no uncertainty bands)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--form", help="force a form instead of choosing by held-out error")
    p.add_argument("--target-accuracy", type=_checked(float, lambda v: 0 < v <= 100, "a percentage in (0, 100]"),
                   help="solve for the cheapest setting reaching it")
    p.add_argument("--project", type=_projection, action="append", metavar="PARAMS,HOURS,IMG_SIZE",
                   help="extra projection (repeatable)")
    p.add_argument("--no-default-projections", action="store_true",
                   help="leave out the built-in projections (ViT-H/14 476 px 5,000 h; 2.5B 952 px 20,000 h)")
    p.add_argument("--mixed-protocols", action="store_true",
                   help="fit rows of different protocols (protocol_hash) together instead of refusing")
    p.add_argument("--fps", type=_checked(float, lambda v: 0 < v < math.inf, "frames per second > 0"), default=1.0,
                   help="GPU-hour cost: frames per second of video the pretraining reads (default 1)")
    p.add_argument("--epochs", type=_checked(float, lambda v: 0 < v < math.inf, "a number of passes > 0"),
                   default=1.0, help="GPU-hour cost: passes over the data (default 1)")
    p.set_defaults(func=_cmd_fit)

    p = subparsers.add_parser("worker", help=argparse.SUPPRESS)
    p.add_argument("grid")
    p.add_argument("run_id")
    p.add_argument("--job")
    p.set_defaults(func=_cmd_worker)


def build_parser(prog: str = "mae-fast scale") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_subparsers(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from mae_fast.training.config import ConfigError

    from .grid import GridError
    from .table import SweepWarning, TableError

    args = build_parser().parse_args(argv)
    prog = f"mae-fast scale {args.command}"  # the one prefix of every message, as the other commands have
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None, _show=warnings.showwarning):
        if not issubclass(category, SweepWarning):
            return _show(message, category, filename, lineno, file, line)
        if str(message) not in shown:  # damaged bookkeeping: reported once, in one line, and the command goes on
            shown.add(str(message))
            print(f"{prog}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", SweepWarning)
            warnings.showwarning = show
            return int(args.func(args) or 0)
    except (GridError, TableError, ConfigError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
