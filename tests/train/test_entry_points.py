"""The training command lines: one-line errors with exit code 2, the subcommand's fixed mode, and the rule that the
library never imports the entry points."""
from __future__ import annotations

import ast
import dataclasses
import re
import typing
import warnings
from pathlib import Path

import numpy as np
import pytest

import mae_fast
from helpers.train import write_pngs
from mae_fast.training import config as config_mod
from mae_fast.training import finetune as ft
from mae_fast.training import pretrain as pretrain_mod
from mae_fast.training.config import FinetuneConfig, PretrainConfig


def test_bad_config_from_cli_exits_2_with_message(capsys):
    from mae_fast.training.pretrain import main

    assert main(["not_a_key=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'not_a_key'" in err and "valid keys" in err


def test_missing_data_and_damaged_checkpoints_exit_2_with_one_line(tmp_path, capsys):
    """A wrong path or a damaged file is the user's input: one line on stderr, exit code 2, no traceback."""
    from mae_fast.training.finetune import main as finetune_main
    from mae_fast.training.pretrain import main as pretrain_main

    missing = tmp_path / "no_such_dir"
    assert pretrain_main([f"data_source={missing}", f"output_dir={tmp_path}"]) == 2
    assert f"data source '{missing}' does not exist" in capsys.readouterr().err

    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"\x80\x02 this is not a checkpoint")
    assert pretrain_main([f"resume={damaged}", f"output_dir={tmp_path}", "steps=1"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {damaged} could not be read" in err and "Traceback" not in err

    assert finetune_main([f"checkpoint={damaged}", f"output_dir={tmp_path}"]) == 2
    assert f"could not read checkpoint {damaged}" in capsys.readouterr().err
    with pytest.raises(mae_fast.CheckpointError):  # the library raises it, a RuntimeError like before
        mae_fast.load_pretrained(mae_fast.create_model("mae_vit_small_patch16"), damaged)


def test_finetune_cli_reports_missing_validation_images_in_one_line(tmp_path, capsys):
    from mae_fast.training.finetune import main

    for c in ("a", "b"):
        write_pngs(tmp_path / "data" / "train" / c, 3)
    (tmp_path / "data" / "val").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no checkpoint: random init
        rc = main([f"data_root={tmp_path / 'data'}", f"output_dir={tmp_path}", "epochs=1", "batch_size=4",
                   "progress=false", "memory_budget_gib=null"], mode="linprobe")
    err = capsys.readouterr().err
    assert rc == 2 and "no readable validation images under" in err and "Traceback" not in err
    assert not (tmp_path / "linprobe").exists()  # stopped before training


def test_bad_model_from_cli_exits_2_with_one_line(tmp_path, capsys):
    from mae_fast.training.pretrain import main

    assert main([f"output_dir={tmp_path}", "img_size=65", "data_source=synthetic"]) == 2
    err = capsys.readouterr().err
    assert "img_size 65x65 must be divisible by patch_size 8" in err and "Traceback" not in err


def test_unreadable_data_is_one_line_from_every_cli(tmp_path, capsys):
    """A folder whose every image is corrupt: pretrain, linprobe and the shard writer each print one line naming
    the folder and exit 2 (a DataError, still a RuntimeError for code that caught those)."""
    from mae_fast.data import DataError
    from mae_fast.data.shards import main as shards_main
    from mae_fast.training.finetune import main as finetune_main
    from mae_fast.training.pretrain import main as pretrain_main

    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        (tmp_path / "bad" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "bad" / c / f"{i}.jpg").write_bytes(b"\xff\xd8" + rng.bytes(40))  # a JPEG cut short
    assert issubclass(DataError, RuntimeError)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each skipped file warns
        runs = {"pretrain": lambda: pretrain_main([f"output_dir={tmp_path / 'out'}", f"data_source={tmp_path / 'bad'}",
                                                   "steps=1", "progress=false"]),
                "linprobe": lambda: finetune_main([f"data_root={tmp_path / 'bad'}", f"output_dir={tmp_path / 'out'}",
                                                   "epochs=1", "progress=false"], mode="linprobe"),
                "shards": lambda: shards_main([str(tmp_path / "bad"), str(tmp_path / "shards")])}
        for name, run in runs.items():
            rc = run()
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if "Warning" not in line and line.strip()]
            assert rc == 2, name
            assert len(lines) == 1 and str(tmp_path / "bad") in lines[0] and "Traceback" not in err, (name, err)


def test_the_subcommand_fixes_the_mode_and_the_script_takes_it_from_the_command_line(monkeypatch, capsys):
    """`mae-fast linprobe mode=finetune` used to finetune; now the contradiction is refused before any work. The
    script (`torchrun train/finetune.py`) has no subcommand, so there `mode=linprobe` chooses the probe."""
    fixed = {"mode": "linprobe"}
    with pytest.raises(config_mod.ConfigError, match="mode='finetune' contradicts the command, which sets "
                                                     "mode='linprobe'"):
        config_mod.config_from_argv(["mode=finetune"], config_mod.FINETUNE_KEYS, None, fixed=fixed)
    same = config_mod.config_from_argv(["mode=linprobe"], config_mod.FINETUNE_KEYS, None, fixed=fixed)
    assert same["mode"] == "linprobe"
    seen = []
    monkeypatch.setattr(ft, "finetune", lambda cfg: seen.append(cfg["mode"]) or {})
    assert ft.main(["mode=finetune"], mode="linprobe") == 2 and seen == []
    assert "mae-fast linprobe: mode='finetune' contradicts" in capsys.readouterr().err
    assert ft.main(["mode=linprobe"]) == 0 and ft.main([]) == 0 and seen == ["linprobe", "finetune"]


def test_linprobe_of_the_finetuning_recipe_stops_on_its_pool_before_reading_data(tmp_path, monkeypatch, capsys):
    """`mae-fast linprobe --config mae_official_finetune` (mode fixed by the subcommand) meets the recipe's
    pool=mean_fc_norm, which a probe refuses: the CLI says so before scanning the labelled set (an ImageNet scan
    took minutes before the refusal); pool=cls passes that check."""
    import mae_fast.data as data_mod
    import mae_fast.training.finetune as ft

    scanned = []
    monkeypatch.setattr(data_mod, "build_labelled_datasets", lambda *a, **k: scanned.append(1) or 1 / 0)
    argv = ["--config", "mae_official_finetune", f"output_dir={tmp_path}", "checkpoint=null"]
    assert ft.main(argv, mode="linprobe") == 2
    assert "pool=mean_fc_norm trains a new LayerNorm" in capsys.readouterr().err and not scanned
    with pytest.warns(RuntimeWarning, match="random weights"), pytest.raises(ZeroDivisionError):
        ft.main([*argv, "pool=cls"], mode="linprobe")
    assert scanned == [1]


def _imported_modules(path: Path, package: str):
    """(line, dotted module) for every import in ``path`` (a module of ``package``), relative ones resolved, plus
    module names given as text to importlib (``"mae_fast.train.x"``; docstrings aside)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if re.fullmatch(r"mae_fast\.train\.\w[\w.]*", node.value):
                yield node.lineno, node.value


def test_the_library_never_imports_the_entry_points():
    """No module of the library (mae_fast/, and kernels/, csrc/ installed as mae_fast.kernels / .csrc) imports
    mae_fast.train, the scripts in train/, nor names one of them for importlib; reading the packaged recipes and
    grids with ``files("mae_fast.train")`` is data access and allowed."""
    repo = Path(mae_fast.__file__).resolve().parents[1]
    offenders = []
    for folder, prefix in (("mae_fast", "mae_fast"), ("kernels", "mae_fast.kernels"), ("csrc", "mae_fast.csrc")):
        for path in sorted((repo / folder).rglob("*.py")):
            rel = path.relative_to(repo / folder).with_suffix("")
            parts = [prefix, *rel.parts]
            package = ".".join(parts[:-1])
            for line, module in _imported_modules(path, package):
                if module == "mae_fast.train" or module.startswith("mae_fast.train."):
                    offenders.append(f"{path.relative_to(repo)}:{line} {module}")
    assert not offenders, offenders


def test_the_scan_sees_every_way_of_importing_the_entry_points(tmp_path):
    """The scan above is not blind: each spelling of an import of mae_fast.train is found."""
    cases = {"import mae_fast.train.pretrain": "mae_fast.train.pretrain",
             "from mae_fast.train import pretrain": "mae_fast.train.pretrain",
             "from mae_fast import train": "mae_fast.train",
             "from .train.pretrain import main": "mae_fast.train.pretrain",
             "from ..train import finetune": "mae_fast.train.finetune",
             "COMMANDS = {'x': ('mae_fast.train.curves', 'main')}": "mae_fast.train.curves"}
    for code, module in cases.items():
        path = tmp_path / "m.py"
        path.write_text(code + "\n")
        package = "mae_fast.scaling" if code.startswith("from ..") else "mae_fast"
        assert module in {m for _, m in _imported_modules(path, package)}, code


@pytest.mark.parametrize("cls, argv, recipe", [(PretrainConfig, [], "demo"),
                                               (PretrainConfig, ["--config", "humanlike_vith14"], "humanlike_vith14"),
                                               (FinetuneConfig, [], None)])
def test_help_lists_every_key_with_its_meaning_and_the_value_the_recipe_gives_it(capsys, cls, argv, recipe):
    """`--help` lists each key with the value a run would take: the chosen recipe's (`mae-fast pretrain` runs the demo
    recipe), else the key's default; finetune has no default recipe."""
    import yaml

    main = pretrain_mod.main if cls is PretrainConfig else (lambda argv: ft.main(argv, mode="finetune"))
    assert main([*argv, "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    recipe_values = yaml.safe_load((Path(mae_fast.__file__).parent.parent / "train" / "recipes" /
                                    f"{recipe}.yaml").read_text()) if recipe else {}
    if recipe:
        assert any(f"with the recipe {recipe}" in line for line in lines)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        expected = recipe_values.get(f.name, default)
        if isinstance(default, float) and isinstance(expected, int):
            expected = float(expected)
        row = next(line for line in lines if line.startswith(f"  {f.name} "))
        assert f.metadata["help"] in row and row.endswith(f"[default: {expected!r}]"), row


@pytest.mark.parametrize("cls", [PretrainConfig, FinetuneConfig])
def test_typed_config_fields_match_the_key_tables_and_round_trip(cls):
    """One field per recipe key, its default of its declared type; the dict the parser builds becomes the typed
    config and back unchanged (config.yaml and checkpoints store that dict); an unknown key is refused."""
    keys = config_mod.KEYS[cls]
    hints = typing.get_type_hints(cls)
    assert [f.name for f in dataclasses.fields(cls)] == list(keys)
    for f in dataclasses.fields(cls):
        assert isinstance(keys[f.name][0], hints[f.name]), (f.name, hints[f.name])
    argv = ["lr=0.001", "model_kwargs.depth=2", "name=007"] + (["mode=linprobe"] if cls is FinetuneConfig else [])
    d = config_mod.config_from_argv(argv, keys, config_mod.DEFAULT_RECIPE[cls])
    cfg = cls.from_dict(d)
    assert (cfg.lr, cfg.model_kwargs, cfg.name) == (0.001, {"depth": 2}, "007") and cfg.to_dict() == d
    assert cls.build(cfg) is cfg and cls.build(dict(d, recipe=None)) == cfg
    with pytest.raises(TypeError):
        cls.from_dict({**d, "bogus": 1})


def test_ctrl_c_twice_stops_at_once_with_exit_130_no_traceback_and_a_checkpoint_of_the_step(tmp_path):
    """`mae-fast pretrain` (with a DataLoader worker) gets Ctrl-C twice, as a terminal sends it (to the whole process
    group): exit 130, no traceback from the trainer or the worker, a line naming the checkpoint kept, which is the
    finished step's (the periodic one is far off) and resumable."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers.train import tiny
    from mae_fast.training import checkpoint as checkpoint_io

    cfg = tiny(tmp_path, name="ctrlc", steps=40, checkpoint_every=100, debug_step_sleep_s=0.5, num_workers=1)
    args = [f"{k}={json.dumps(v)}" for k, v in cfg.items() if k != "recipe"]
    proc = subprocess.Popen([sys.executable, "-m", "mae_fast.cli", "pretrain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = tmp_path / "ctrlc" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    found = re.search(r"second SIGINT: stopped at once at step (\d+)/40; checkpoint (\S+) of step (\d+)", err)
    assert found and found[1] == found[3], err
    step, path = int(found[1]), Path(found[2])
    assert step >= 2 and path.is_file()
    latest = checkpoint_io.latest_valid_checkpoint(tmp_path / "ctrlc")
    assert latest[0] == path and latest[1]["step"] == step
