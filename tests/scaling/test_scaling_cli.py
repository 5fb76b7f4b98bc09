"""`scale run / status / fit / memory / worker` (mae_fast/scaling/cli.py): what each passes on, exit codes, dry
runs that write nothing, damaged bookkeeping reported once and gone past, and clear one-line errors for bad
arguments and tables."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from mae_fast.scaling import append_result, load_results
from mae_fast.scaling import runner as runner_mod
from mae_fast.scaling.cli import main as scale_main
from mae_fast.scaling.grid import grid_from_dict, load_grid
from mae_fast.scaling.runner import pending_runs, result_row, run_one
from mae_fast.scaling.table import RESULT_COLUMNS, SweepWarning

DEFAULT_JOB = "mae_fast.scaling.runner:default_job"


def test_scale_run_passes_its_flags_on(write_grid, tmp_path, monkeypatch, recorder):
    """`scale run` hands --executor, --cluster, --mode, --skip-failed, --resubmit, --wait and --job to run_grid, and
    exits 1 when a run failed, 0 when all are done."""
    path = write_grid(tmp_path / "g.yaml", job=DEFAULT_JOB)
    record = recorder({"a": "done"})
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


def _fake_rows(grid, top1):
    for spec in grid.runs:
        append_result(grid.table_path, result_row(spec, {"top1": top1(spec.config)}, 1.0))


def test_run_fit_fits_only_this_grids_runs(truth, write_grid, tmp_path, monkeypatch, recorder):
    """`scale run --fit` fits the rows of the grid's runs, not those an older grid left in the same table."""
    path = write_grid(tmp_path / "g.yaml", job=DEFAULT_JOB,
                      fit={"projections": [{"params": 3e8, "hours": 100, "img_size": 224}]})
    grid = load_grid(path)
    _fake_rows(grid, truth)
    append_result(grid.table_path, {"run": "older-grid-run", "params": 5e9, "hours": 9e4, "img_size": 896, "top1": 90.0})
    monkeypatch.setattr(runner_mod, "run_grid", recorder({}))
    assert scale_main(["run", str(path), "--fit", "--n-boot", "3"]) == 0
    fit_json = json.loads((grid.out_dir / "fit" / "fit.json").read_text())
    assert fit_json["data_range"]["runs"] == len(grid.runs) and fit_json["data_range"]["hours"] == [5.0, 50.0]


def test_run_then_fit_projects_to_the_grids_fit_block(write_grid, fake_jobs, capsys):
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


def test_fit_defaults_target_and_out_dir_and_reads_projections(grid_dict, truth, tmp_path, capsys):
    """`scale fit` with no target solves for the best run + 10 rounded up to 5 (37.2 -> 50), writes next to the
    table (TABLE_fit), reads --project as PARAMS,HOURS,IMG_SIZE after the default projections, and refuses
    --no-default-projections without --project."""
    grid = grid_from_dict(grid_dict(tmp_path))
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
def test_fit_refuses_projections_and_targets_a_grid_would_refuse(truth, grid_dict, tmp_path, capsys, argv):
    """--project values must be finite and > 0 and --target-accuracy a percentage in (0, 100], as in a grid's fit
    block: a usage error before anything is fitted, not a report with 0.00 or nan projections."""
    grid = grid_from_dict(grid_dict(tmp_path))
    _fake_rows(grid, truth)
    with pytest.raises(SystemExit) as info:
        scale_main(["fit", str(grid.table_path), "--n-boot", "2", "--form", "log_additive", *argv])
    assert info.value.code == 2 and f"error: argument {argv[0]}: " in capsys.readouterr().err
    assert not (tmp_path / "results_fit").exists()


