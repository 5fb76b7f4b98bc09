"""README.md's examples keep working: users copy them, so a renamed function, argument, key or flag must fail here.

The code is read from README.md at test time, never copied. Python blocks run with a few explicit textual
substitutions that make them cheap on a CPU (a small model, a small image, a real checkpoint file); each
substitution must match, so a README edit that drops the matched text fails loudly instead of running
something else. Each ``mae-fast`` line of the bash blocks runs through the real entry point
(``mae_fast.cli.main``) with the work that would take minutes or hours (training, a sweep, the memory
estimator's fake-tensor steps) replaced by recorders; the cheap ones (``scale status``, ``scale fit``) run for real.
"""
from __future__ import annotations

import ast
import importlib
import itertools
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import mae_fast
from mae_fast import cli
from mae_fast import memory as memory_mod
from mae_fast.models.registry import OVERRIDES
from mae_fast.scaling import cli as scaling_cli, runner as scaling_runner
from mae_fast.training import config as config_mod, curves, finetune as finetune_mod, pretrain as pretrain_mod

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SHARED_CSV = REPO.parent / "shared" / "data" / "humanlike_vits_finetune_upto500h.csv"

# how the README's Python blocks are told apart; every block must carry exactly one of these
MODEL_BLOCK, OPS_BLOCK, SCALING_BLOCK = "mae_fast.create_model(", "from mae_fast import ops", "from mae_fast import scaling"


def _readme() -> str:
    return README.read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", _readme(), re.S | re.M)


def _python_block(marker: str) -> str:
    found = [b for b in _blocks("python") if marker in b]
    assert len(found) == 1, f"expected one ```python block of README.md containing {marker!r}, found {len(found)}"
    return found[0]


def _substitute(code: str, old: str, new: str) -> str:
    assert old in code, f"README.md no longer contains {old!r}: update this test's substitution to the new example"
    return code.replace(old, new)


def _run_statements(code: str, namespace: dict) -> list[tuple[ast.stmt, str, object]]:
    """Run ``code`` one top-level statement at a time, so a failure names the README statement that broke.
    Returns (node, source, value) for each expression statement (the README shows results that way)."""
    results = []
    for node in ast.parse(code).body:
        source = ast.get_source_segment(code, node)
        try:
            if isinstance(node, ast.Expr):
                value = eval(compile(ast.Expression(node.value), "README.md", "eval"), namespace)
                results.append((node, source, value))
            else:
                exec(compile(ast.Module([node], type_ignores=[]), "README.md", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"README statement failed: {source}\n  {type(exc).__name__}: {exc}") from exc
    return results


def _called(node: ast.stmt) -> str | None:
    """``name`` of an expression statement ``something.name(...)``."""
    call = getattr(node, "value", None)
    return call.func.attr if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) else None


# ---- Python blocks ---------------------------------------------------------------------------------------

def test_every_python_block_is_exercised():
    for block in _blocks("python"):
        markers = [m for m in (MODEL_BLOCK, OPS_BLOCK, SCALING_BLOCK) if m in block]
        assert len(markers) == 1, f"README.md has a ```python block this test does not run:\n{block}"


