"""Protocol identity (mae_fast/scaling/protocol.py): what the hash covers and leaves out, the runner's rows carrying
it, and fits refusing rows of different protocols with one line per differing setting."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from mae_fast.scaling import fit
from mae_fast.scaling.cli import main as scale_main
from mae_fast.scaling.grid import grid_from_dict
from mae_fast.scaling.protocol import ProtocolMismatch, check_protocols, protocol_columns, protocol_settings
from mae_fast.scaling.runner import result_row
from mae_fast.scaling.table import ResultsTable, append_result, load_results


def _config(grid_dict, tmp_path, **over):
    return grid_from_dict(grid_dict(tmp_path, **over)).runs[0].config


def test_hash_ignores_paths_seeds_cadence_and_axes_but_not_settings(grid_dict, tmp_path):
    cfg = _config(grid_dict, tmp_path)
    base = protocol_columns(cfg)
    same = copy.deepcopy(cfg)
    same.update(seed=99, hours=123.0, img_size=448, params=1e9, arch="other")
    same["data"] = dict(same["data"], source="/elsewhere")
    same["pretrain"] = dict(same["pretrain"], log_every=7, checkpoint_every=3, output_dir="/x", num_workers=0)
    same["eval"] = dict(same["eval"], data_root="/imagenet-copy")
    assert protocol_columns(same)["protocol_hash"] == base["protocol_hash"]
    for block, key, value in (("pretrain", "mask_ratio", 0.9), ("pretrain", "norm_pix_loss", True),
                              ("eval", "fraction", 0.01), ("budget", "batch_size", 77)):
        other = copy.deepcopy(cfg)
        other[block] = dict(other[block], **{key: value})
        assert protocol_columns(other)["protocol_hash"] != base["protocol_hash"], key
    explicit = copy.deepcopy(cfg)  # a default spelled out is the same protocol
    explicit["pretrain"] = dict(explicit["pretrain"], norm_pix_loss=protocol_settings(cfg)["pretrain"]["norm_pix_loss"])
    assert protocol_columns(explicit)["protocol_hash"] == base["protocol_hash"]
    settings = protocol_settings(cfg)
    assert "mask_ratio" in settings["pretrain"] and "seed" not in settings["pretrain"]  # the recipe is resolved
    assert json.loads(base["protocol_json"]) == json.loads(json.dumps(settings, default=str))


def test_runner_rows_carry_the_protocol(grid_dict, tmp_path):
    spec = grid_from_dict(grid_dict(tmp_path)).runs[0]
    row = result_row(spec, {"top1": 20.0}, 1.0)
    assert row["protocol_hash"] == protocol_columns(spec.config)["protocol_hash"] and row["protocol"]


def _rows(tmp_path, grid_dict, variant):
    rows = []
    for i, spec in enumerate(grid_from_dict(grid_dict(tmp_path)).runs):
        cfg = copy.deepcopy(spec.config)
        if variant and i % 2:
            cfg["pretrain"] = dict(cfg["pretrain"], mask_ratio=0.9)
            cfg["eval"] = dict(cfg["eval"], fraction=0.01)
        rows.append({"run": spec.run_id, "params": cfg["params"], "hours": cfg["hours"], "img_size": cfg["img_size"],
                     "seed": cfg["seed"], "top1": 20 + 2 * np.log(cfg["hours"]) + i % 3, **protocol_columns(cfg)})
    return rows


def test_fit_refuses_mixed_protocols_and_says_which_settings_differ(grid_dict, tmp_path):
    table = ResultsTable.from_rows(_rows(tmp_path, grid_dict, variant=True))
    with pytest.raises(ProtocolMismatch) as err:
        check_protocols(table)
    lines = str(err.value).splitlines()
    assert "rows of 2 protocols" in lines[0] and "--mixed-protocols" in lines[0]
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == ["eval.fraction", "pretrain.mask_ratio"]
    assert "mixed" in check_protocols(table, allow_mixed=True)
    one = ResultsTable.from_rows(_rows(tmp_path, grid_dict, variant=False))
    assert "[" in check_protocols(one)  # one protocol: its name and hash
    bare = ResultsTable.from_rows([{k: v for k, v in r.items() if not k.startswith("protocol")}
                                   for r in _rows(tmp_path, grid_dict, variant=True)])
    assert check_protocols(bare) == "unrecorded"  # a table without the columns is one protocol


def test_cli_fit_refuses_mixed_protocols_with_exit_2(grid_dict, tmp_path, capsys):
    path = tmp_path / "mixed.csv"
    for row in _rows(tmp_path, grid_dict, variant=True):
        append_result(path, row)
    assert scale_main(["fit", str(path), "--n-boot", "0", "--form", "log_additive", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mae-fast scale fit: ") and "\n  pretrain.mask_ratio: 0.75 [" in err and "Traceback" not in err
    law = fit(load_results(path), forms=["log_additive"], n_boot=0, mixed_protocols=True, calibrate=False)
    assert law.protocol.startswith("mixed: ")