def test_fit_with_an_unknown_form_is_a_clear_error(truth, grid_dict, tmp_path, capsys):
    """--form names one of the laws' forms; another name is a one-line error before anything is fitted, not a
    traceback after the whole fit."""
    grid = grid_from_dict(grid_dict(tmp_path))
    _fake_rows(grid, truth)
    assert scale_main(["fit", str(grid.table_path), "--form", "cubic"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mae-fast scale fit: --form must be one of log_additive, ") and "'cubic'" in err
    assert not (tmp_path / "results_fit").exists()


@pytest.mark.parametrize("content", [b"PK\x03\x04\xff\xfe binary spreadsheet", "dir"])
def test_fit_on_an_unreadable_table_is_a_clear_error(tmp_path, capsys, content):
    table = tmp_path / "results.csv"
    table.mkdir() if content == "dir" else table.write_bytes(content)
    assert scale_main(["fit", str(table), "--out", str(tmp_path / "fit")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mae-fast scale fit: {table}: cannot read it as a CSV text file")
    assert not (tmp_path / "fit").exists()



def test_grid_path_that_is_a_directory_is_a_clear_error(tmp_path, capsys):
    assert scale_main(["status", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("mae-fast scale status: ")


def test_dry_run_writes_nothing(grid_file, tmp_path, capsys):
    path = grid_file(tmp_path, {})
    assert scale_main(["run", str(path), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 12 and not (tmp_path / "sweep").exists()
    # this grid's job module exists only in the fake_jobs tests: listed all the same, with the warning
    assert "job 'fakejobs:resumable' cannot be loaded" in err and "scale run` will refuse to start" in err


@pytest.mark.parametrize("content", [b'{"state": "fail', b"", b"[1, 2]", b"null", b"\xff\xfe\x00garbage", "dir"])
def test_status_reports_a_damaged_status_json_and_goes_on(grid_file, tmp_path, capsys, content):
    path = grid_file(tmp_path, {})
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


def test_status_reports_a_torn_results_line_and_goes_on(grid_file, tmp_path, capsys):
    path = grid_file(tmp_path, {})
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
    with pytest.warns(SweepWarning, match=f"line 4: 3 fields, the header has {len(RESULT_COLUMNS)}; skipped"):
        assert grid.runs[2] in pending_runs(grid)  # the torn row does not count as done: the run is done again
        run_one(grid.runs[2], grid.run_dir(torn), grid.table_path, lambda cfg, d: {"top1": 13.0})
    assert sorted(load_results(grid.table_path)["run"]) == sorted(r.run_id for r in grid.runs[:3])


def test_status_reports_a_results_table_without_run_column(grid_file, tmp_path, capsys):
    path = grid_file(tmp_path, {})
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "results.csv").write_text("arch,top1\nvits14,5\n")
    assert scale_main(["status", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "left 12" in out and "warning: " in err and "no 'run' column" in err


def test_warnings_about_a_damaged_table_are_shown_once(write_grid, tmp_path, capsys):
    """A torn results line read several times by one command is reported once."""
    path = write_grid(tmp_path / "g.yaml", job=DEFAULT_JOB)  # a job that loads: no warning about it
    grid = load_grid(path)
    run_one(grid.runs[0], grid.run_dir(grid.runs[0].run_id), grid.table_path, lambda c, d: {"top1": 10.0})
    with open(grid.table_path, "ab") as fh:
        fh.write(b"torn,vits14,22")
    assert scale_main(["run", str(path), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "skipped" in err


def test_worker_runs_the_job_it_is_given(write_grid, tmp_path, monkeypatch):
    """`scale worker GRID RUN --job M:F` runs M:F (what run_local passes on), not the grid's job."""
    (tmp_path / "given_worker_job.py").write_text("def job(cfg, run_dir):\n    return {'top1': 12.75}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "given_worker_job", raising=False)
    path = write_grid(tmp_path / "g.yaml")
    grid = load_grid(path)
    try:
        assert scale_main(["worker", str(path), grid.runs[2].run_id, "--job", "given_worker_job:job"]) == 0
    finally:
        sys.modules.pop("given_worker_job", None)
    (row,) = load_results(grid.table_path).rows()
    assert row["run"] == grid.runs[2].run_id and row["top1"] == 12.75


def test_scale_memory_budget_minus_headroom(write_grid, tmp_path, monkeypatch, recorder):
    """`scale memory` plans for --budget x (1 - --headroom) GiB; a headroom of 0 is allowed."""
    from mae_fast.scaling import cli

    path = write_grid(tmp_path / "g.yaml")
    record = recorder([])
    monkeypatch.setattr(cli, "memory_plans", record)
    assert scale_main(["memory", str(path), "--devices", "4"]) == 0
    assert scale_main(["memory", str(path), "--budget", "40", "--headroom", "0", "--fsdp"]) == 0
    assert [(c[0][1], c[0][2], c[1]) for c in record.calls] == [(4, pytest.approx(72.0), {"fsdp": False}),
                                                                (1, 40.0, {"fsdp": True})]


def test_scale_memory_bad_arguments_are_clear_errors(grid_file, tmp_path, capsys):
    path = grid_file(tmp_path, {"models": ["mae_vit_small_patch14"], "img_sizes": [224], "hours": [5],
                                 "seeds": [1]})
    for bad in (["--devices", "0"], ["--devices", "-2"], ["--budget", "-5"], ["--headroom", "1.5"]):
        with pytest.raises(SystemExit) as info:
            scale_main(["memory", str(path), *bad])
        assert info.value.code == 2
        assert "error: argument --" in capsys.readouterr().err
    # 100 images per batch do not split over 3 devices: an error naming the run, not a traceback
    assert scale_main(["memory", str(path), "--devices", "3"]) == 2
    assert "is not divisible by 3 devices" in capsys.readouterr().err


def test_memory_plan_of_one_device_has_no_ddp_buckets_and_one_row_per_model_size(grid_dict, tmp_path):
    """On one device the plan is the plain step's estimate (no DDP gradient buckets); the seeds and hours of one
    model and resolution share one row."""
    from mae_fast.memory import estimate_mae_step
    from mae_fast.scaling.cli import memory_plans

    model = {"name": "d32", "base": "mae_vit_demo_patch8", "embed_dim": 32, "depth": 2, "num_heads": 2}
    grid = grid_from_dict(grid_dict(tmp_path, models=[model], img_sizes=[32], hours=[0.01, 0.03], seeds=[0, 1],
                                   budget={"images_seen": 960, "batch_size": 8}))
    (row,) = memory_plans(grid, devices=1, budget_gib=100.0)
    direct = estimate_mae_step("mae_vit_demo_patch8", 32, 8, amp_dtype=torch.bfloat16, norm_pix_loss=False,
                               embed_dim=32, depth=2, num_heads=2)
    assert row["micro_batch"] == 8 and row["configured_bytes"] == direct.peak


def test_fit_takes_images_as_the_data_axis_and_says_how_far_each_projection_reaches(tmp_path, capsys):
    """A table whose data column is `images`: fitted on it, named in the printout and the report; every projection
    printed (the default one at 10x the images, and the cheapest for the target) says how far it extrapolates;
    no nan or empty cells in the report."""
    import math

    import numpy as np

    rng = np.random.default_rng(3)
    path = tmp_path / "images.csv"
    with open(path, "w") as fh:
        fh.write("run,arch,params,images,img_size,seed,top1\n")
        for arch, n in (("s", 2.2e7), ("b", 8.6e7), ("l", 3.0e8)):
            for m in (5e5, 5e6, 5e7):
                for s in (1, 2):
                    top1 = 30 + 3 * math.log(n / 1e8) + 4 * math.log(m / 5e6) + rng.normal(0, 0.3)
                    fh.write(f"{arch}-{m:g}-{s},{arch},{n},{m},224,{s},{top1}\n")
    out = tmp_path / "fit"
    assert scale_main(["fit", str(path), "--out", str(out), "--n-boot", "0", "--form", "log_additive",
                       "--target-accuracy", "50"]) == 0
    text = capsys.readouterr().out
    assert "data axis: images" in text
    projections = text.split("projections (")[1].splitlines()[1:2]
    assert projections and "10x the images of any fitted run" in projections[0]
    cheapest = next(line for line in text.splitlines() if line.startswith("cheapest for 50%"))
    assert "images" in cheapest and ("of any fitted run" in cheapest or "within the fitted runs" in cheapest)
    md = (out / "report.md").read_text()
    assert "(data axis: `images`)" in md and "nan" not in md and "n/a" not in md
    assert json.loads((out / "fit.json").read_text())["data_unit"] == "images"
