"""The results table (mae_fast/scaling/table.py): clear errors for bad CSVs, other columns kept, rows deduplicated by
run (rows without one all kept), models told apart without an arch column, concurrent appends that lose nothing."""
from __future__ import annotations

import csv
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from mae_fast.scaling import ResultsTable, TableError, append_result, load_results
from mae_fast.scaling.cli import main as scale_main


def write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_bad_tables_get_clear_errors(tmp_path):
    header = ["run", "params", "hours", "img_size", "top1"]
    with pytest.raises(TableError, match=r"missing required column\(s\) 'hours', 'img_size'"):
        load_results(write_csv(tmp_path / "a.csv", ["run", "params", "top1"], [["x", 1e8, 20]]))
    with pytest.raises(TableError, match=r"line 3: hours must be > 0 \(got 0\)"):
        load_results(write_csv(tmp_path / "b.csv", header, [["x", 1e8, 5, 224, 20], ["y", 1e8, 0, 224, 21]]))
    with pytest.raises(TableError, match=r"line 2: hours must be > 0 \(got -5\)"):
        load_results(write_csv(tmp_path / "c.csv", header, [["x", 1e8, -5, 224, 20]]))
    with pytest.raises(TableError, match=r"line 2, column 'top1': 'abc' is not a number"):
        load_results(write_csv(tmp_path / "d.csv", header, [["x", 1e8, 5, 224, "abc"]]))
    with pytest.raises(TableError, match=r"column 'params': empty"):
        load_results(write_csv(tmp_path / "e.csv", header, [["x", "", 5, 224, 20]]))
    with pytest.raises(TableError, match=r"top1 must be a percentage"):
        load_results(write_csv(tmp_path / "f.csv", header, [["x", 1e8, 5, 224, 120]]))
    with pytest.raises(TableError, match="no data rows"):
        load_results(write_csv(tmp_path / "g.csv", header, []))
    with pytest.raises(TableError, match="no such results table"):
        load_results(tmp_path / "missing.csv")
    with pytest.raises(TableError, match="missing required column.*'acc'"):
        load_results(write_csv(tmp_path / "h.csv", header, [["x", 1e8, 5, 224, 20]]), target="acc")
    # the CLI reports it as an error, not a traceback
    assert scale_main(["fit", str(tmp_path / "c.csv"), "--out", str(tmp_path / "o")]) == 2


def test_user_table_with_other_columns_loads_and_dedupes_by_run(tmp_path):
    header = ["run", "params", "hours", "img_size", "top1", "note"]
    rows = [["a", 1e8, 5, 224, 20, "first"], ["b", 2e8, 5, 224, 22, ""], ["a", 1e8, 5, 224, 21, "again"]]
    t = load_results(write_csv(tmp_path / "u.csv", header, rows))
    assert len(t) == 2
    assert list(t["run"]) == ["b", "a"] and t["top1"][1] == 21 and t["note"][1] == "again"
    assert t["params"].dtype == np.float64


def _csv(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_negative_accuracy_and_infinite_factors_are_refused(tmp_path):
    head = "run,params,hours,img_size,top1,top5"
    with pytest.raises(TableError, match=r"line 3: top1 must be a percentage"):
        load_results(_csv(tmp_path / "a.csv", [head, "a,1e8,5,224,20,40", "b,1e8,7,224,-3,40"]))
    with pytest.raises(TableError, match=r"line 2: top5 must be a percentage"):
        load_results(_csv(tmp_path / "b.csv", [head, "a,1e8,5,224,20,-40"]))
    for col, row in (("hours", "a,1e8,inf,224,20,40"), ("params", "a,inf,5,224,20,40"),
                     ("top5", "a,1e8,5,224,20,inf")):
        with pytest.raises(TableError, match=rf"column '{col}': 'inf' is not a finite number"):
            load_results(_csv(tmp_path / f"{col}.csv", [head, row]))


def test_rows_without_a_run_id_are_all_kept(tmp_path):
    lines = ["run,params,hours,img_size,top1", ",1e8,5,224,20", "x,2e8,5,224,22", ",3e8,5,224,23",
             "x,2e8,5,224,24", ",3e8,5,224,25"]
    t = load_results(_csv(tmp_path / "u.csv", lines))
    assert list(t["top1"]) == [20, 23, 24, 25]


def test_models_without_an_arch_column_are_told_apart_by_their_parameter_count():
    rows = [{"params": p, "hours": 9.0, "img_size": 224.0, "top1": 30.0} for p in (2.2e7, 2.6e7, 2.2e7, 2.61e7)]
    t = ResultsTable.from_rows(rows)
    assert t.group_ids().tolist() == [0, 1, 0, 2]


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


def test_runner_rows_of_an_image_count_grid_fit_on_images(tmp_path):
    # The runner writes every result column, so an image-count grid's rows have a blank ``hours`` cell
    # beside ``images``: the table must take ``images`` as the data axis, not refuse the blank hours.
    path = tmp_path / "results.csv"
    rng = np.random.default_rng(3)
    images = [1000, 4000, 16000]
    for i, (n, params) in enumerate([(n, p) for n in images for p in (1e6, 4e6)]):
        append_result(path, {"run": f"r{i}", "arch": f"m{params:g}", "params": params, "img_size": 224,
                             "seed": 0, "top1": float(rng.uniform(10, 40)), "images": n})
    table = load_results(path)
    assert table.data_unit == "images"
    assert sorted(set(table["hours"].tolist())) == images
    # a real hours table with an (informational) images column keeps hours as its axis
    append_result(path, {"run": "h", "arch": "m", "params": 1e6, "img_size": 224, "hours": 5.0, "seed": 0,
                         "top1": 20.0, "images": 10})
    with pytest.raises(TableError, match="hours"):
        load_results(path)
