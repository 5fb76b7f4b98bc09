"""Sweep grids (mae_fast/scaling/grid.py): expansion order and stable, readable run ids that hash what a run
computes; each run's parameter count (against the built encoder) and budget; defaults; the packaged grids; and
malformed grids refused with one line naming the file and key, before anything runs."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import yaml

import mae_fast
from mae_fast.scaling import runner as runner_mod
from mae_fast.scaling.cli import main as scale_main
from mae_fast.scaling.grid import GridError, fit_options, grid_from_dict, load_grid
from mae_fast.scaling.runner import default_job

DEFAULT_JOB = "mae_fast.scaling.runner:default_job"


def test_grid_expands_with_stable_readable_ids(grid_dict, tmp_path):
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


def test_expansion_order_and_data_fraction(grid_dict, tmp_path):
    """Runs come models x resolutions x hours x seeds; data_fraction is hours / data.total_hours."""
    grid = grid_from_dict(grid_dict(tmp_path, hours=[7, 0.5, 40], seeds=[3, 1], data={"total_hours": 1234}))
    got = [(r.config["arch"], r.config["img_size"], r.config["hours"], r.config["seed"]) for r in grid.runs]
    want = [(a, s, h, seed) for a, sizes in (("vits14", (224, 448)), ("tinyvit", (224,)))
            for s, h, seed in itertools.product(sizes, (7, 0.5, 40), (3, 1))]
    assert got == want
    assert [r.config["data_fraction"] for r in grid.runs] == [round(h / 1234, 12) for _, _, h, _ in want]


def test_run_ids_do_not_depend_on_key_order_but_on_every_setting(grid_dict, tmp_path):
    """A run's id hashes its resolved config: the same settings written in another key order are the same runs
    (an edited grid must not re-run what it already has); another eval setting is another run."""
    a = grid_from_dict(grid_dict(tmp_path, pretrain={"lr": 1e-3, "mask_ratio": 0.6, "recipe": "demo"},
                                eval={"protocol": "linprobe", "epochs": 3, "num_classes": 1000}))
    b = grid_from_dict(grid_dict(tmp_path, pretrain={"recipe": "demo", "mask_ratio": 0.6, "lr": 1e-3},
                                eval={"num_classes": 1000, "epochs": 3, "protocol": "linprobe"}))
    assert [r.run_id for r in a.runs] == [r.run_id for r in b.runs]
    c = grid_from_dict(grid_dict(tmp_path, pretrain={"lr": 1e-3, "mask_ratio": 0.6, "recipe": "demo"},
                                eval={"protocol": "linprobe", "epochs": 4, "num_classes": 1000}))
    assert not {r.run_id for r in a.runs} & {r.run_id for r in c.runs}
    assert c.runs[0].config["eval"]["epochs"] == 4


def encoder_params(name: str, img_size: int, num_classes: int, **overrides) -> int:
    """Parameters of the built model's encoder (no decoder, no mask token) plus a linear head."""
    with torch.device("meta"):
        model = mae_fast.create_model(name, img_size=img_size, **overrides)
    enc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder", "mask_token")))
    width = model.cls_token.shape[-1]
    return enc + (width * num_classes + num_classes if num_classes else 0)


def test_params_column_counts_the_built_encoder_and_head(grid_dict, tmp_path):
    """Each run's ``params`` is its encoder's parameter count (blocks with MLP biases, cls token, position
    embedding over tokens + 1, final norm) plus the head, at its own resolution and MLP ratio."""
    model = {"name": "odd", "base": "mae_vit_tiny_patch14", "embed_dim": 36, "depth": 3, "num_heads": 3,
             "mlp_ratio": 2.5}
    for classes in (7, 0):
        grid = grid_from_dict(grid_dict(tmp_path, models=[model, "mae_vit_tiny_patch14"], img_sizes=[70, 126],
                                       hours=[3], seeds=[1], eval={"protocol": "linprobe", "num_classes": classes}))
        for run in grid.runs:
            c = run.config
            overrides = {k: v for k, v in model.items() if k not in ("name", "base")} if c["arch"] == "odd" else {}
            assert c["params"] == encoder_params("mae_vit_tiny_patch14", c["img_size"], classes, **overrides), run.run_id