def test_model_block(tmp_path):
    code = _python_block(MODEL_BLOCK)
    # the demo model (patch 8) at 32 px: 16 patches, cheap on a CPU
    small_model, small_px = "mae_vit_demo_patch8", 32
    code = _substitute(code, '"mae_vit_huge_patch14"', repr(small_model))
    code = _substitute(code, "476", str(small_px))
    # an official-format checkpoint at the model's default resolution (64 px), so loading resamples pos-embeds
    donor = mae_fast.create_model(small_model)
    assert donor.grid_size != (small_px // donor.patch_size,) * 2
    checkpoint = tmp_path / "mae_pretrain.pth"
    torch.save({"model": donor.state_dict()}, checkpoint)
    code = _substitute(code, '"mae_pretrain_vit_huge.pth"', repr(str(checkpoint)))

    ns: dict = {}
    results = {source: value for _, source, value in _run_statements(code, ns)}
    model, imgs, out, feats = ns["model"], ns["imgs"], ns["out"], ns["feats"]

    B, p = imgs.shape[0], model.patch_size
    L = model.num_patches
    K = int(L * (1 - 0.75))  # visible patches at the README's mask_ratio, as official MAE counts them
    loss, pred, mask = results["out.loss, out.pred, out.mask"]
    assert math.isfinite(loss.item())
    assert pred.shape == (B, L, p * p * 3) and mask.shape == (B, L)
    assert (mask.sum(1) == L - K).all()  # 1 = removed
    # masked_only: predictions for the removed patches only, listed by out.ids_masked
    assert math.isfinite(out.loss.item())
    assert out.pred.shape == (B, L - K, p * p * 3) and out.ids_masked.shape == (B, L - K)
    assert feats.shape == (B, 1 + L, model.embed_dim)

    # the checkpoint really loaded: weights copied, pos-embeds resampled to the model's grid
    state = donor.state_dict()
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert model.pos_embed.shape == (1, 1 + L, model.embed_dim)
    assert state["pos_embed"].shape != model.pos_embed.shape

    # export_timm: loads strictly into timm's VisionTransformer (built by mae_fast's helper) and gives the same features
    vit = mae_fast.create_timm_encoder(model, load=False)
    vit.load_state_dict(ns["vit_state"], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(imgs), model.forward_features(imgs), rtol=1e-4, atol=1e-4)


def test_model_block_comments_match_the_registry():
    code = _python_block(MODEL_BLOCK)
    # "mae_vit_{small,base,...}_patch{14,16}, mae_vit_2b_patch14, ...": every name it spells is registered
    listed = re.search(r"list_models\(\)\)\s*#(.*)", code).group(1)
    names = []
    for pattern in (s.strip() for s in listed.split(", ")):
        if pattern == "...":
            continue
        parts = re.split(r"\{([^}]*)\}", pattern)  # literal, choices, literal, choices, ...
        names += ["".join(combo) for combo in itertools.product(*[p.split(",") if i % 2 else [p]
                                                                    for i, p in enumerate(parts)])]
    assert names, f"no model names found in the comment {listed!r}"
    missing = sorted(set(names) - set(mae_fast.list_models()))
    assert not missing, f"README.md lists models that are not registered: {missing}"

    # forward_features' comment gives the named model's width
    width = int(re.search(r"forward_features\(imgs\).*\(B, 1 \+ L, (\d+)\)", code).group(1))
    name = re.search(r'create_model\("([^"]+)"', code).group(1)
    with torch.device("meta"):
        assert mae_fast.create_model(name).embed_dim == width


def test_override_names_in_prose_are_the_constructor_s():
    sentence = re.search(r"Overrides use the official constructor's names:(.*?)\.\n", _readme(), re.S)
    assert sentence, "README.md no longer lists the create_model overrides"
    assert set(re.findall(r"`(\w+)`", sentence.group(1))) == set(OVERRIDES)


def test_ops_block():
    code = _python_block(OPS_BLOCK)
    # The block lists signatures; its inputs get small random tensors of consistent shapes
    # (shapes from mae_fast/ops/*.py: B batch, L patches, K visible, D width, H heads).
    torch.manual_seed(0)
    B, L, K, D, H, patch_size = 2, 16, 4, 32, 4, 4
    ids_shuffle = torch.rand(B, L).argsort(1)
    ids_restore = ids_shuffle.argsort(1)
    mask = torch.ones(B, L)
    mask[:, :K] = 0
    mask = mask.gather(1, ids_restore)  # 1 = removed, as the model makes it
    ns = dict(
        q=torch.randn(B, L, H, D // H), k=torch.randn(B, L, H, D // H), v=torch.randn(B, L, H, D // H),
        x=torch.randn(B, L, D), branch=torch.randn(B, L, D), ids_keep=ids_shuffle[:, :K], ids_restore=ids_restore,
        x_vis=torch.randn(B, 1 + K, D), mask_token=torch.randn(1, 1, D), patch_size=patch_size,
        imgs=torch.randn(B, 3, 4 * patch_size, 4 * patch_size), pred=torch.randn(B, L, patch_size ** 2 * 3),
        mask=mask, norm=torch.nn.LayerNorm(D), linear=torch.nn.Linear(D, 3 * D),
        fc1=torch.nn.Linear(D, 4 * D), fc2=torch.nn.Linear(4 * D, D),
    )
    with torch.no_grad():
        results = {_called(node): value for node, _, value in _run_statements(code, ns)}

    shapes = {
        "attention": (B, L, H, D // H),  # "(B, N, H, D)"
        "gather_visible": (B, K, D),
        "unshuffle_with_mask_token": (B, 1 + L, D),
        "patchify_gather": (B, K, 3 * patch_size ** 2),
        "layer_norm": (B, L, D),
        "layer_norm_linear": (B, L, 3 * D),
        "layer_norm_mlp": (B, L, D),
    }
    assert set(results) == set(shapes) | {"masked_patch_mse", "add_layer_norm"}, "the README lists other ops now"
    for op, shape in shapes.items():
        assert results[op].shape == shape, f"ops.{op} gave {tuple(results[op].shape)}, expected {shape}"
    assert results["masked_patch_mse"].dim() == 0 and math.isfinite(results["masked_patch_mse"].item())
    x_mid, y = results["add_layer_norm"]  # "-> (x + branch, y)"
    torch.testing.assert_close(x_mid, ns["x"] + ns["branch"])
    assert y.shape == (B, L, D)


def test_scaling_block():
    if not SHARED_CSV.is_file():
        pytest.skip(f"{SHARED_CSV} is missing (see ../shared/README.md)")
    from mae_fast import scaling

    code = _python_block(SCALING_BLOCK)
    code = _substitute(code, '"results.csv"', repr(str(SHARED_CSV)))
    # 60% is beyond what this table's law reaches within solve's default bounds (runs up to 500 h);
    # ask for the table's median accuracy, which the law surely reaches
    reachable = float(np.median(scaling.load_results(SHARED_CSV)["top1"]))
    code = _substitute(code, "target=60.0", f"target={reachable!r}")

    results = {_called(node): value for node, _, value in _run_statements(code, {})}
    estimate, lower, upper = results["predict"]  # "estimate with lower and upper bounds"
    assert all(math.isfinite(v) for v in (estimate, lower, upper)) and lower <= upper
    cheapest = results["solve"]  # "cheapest (params, hours, img_size) reaching it"
    assert {"params", "hours", "img_size"} <= set(cheapest)
    assert all(cheapest[k] > 0 for k in ("params", "hours", "img_size"))


# ---- bash blocks -----------------------------------------------------------------------------------------

# commands of the README that are not mae_fast's to check
NOT_OURS = (("pip", "install"), ("python", "-m", "pytest"))
# torchrun scripts and the subcommand that runs the same module
SCRIPTS = {"train/pretrain.py": "pretrain", "train/finetune.py": "finetune"}
KEY_VALUE_COMMANDS = {"pretrain": config_mod.PRETRAIN_KEYS, "finetune": config_mod.FINETUNE_KEYS,
                      "linprobe": config_mod.FINETUNE_KEYS}


def _readme_commands() -> list[list[str]]:
    commands = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:
                cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                command, tokens = tokens[:cut], tokens[cut + 1:]
                if command and not any(tuple(command[:len(n)]) == n for n in NOT_OURS):
                    commands.append(command)
    return commands


def _mae_fast(argv: list[str]) -> int:
    """``mae-fast ARGV``'s exit code (argparse exits instead of returning: after --help, or on a bad argument)."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


def _help_of(argv: list[str], capsys) -> str:
    code = _mae_fast([*argv, "--help"])
    out = capsys.readouterr().out
    assert code == 0, f"`mae-fast {' '.join(argv)} --help` exited with {code}"
    return out


@pytest.fixture
def long_work_recorded(monkeypatch):
    """Replace what would take minutes or hours with recorders: the commands still parse their arguments, load
    their recipes, grids and model configs and hand the result to the function that does the work."""
    calls: dict[str, tuple] = {}

    def recorder(name, result=None):
        def record(*args, **kwargs):
            calls[name] = (args, kwargs)
            return result
        return record

    def estimate(name, img_size, batch, *, lean=False, **kwargs):  # a peak linear in the batch
        calls["estimate_mae_step"] = ((name, img_size, batch), dict(kwargs, lean=lean))
        act = batch * (2 ** 28 if lean else 2 ** 29)
        return memory_mod.StepMemory(peak=2 ** 32 + act, peak_phase="backward", parameters=2 ** 30,
                                     optimizer_state=2 ** 31, gradients=2 ** 30, activations=act, after_forward=act)

    monkeypatch.setattr(pretrain_mod, "pretrain", recorder("pretrain"))
    monkeypatch.setattr(finetune_mod, "finetune", recorder("finetune"))
    monkeypatch.setattr(curves, "plot_runs", recorder("plot_runs", "curves.png"))
    monkeypatch.setattr(memory_mod, "estimate_mae_step", estimate)
    monkeypatch.setattr(scaling_runner, "run_grid", recorder("run_grid", {}))
    monkeypatch.setattr(scaling_cli, "memory_plans", recorder("memory_plans", []))
    return calls


# the recorder each subcommand reaches; None: the command is cheap and runs for real
WORK = {"pretrain": "pretrain", "finetune": "finetune", "linprobe": "finetune", "plot": "plot_runs",
        "memory": "estimate_mae_step", "scale run": "run_grid", "scale memory": "memory_plans",
        "scale status": None, "scale fit": None}


def test_readme_has_commands():
    assert any(c[0] == "mae-fast" for c in _readme_commands())


@pytest.mark.parametrize("command", _readme_commands(), ids=" ".join)
def test_bash_command(command, long_work_recorded, tmp_path, monkeypatch, capsys):
    line = " ".join(command)
    if command[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        launch = get_args_parser().parse_args(command[1:])  # torchrun's own flags
        script = launch.training_script
        assert script in SCRIPTS, f"{line}: no check for the script {script!r}"
        assert (REPO / script).is_file(), f"{line}: {script} does not exist"
        argv = [SCRIPTS[script], *launch.training_script_args]
        # the script is the module the subcommand runs, so checking the subcommand checks the script
        module = cli.COMMANDS[argv[0]][0]
        entry = importlib.import_module("mae_fast." + script[:-len(".py")].replace("/", "."))  # train/x.py
        assert entry.main is importlib.import_module(module).main
    else:
        assert command[0] == "mae-fast", f"README.md runs {line!r}: this test does not know how to check it"
        argv = command[1:]
    assert argv and argv[0] in cli.COMMANDS, f"{line}: no such mae-fast subcommand {argv[:1]}"
    sub = " ".join(argv[:2]) if argv[0] == "scale" else argv[0]
    assert sub in WORK, f"{line}: this test does not know how to check `mae-fast {sub}`"

    if sub == "scale fit" and not SHARED_CSV.is_file():
        pytest.skip(f"{SHARED_CSV} is missing (see ../shared/README.md)")
    if "--help" in argv:
        pass  # running it below is the check
    elif argv[0] in KEY_VALUE_COMMANDS:  # key=value commands: each key the README sets is in the key table
        _, pairs = config_mod.parse_overrides(argv[1:])
        unknown = sorted(set(pairs) - set(KEY_VALUE_COMMANDS[argv[0]]))
        assert not unknown, f"{line}: {unknown} are not `mae-fast {argv[0]}` keys"
    else:  # argparse commands: each flag the README uses is in the help
        help_text = _help_of(argv[:len(sub.split())], capsys)
        for flag in (a.split("=")[0] for a in argv if a.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), \
                f"{line}: `mae-fast {sub} --help` does not list {flag}"

    # README commands run from the repository root; here they run in tmp_path so nothing lands in the
    # checkout, with the paths that exist in the checkout made absolute
    monkeypatch.chdir(tmp_path)
    argv = argv[:1] + [str(REPO / a) if not a.startswith("-") and "=" not in a and (REPO / a).exists() else a
                       for a in argv[1:]]
    code = _mae_fast(argv)
    err = capsys.readouterr().err
    assert code == 0, f"`{line}` exited with {code}:\n{err}"
    if "--help" in argv:
        return
    if WORK[sub]:
        assert WORK[sub] in long_work_recorded, f"`{line}` did not reach {WORK[sub]}"
    if argv[0] in KEY_VALUE_COMMANDS:  # each key=value the README gives is in the config the run gets
        cfg = long_work_recorded[WORK[sub]][0][0]
        for key, value in pairs.items():
            assert cfg[key] == value, f"{line}: {key} is {cfg[key]!r} in the run's config"
        if argv[0] != "pretrain":
            assert cfg["mode"] == argv[0]
    if sub == "scale fit":
        out = Path(argv[argv.index("--out") + 1])
        assert (tmp_path / out / "report.md").is_file(), f"{line}: no report in {out}"