def test_arch_labels_name_registry_models_only_when_unchanged(grid_dict, tmp_path):
    """A registry model keeps the shared table's label (vits14) when listed by name or as a dict labelled with its own
    name; with overrides it is a different model and gets a shape label instead."""
    grid = grid_from_dict(grid_dict(tmp_path, img_sizes=[224], hours=[5], seeds=[1], models=[
        {"name": "mae_vit_small_patch14"}, {"base": "mae_vit_small_patch14", "depth": 5}]))
    assert [r.config["arch"] for r in grid.runs] == ["vits14", "vit_w384d5p14"]
    assert grid.runs[1].config["depth"] == 5 and grid.runs[1].config["model"]["overrides"] == {"depth": 5}


def test_budget_rounds_up_images_and_steps(grid_dict, tmp_path):
    """``rule: epochs``: images = ceil(epochs x frames of the subset), frames = hours x 3600 x fps; steps =
    ceil(images / batch); ``epochs`` records images / frames. ``rule: images_seen``: steps rounded up too."""
    by_epochs = grid_from_dict(grid_dict(tmp_path, hours=[0.37], seeds=[1], models=["mae_vit_tiny_patch14"],
                                        img_sizes=[224], data={"fps": 3, "total_hours": 10},
                                        budget={"rule": "epochs", "epochs": 0.7, "batch_size": 64}))
    b = by_epochs.runs[0].config["budget"]
    frames = round(0.37 * 3600 * 3)  # 3996
    assert b["subset_images"] == frames and b["images_seen"] == math.ceil(0.7 * frames) == 2798
    assert b["steps"] == 44 and b["epochs"] == pytest.approx(2798 / 3996) and b["batch_size"] == 64
    by_images = grid_from_dict(grid_dict(tmp_path, budget={"images_seen": 1000, "batch_size": 96}))
    assert {r.config["budget"]["steps"] for r in by_images.runs} == {11}  # 1000 / 96 = 10.4
    tiny = grid_from_dict(grid_dict(tmp_path, hours=[1e-5], budget={"rule": "epochs", "epochs": 3}))
    assert tiny.runs[0].config["budget"]["subset_images"] == 1  # never 0 images, even for 0.036 of a frame
    assert tiny.runs[0].config["budget"]["images_seen"] == 3


def test_model_blocks_override_the_grid_and_hours_entries_name_their_seeds(grid_dict, tmp_path):
    """A model's pretrain / eval / budget keys override the grid's for its runs only; an hours entry
    ``{hours: h, seeds: [...]}`` takes its own seeds (one draw of the full data); ``rule: steps`` fixes the steps."""
    models = ["mae_vit_small_patch14", {"base": "mae_vit_tiny_patch14", "pretrain": {"lr": 3e-4},
                                        "eval": {"batch_size": 11}, "budget": {"steps": 7, "batch_size": 136}}]
    grid = grid_from_dict(grid_dict(tmp_path, models=models, img_sizes=[224], seeds=[1, 2, 3],
                                    hours=[5, {"hours": 5000, "seeds": [1]}],
                                    budget={"rule": "steps", "steps": 20, "batch_size": 64},
                                    pretrain={"lr": 1e-3, "mask_ratio": 0.8}, eval={"protocol": "finetune"}))
    got = [(r.config["arch"], r.config["hours"], r.config["seed"]) for r in grid.runs]
    assert got == [(a, h, s) for a in ("vits14", "vitt14") for h, s in ((5, 1), (5, 2), (5, 3), (5000, 1))]
    small, tiny = grid.runs[0].config, grid.runs[-1].config
    assert small["pretrain"] == {"lr": 1e-3, "mask_ratio": 0.8} and tiny["pretrain"] == {"lr": 3e-4, "mask_ratio": 0.8}
    assert small["eval"] == {"protocol": "finetune"} and tiny["eval"] == {"protocol": "finetune", "batch_size": 11}
    assert (small["budget"]["steps"], small["budget"]["batch_size"], small["budget"]["images_seen"]) == (20, 64, 1280)
    assert (tiny["budget"]["steps"], tiny["budget"]["batch_size"], tiny["budget"]["images_seen"]) == (7, 136, 952)
    plain = grid_from_dict(grid_dict(tmp_path, models=models[:1], img_sizes=[224], seeds=[1], hours=[5]))
    assert plain.runs[0].run_id == grid_from_dict(grid_dict(tmp_path, models=[{"base": "mae_vit_small_patch14"}],
                                                            img_sizes=[224], seeds=[1], hours=[5])).runs[0].run_id


def test_packaged_humanlike_grid_is_the_published_study():
    """78 runs as the published logs: 6 model x resolution pairs x (4 subset fractions x 3 draws + the full data);
    each pair's batch and steps are its recipe's, its finetuning batch / lr the published ones."""
    from mae_fast.training.config import PretrainConfig

    grid = load_grid("humanlike")
    assert len(grid.runs) == 78
    pairs, recipes = {}, {}
    for r in grid.runs:
        c = r.config
        pairs.setdefault((c["arch"], c["img_size"]), []).append((c["hours"], c["seed"]))
        name = c["pretrain"]["recipe"]
        if name not in recipes:
            recipes[name] = PretrainConfig.build({"recipe": name})
        recipe = recipes[name]
        assert (recipe.batch_size, recipe.steps, recipe.img_size) == \
            (c["budget"]["batch_size"], c["budget"]["steps"], c["img_size"])
        assert c["eval"]["recipe"] == "humanlike_finetune" and c["data_fraction"] in (1e-4, 1e-3, 1e-2, 0.1, 1.0)
    want = [(h, s) for h in (0.5, 5, 50, 500) for s in (1, 2, 3)] + [(5000, 1)]
    assert pairs == {k: want for k in [("vits14", 224), ("vitb14", 224), ("vitl14", 224), ("vith14", 224),
                                       ("vith14", 448), ("vith14", 476)]}
    h476 = next(r.config for r in grid.runs if r.config["img_size"] == 476)
    assert (h476["eval"]["batch_size"], h476["eval"]["lr"], h476["params"]) == (11, 5e-5, pytest.approx(633.2e6, rel=1e-3))


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


def test_single_values_are_one_element_axes(grid_dict, tmp_path):
    """``hours: 5`` is one data size; likewise a single model, or a model's single resolution (not its digits)."""
    one = {"name": "x", "base": "mae_vit_tiny_patch14", "img_sizes": "224"}
    grid = grid_from_dict(grid_dict(tmp_path, models=one, hours=5, seeds=1))
    assert [(r.config["arch"], r.config["img_size"], r.config["hours"]) for r in grid.runs] == [("x", 224, 5.0)]
    grid = grid_from_dict(grid_dict(tmp_path, models="mae_vit_tiny_patch14", img_sizes=224, hours=5, seeds=1))
    assert [r.config["arch"] for r in grid.runs] == ["vitt14"]
    headless = grid_from_dict(grid_dict(tmp_path, eval={"protocol": "linprobe", "num_classes": 0}))
    assert headless.runs[0].config["params"] < grid_from_dict(grid_dict(tmp_path)).runs[0].config["params"]


def test_packaged_demo_grid_loads_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    grid = load_grid("demo")
    assert grid.name == "demo" and len(grid.runs) == 12 and grid.out_dir == tmp_path / "runs" / "scaling" / "demo"
    assert {r.config["img_size"] for r in grid.runs} == {64}
    # 45 epochs over 4 frames/s of each run's hours, batch 64: steps grow with the hours
    assert sorted({(r.config["hours"], r.config["budget"]["steps"]) for r in grid.runs}) == [
        (0.03, math.ceil(45 * 0.03 * 3600 * 4 / 64)), (0.06, math.ceil(45 * 0.06 * 3600 * 4 / 64)),
        (0.1, math.ceil(45 * 0.1 * 3600 * 4 / 64))]
    assert scale_main(["run", "no_such_grid", "--dry-run"]) == 2
    assert "no such grid file (packaged grids: demo" in capsys.readouterr().err


def test_fit_block_order_and_a_target_of_100(tmp_path):
    """The fit block gives (label, params, hours, img_size) in that order; 100% is a valid target."""
    projections, target = fit_options({"fit": {"projections": [{"params": 3e8, "hours": 70, "img_size": 336}],
                                               "target_accuracy": 100}})
    assert projections == [(None, 3e8, 70.0, 336.0)] and target == 100


def test_unknown_run_id_is_a_key_error(grid_dict, tmp_path):
    grid = grid_from_dict(grid_dict(tmp_path))
    assert grid.get(grid.runs[5].run_id) is grid.runs[5]
    with pytest.raises(KeyError, match="no run"):
        grid.get("vits14-224px-5h-s1-0000000000")


def test_bad_grids_are_refused(grid_dict, tmp_path):
    with pytest.raises(GridError, match="unknown model 'mae_vit_nope'"):
        grid_from_dict(grid_dict(tmp_path, models=["mae_vit_nope"]))
    with pytest.raises(GridError, match="not a multiple of patch 14"):
        grid_from_dict(grid_dict(tmp_path, img_sizes=[100]))
    with pytest.raises(GridError, match="hours must be > 0"):
        grid_from_dict(grid_dict(tmp_path, hours=[0, 5]))
    with pytest.raises(GridError, match="budget.rule"):
        grid_from_dict(grid_dict(tmp_path, budget={"rule": "vibes"}))


@pytest.mark.parametrize("over, fragment", [
    ({"hours": [5, 50, 5]}, "duplicate runs"),
    ({"budget": {"images_seen": 1000, "batch_size": True}}, "budget.batch_size"),
    ({"budget": {"images_seen": 1000, "batch_size": 64.5}}, "budget.batch_size must be a whole number"),
    ({"eval": {"protocol": "knn"}}, "eval.protocol must be finetune or linprobe"),
])
def test_more_malformed_grids_are_refused(grid_dict, tmp_path, over, fragment):
    with pytest.raises(GridError, match=fragment.replace(".", r"\.")):
        grid_from_dict(grid_dict(tmp_path, **over))



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
    ({"budget": {"rule": "steps", "steps": 2.5}}, "budget.steps must be a whole number"),
    ({"hours": [5, {"hours": 50, "seed": [1]}]}, "hours: an entry that is a mapping has hours and seeds"),
    ({"hours": [{"hours": 50, "seeds": [0.5]}]}, "hours: seeds: expected whole numbers"),
    ({"models": [{"base": "mae_vit_tiny_patch14", "eval": [1]}]}, "eval must be a mapping"),
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
    ({"executor": {"name": "local", "mode": "subprocess", "parallel": 0}}, "executor.parallel must be a whole number"),
    ({"executor": {"name": "local", "mode": "subprocess", "parallel": "two"}}, "executor.parallel must be a whole"),
    ({"executor": {"name": "local", "mode": "inprocess", "parallel": 2}}, "parallel > 1 needs executor {name: local"),
    ({"executor": {"name": "slurm", "parallel": 2}}, "parallel > 1 needs executor {name: local, mode: subprocess}"),
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
def test_malformed_grid_is_a_clear_error_naming_file_and_key(grid_file, tmp_path, capsys, over, fragment):
    path = grid_file(tmp_path, over)
    if "job" not in over:  # the job is imported by `scale run`, not by loading the grid
        with pytest.raises(GridError) as info:
            load_grid(path)
        assert fragment in str(info.value) and str(info.value).startswith(str(path))
    assert scale_main(["run", str(path)]) == 2  # not a traceback, and nothing was started
    err = capsys.readouterr().err
    assert err.startswith("mae-fast scale ") and fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sweep").exists()


def test_an_images_axis_sweeps_image_count_subsets_and_its_rows_carry_images(grid_dict, tmp_path, monkeypatch):
    """``images: [...]`` instead of ``hours``: each run pretrains on that many images (pretraining's ``images`` key),
    its budget counts epochs over them, its id says ``<n>img``, and its results row has an ``images`` column; a grid
    with both axes is refused."""
    raw = grid_dict(tmp_path, images=[500, 2000], data={"source": "/data/images", "total_images": 10000},
                    budget={"rule": "epochs", "epochs": 3, "batch_size": 100})
    del raw["hours"]
    g = grid_from_dict(raw)
    cfg = g.runs[0].config
    assert [r.config["images"] for r in g.runs[:4]] == [500, 500, 2000, 2000] and cfg["hours"] is None
    assert g.runs[0].run_id.startswith("vits14-224px-500img-s1-") and cfg["data_fraction"] == 0.05
    assert g.runs[2].run_id.startswith("vits14-224px-2kimg-s1-")
    assert cfg["budget"]["subset_images"] == 500 and cfg["budget"]["images_seen"] == 1500
    with pytest.raises(GridError, match="not both"):
        grid_from_dict(dict(raw, hours=[1]))
    # hours grids keep their ids: the images key only appears in an images grid's configs
    assert "images" not in grid_from_dict(grid_dict(tmp_path)).runs[0].config

    seen = {}
    import mae_fast.training.finetune as finetune_mod
    import mae_fast.training.pretrain as pretrain_mod

    monkeypatch.setattr(pretrain_mod, "pretrain", lambda c: seen.update(c) or {
        "stopped": "finished", "checkpoint": "ck.pt", "images_seen": 1500, "wall_time_s": 1.0})
    monkeypatch.setattr(finetune_mod, "finetune", lambda c: {"top1": 12.5, "wall_time_s": 1.0})
    metrics = runner_mod._pretrain_then_evaluate(cfg, tmp_path / "run")
    assert seen["images"] == 500 and seen["hours"] is None and seen["data_source"] == "/data/images"
    row = runner_mod.result_row(g.runs[0], metrics, 2.0)
    assert row["images"] == 500 and row["hours"] is None and row["top1"] == 12.5


def test_a_targets_axis_runs_each_run_once_per_target(grid_dict, tmp_path):
    """``targets:`` multiplies the runs (innermost), hands each its pretrain ``target``, gives each its own id, and
    leaves a grid without the key (and its run ids) as it was."""
    plain = grid_from_dict(grid_dict(tmp_path))
    assert all("target" not in r.config and "target" not in r.config["pretrain"] for r in plain.runs)
    g = grid_from_dict(grid_dict(tmp_path, targets=["pixels", "hog", "teacher"], pretrain={"teacher": "runs/demo"}))
    assert len(g.runs) == 3 * len(plain.runs) and len({r.run_id for r in g.runs}) == len(g.runs)
    assert [r.config["pretrain"]["target"] for r in g.runs[:6]] == ["pixels", "hog", "teacher"] * 2
    assert all(r.config["target"] == r.config["pretrain"]["target"] and r.config["pretrain"]["teacher"] == "runs/demo"
               for r in g.runs)
    assert [(r.config["arch"], r.config["img_size"], r.config["hours"], r.config["seed"]) for r in g.runs[::3]] == \
        [(r.config["arch"], r.config["img_size"], r.config["hours"], r.config["seed"]) for r in plain.runs]
    runner_mod.check_default_job_config(g.runs[1].config)  # the pretrain block with a target is valid
    for over, fragment in [(dict(targets=["pixel"]), "targets: each is one of"),
                           (dict(targets=["teacher"]), "needs pretrain.teacher"), (dict(target=["hog"]), "did you mean")]:
        with pytest.raises(GridError, match=fragment):
            grid_from_dict(grid_dict(tmp_path, **over))
